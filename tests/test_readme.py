"""The README's Python example runs verbatim, and its shell examples name real commands and options."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- readme-example -->"


def readme_example() -> tuple[str, str]:
    """The ```python block right after the readme-example marker in README.md."""
    for src in (REPO / "README.md",):
        if src.exists() and MARKER in src.read_text():
            m = re.search(re.escape(MARKER) + r"\s*\n```python\n(.*?)\n```", src.read_text(), re.S)
            assert m, f"{src.name}: the marker must be followed by a ```python block"
            return m.group(1), src.name
    pytest.fail("no readme-example marker in README.md")


def test_readme_python_example_runs_verbatim(tmp_path):
    code, source = readme_example()
    script = tmp_path / "example.py"
    script.write_text(code + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert res.returncode == 0, f"{source} example failed:\n{res.stdout}\n{res.stderr}"
    # the example states its checks as "<what> == <what>: True" lines; all of them must hold
    checks = [ln for ln in res.stdout.splitlines() if ":" in ln and "==" in ln.split(":", 1)[0]]
    assert checks and all(ln.rstrip().endswith("True") for ln in checks), res.stdout


def _shell_commands(text: str) -> list[list[str]]:
    """`peft-surgery ...` invocations in ```bash/```console blocks (continuation lines joined)."""
    cmds = []
    for block in re.findall(r"```(?:bash|console|sh)\n(.*?)```", text, re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.strip().removeprefix("$ ")
            line = re.sub(r"^(\w+=\S+\s+)+", "", line)  # leading VAR=value assignments
            if line.startswith("peft-surgery "):
                line = line.split(" #", 1)[0].split(" > ", 1)[0].split(" | ", 1)[0]
                cmds.append(shlex.split(line)[1:])
    return cmds


def _check_command(args: list[str]) -> None:
    from peft_surgery.cli.main import cli

    cmd: click.Command = cli
    rest = list(args)
    while isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        assert name in cmd.commands, f"`peft-surgery {' '.join(args)}`: no command '{name}'"
        cmd = cmd.commands[name]
    known = {o for p in cmd.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)}
    known |= {"--help", "-h", "--version", "-V"}
    for tok in rest:
        if tok.startswith("-") and not re.fullmatch(r"-\d.*", tok):
            flag = tok.split("=", 1)[0]
            assert flag in known, f"`peft-surgery {' '.join(args)}`: unknown option {flag}"


@pytest.mark.parametrize("doc", [REPO / "README.md", REPO / "BENCHMARKS.md"], ids=lambda p: p.name)
def test_shell_examples_use_real_commands_and_options(doc):
    cmds = [c for c in _shell_commands(doc.read_text()) if c]
    assert doc.name != "README.md" or len(cmds) > 10, "README.md should show the commands"
    for args in cmds:
        _check_command(args)
