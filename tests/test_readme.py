"""Every README code block runs: the python blocks in order in one namespace (each asserts
its outcome), and every `python -m experiments.X` command of the bash blocks parses its
options (`--help`: the full jobs themselves run in test_experiments)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
COMMANDS = sorted({
    m.group(0)
    for lang, code in BLOCKS if lang == "bash"
    for m in re.finditer(r"python -m experiments\.[\w.]+(?: [^&|\n#]*)?", code)
})


def test_readme_has_blocks():
    assert len(PYTHON) >= 1 and COMMANDS


@pytest.mark.slow
def test_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write results write them here
    namespace = {}
    for i, code in enumerate(PYTHON):
        try:
            exec(compile(code, f"README python block {i}", "exec"), namespace)
        except Exception as e:  # name the block that failed
            raise AssertionError(f"README python block {i} failed:\n{code}") from e


@pytest.mark.parametrize("command", COMMANDS)
def test_bash_commands_parse(command):
    argv = shlex.split(command)
    module = argv[2]
    # the module's options must accept what the README passes, then print help
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"python -m {module}" in out.stdout
    for opt in (a for a in argv[3:] if a.startswith("--")):
        assert opt in out.stdout, f"{module} has no option {opt}"
