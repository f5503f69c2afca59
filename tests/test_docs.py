"""The docs site: `mkdocs build --strict` passes (built once per test session, shared by the
test processes), every public name has exactly one API entry, every page is in the nav, every
python block of the docs pages runs and asserts its outcome, the notebooks' pages show their
figures, and a real browser (Debian's headless Chromium) sees the API signatures and the
typeset formulas with no console error and no missing file."""

import fcntl
import functools
import html as htmllib
import http.server
import importlib.util
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import ddln_jax as dd

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)
API = sorted((DOCS / "api").glob("*.md"))
_spec = importlib.util.spec_from_file_location("docs_notebooks", DOCS / "hooks" / "notebooks.py")
notebooks_hook = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(notebooks_hook)


def _blocks(path, lang):
    return re.findall(rf"^```{lang}\n(.*?)^```", path.read_text(), flags=re.S | re.M)


CODE_PAGES = [p for p in PAGES if _blocks(p, "python")]
COMMANDS = {}  # module -> the commands of the docs' bash blocks that run it
for _page in PAGES:
    for _code in _blocks(_page, "bash"):
        for _m in re.finditer(r"python -m (experiments\.[\w.]+)(?: [^&|\n#;]*)?", _code):
            COMMANDS.setdefault(_m.group(1), set()).add(_m.group(0))


def _public_names():
    names = getattr(dd, "__all__", None)
    if names is None:  # every re-exported name (the package defines no __all__)
        names = [
            n
            for n, v in vars(dd).items()
            if not n.startswith("_") and not inspect.ismodule(v) and n != "annotations"
        ]
    return sorted(names)


@pytest.fixture(scope="session")
def site(shared_tmp_path):
    """The site, built once per session by `python -m mkdocs build --strict` (a lock makes the
    other test processes wait for it and reuse it); the notebooks run through the cache
    tests/test_notebooks.py shares."""
    out, record = shared_tmp_path / "site", shared_tmp_path / "site.json"
    with open(shared_tmp_path / "site.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.is_file():
            env = dict(
                os.environ,
                DDLN_NOTEBOOK_CACHE=str(shared_tmp_path / "notebooks"),
                NO_MKDOCS_2_WARNING="1",
            )
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
            t = time.perf_counter()
            run = subprocess.run(
                [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=1200,
            )
            record.write_text(
                json.dumps(
                    {
                        "rc": run.returncode,
                        "log": run.stdout + run.stderr,
                        "seconds": time.perf_counter() - t,
                    }
                )
            )
    built = json.loads(record.read_text())
    assert built["rc"] == 0, built["log"][-5000:]
    return out, built


def test_site_builds_strict_without_warnings(site):
    out, built = site
    warnings = [ln for ln in built["log"].splitlines() if ln.startswith(("WARNING", "ERROR"))]
    assert not warnings
    for page in PAGES:  # every source page became a page of the site
        rel = page.relative_to(DOCS).with_suffix("")
        rel = rel.parent if rel.name == "index" else rel
        assert (out / rel / "index.html").is_file(), rel
    assert (out / "javascripts" / "mathjax" / "tex-chtml.js").is_file()


def test_every_public_name_has_exactly_one_api_entry():
    entries = [
        m for p in API for m in re.findall(r"^::: ddln_jax\.(\w+)\s*$", p.read_text(), flags=re.M)
    ]
    public = _public_names()
    assert len(public) > 60  # the package's names were found
    counts = {n: entries.count(n) for n in public}
    assert {n: c for n, c in counts.items() if c != 1} == {}
    assert set(entries) - set(public) <= {"plotting"}  # the one public submodule has a page


def test_nav_holds_every_page_and_notebook():
    text = (ROOT / "mkdocs.yml").read_text()
    assert yaml.safe_load(text)["strict"] is True
    listed = set(re.findall(r"^\s+- (?:[^:\n]+: )?([\w/]+\.md)$", text, flags=re.M))
    pages = {str(p.relative_to(DOCS)) for p in PAGES}
    assert pages <= listed, pages - listed
    assert {f"notebooks/{p.stem}.md" for p in notebooks_hook.notebooks()} <= listed
    assert listed - pages == {f"notebooks/{p.stem}.md" for p in notebooks_hook.notebooks()}


@pytest.mark.slow
@pytest.mark.parametrize("page", CODE_PAGES, ids=[str(p.relative_to(DOCS)) for p in CODE_PAGES])
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write results write them here
    namespace = {}
    for i, code in enumerate(_blocks(page, "python")):
        try:
            exec(compile(code, f"{page.name} python block {i}", "exec"), namespace)
        except Exception as e:  # name the block that failed
            raise AssertionError(f"{page.name} python block {i} failed:\n{code}") from e


def test_guides_have_code_that_runs():
    names = {str(p.relative_to(DOCS)) for p in CODE_PAGES}
    assert {
        "guides/sweeps.md",
        "guides/discrete.md",
        "guides/conservation_laws.md",
        "guides/small_init.md",
        "getting_started/first_flow.md",
    } <= names
    assert all("assert " in "".join(_blocks(p, "python")) for p in CODE_PAGES)


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_bash_commands_parse(module):
    """Every `python -m experiments.X --opt ...` of the docs: X's `--help` lists each option."""
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    for command in COMMANDS[module]:
        for opt in (a for a in shlex.split(command)[3:] if a.startswith("--")):
            assert opt in out.stdout, f"{module} has no option {opt} ({command})"


def test_notebook_pages_show_their_outputs(site):
    out, _ = site
    for path in notebooks_hook.notebooks():
        page = (out / "notebooks" / path.stem / "index.html").read_text()
        images = re.findall(r'<img[^>]+src="([^"]+\.png)"', page)
        assert images, f"{path.stem}: no figure on its page"
        for src in images:  # each figure is a real PNG in the site
            png = (out / "notebooks" / path.stem / src).resolve()
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "<pre" in page  # printed output


# -- the browser ---------------------------------------------------------------------------

# observes, in each served page, uncaught errors, failed resources and console.error calls
_PROBE = """<script>(function () {
  var seen = [];
  function note(s) { seen.push(String(s)); document.documentElement.setAttribute(
      "data-probe-errors", JSON.stringify(seen)); }
  window.addEventListener("error", function (e) {
    note(e.message || ("failed to load " + ((e.target && (e.target.src || e.target.href)) || "?")));
  }, true);
  window.addEventListener("unhandledrejection", function (e) { note(e.reason); });
  var error = console.error;
  console.error = function () { note(Array.prototype.join.call(arguments, " "));
                                return error.apply(console, arguments); };
})();</script>"""


class _Handler(http.server.SimpleHTTPRequestHandler):
    missing: list

    def log_message(self, *args):
        pass

    def send_error(self, code, *args, **kwargs):
        self.missing.append((code, self.path))
        return super().send_error(code, *args, **kwargs)


@pytest.fixture(scope="module")
def browse(site, tmp_path_factory):
    root = tmp_path_factory.mktemp("served") / "site"
    shutil.copytree(site[0], root)  # a copy whose pages carry the probe
    for page in root.rglob("*.html"):
        page.write_text(page.read_text().replace("<head>", "<head>" + _PROBE, 1))
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(chromium).exists(), "Debian's chromium is needed: bash .ci/install_system_deps"
    missing = []
    handler = type("Handler", (_Handler,), {"missing": missing})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def dom(path):
        profile = tmp_path_factory.mktemp("chromium-profile")
        run = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=15000",
                "--dump-dom",
                f"http://127.0.0.1:{server.server_address[1]}/{path}",
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        uncaught = [ln for ln in run.stderr.splitlines() if "CONSOLE" in ln and "Uncaught" in ln]
        return run.stdout, uncaught

    yield dom, missing
    server.shutdown()
    server.server_close()


def _probe_errors(html):
    """What the probe saw: the attribute it sets on the page's <html> element."""
    m = re.search(r'<html[^>]*\sdata-probe-errors="([^"]*)"', html)
    return json.loads(m.group(1).replace("&quot;", '"')) if m else []


def _text(html):
    """What a reader sees of `html` (no scripts or styles, entities decoded)."""
    html = re.sub(r"<(script|style)\b.*?</\1>", "", html, flags=re.S)
    return re.sub(r"\s+", " ", htmllib.unescape(re.sub(r"<[^>]+>", "", html)))


@pytest.mark.slow
def test_browser_sees_signatures_and_typeset_maths(browse):
    dom, missing = browse
    checks = {
        "api/flows/": [
            "gradient_flow(",
            "layers0",
            "problem",
            "stop_when_converged",
            "-> Trajectory",
        ],
        "api/sweeps/": ["sweep(", "depths", "scales", "seeds", "load_sweep("],
    }
    for path, wanted in checks.items():
        html, uncaught = dom(path)
        text = _text(html)
        assert _probe_errors(html) == [] and uncaught == []
        for w in wanted:
            assert w in text, f"{path}: {w!r} not shown"
        # the signature is rendered in its own block, as code
        assert re.search(r'class="[^"]*doc-signature', html), path
    html, uncaught = dom("maths/")
    assert _probe_errors(html) == [] and uncaught == []
    formulas = html.count('class="arithmatex"')
    typeset = len(re.findall(r"<mjx-container[^>]*jax=\"CHTML\"", html))
    assert formulas >= 2 and typeset >= formulas  # each display formula typeset by MathJax
    assert "<mjx-merror" not in html and "data-mjx-error" not in html  # no TeX error
    assert "\\prod" not in _text(html)  # no raw TeX left on the page
    assert missing == []  # no page, script, style or font was missing
