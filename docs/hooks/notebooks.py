"""mkdocs hook: every `notebooks/*.py` (jupytext `py:percent`) becomes a page with its outputs.

Each notebook is executed (nbclient, a fresh kernel, in a temporary folder) and written as
markdown: its markdown cells as they are, code cells as python blocks, then their printed
text, tables and figures (PNG files next to the page). A cell that raises fails the build.

Executed notebooks are cached in `$DDLN_NOTEBOOK_CACHE` (default `build/notebooks/`), keyed
by the notebook's source, the library's source and every installed distribution's version,
so a notebook runs again only when one of those changed. The tests share that cache between
`tests/test_notebooks.py` and the docs build (`execute` holds a file lock per notebook, so
parallel test processes run each notebook once). `DDLN_DOCS_NOTEBOOKS=0` skips execution
(pages without outputs: quick local previews with `mkdocs serve`).
"""

import base64
import fcntl
import hashlib
import importlib.metadata
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_WIDGET = "application/vnd.jupyter.widget-view+json"


def notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.py"))


def _key(path: Path) -> str:
    h = hashlib.sha256(path.read_bytes())
    for src in sorted((ROOT / "ddln_jax").rglob("*.py")):
        h.update(str(src.relative_to(ROOT)).encode())
        h.update(src.read_bytes())
    h.update(sys.version.encode())
    versions = sorted(
        f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
    )
    h.update("\n".join(versions).encode())
    return h.hexdigest()[:20]


def cache_dir() -> Path:
    return Path(os.environ.get("DDLN_NOTEBOOK_CACHE", ROOT / "build" / "notebooks"))


def execute(path: Path, cache: Path | None = None):
    """The notebook at `path`, executed (or read back from `cache` if it ran unchanged)."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    cache = Path(cache) if cache is not None else cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    done = cache / f"{path.stem}-{_key(path)}.ipynb"
    with open(cache / f"{path.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be running this notebook
        if done.is_file():
            return nbformat.read(done, as_version=4)
        nb = jupytext.read(path)
        with tempfile.TemporaryDirectory() as cwd:  # what a notebook writes lands here
            NotebookClient(
                nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": cwd}}
            ).execute()
        tmp = done.with_suffix(".tmp")
        nbformat.write(nb, tmp)
        tmp.replace(done)
        return nb


def _text(s) -> str:
    return _ANSI.sub("", "".join(s) if isinstance(s, list) else s).rstrip("\n")


def _fence(text: str, lang: str = "text") -> str:
    ticks = "````" if "```" in text else "```"
    return f"{ticks}{lang}\n{text}\n{ticks}"


def to_markdown(nb, stem: str, executed: bool = True) -> tuple[str, dict[str, bytes]]:
    """A page for notebook `nb` and its figures (file name → PNG bytes)."""
    how = (
        "Executed from `notebooks/{}.py` when this site was built"
        if executed
        else "Not executed in this build (`DDLN_DOCS_NOTEBOOKS=0`): `notebooks/{}.py`"
    ).format(stem)
    parts, images = [], {}
    for cell in nb.cells:
        src = _text(cell.source)
        if cell.cell_type == "markdown":
            parts.append(src)
            if len(parts) == 1:
                parts.append(
                    f'!!! note ""\n    {how}; `jupytext --to ipynb` makes it a notebook to run.'
                )
            continue
        if cell.cell_type != "code" or not src:
            continue
        parts.append(_fence(src, "python"))
        printed = []  # consecutive printed text: one block
        for out in cell.get("outputs", []) + [{"output_type": "end"}]:
            kind = out.get("output_type")
            if kind == "stream":
                printed.append(_text(out["text"]))
                continue
            if printed:
                parts.append(_fence("\n".join(printed)))
                printed = []
            if kind in ("display_data", "execute_result"):
                data = out.get("data", {})
                if _WIDGET in data:  # progress bars: nothing a static page can show
                    continue
                if "image/png" in data:
                    name = f"{stem}_{len(images)}.png"
                    images[name] = base64.b64decode(data["image/png"])
                    parts.append(f"![output]({stem}_files/{name})")
                elif "text/html" in data:
                    html = _text(data["text/html"])
                    parts.append(f'<div class="nb-output">\n{html}\n</div>')
                elif "text/plain" in data:
                    parts.append(_fence(_text(data["text/plain"])))
    return "\n\n".join(parts) + "\n", images


def on_files(files, config):
    from mkdocs.structure.files import File

    run = os.environ.get("DDLN_DOCS_NOTEBOOKS", "1") != "0"
    for path in notebooks():
        if run:
            nb = execute(path)
        else:
            import jupytext

            nb = jupytext.read(path)
        page, images = to_markdown(nb, path.stem, executed=run)
        files.append(File.generated(config, f"notebooks/{path.stem}.md", content=page))
        for name, png in images.items():
            files.append(File.generated(config, f"notebooks/{path.stem}_files/{name}", content=png))
    return files


def on_serve(server, config, builder, **kwargs):
    server.watch(str(NOTEBOOKS))
    return server
