"""The library API: doctests, annotations, lazy package import (the README example is in test_readme.py)."""

from __future__ import annotations

import doctest
import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def _run_doctests(module) -> None:
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module) if t.examples]
    assert tests, f"{module.__name__} has no doctest examples"
    failures = []
    for t in tests:
        out: list[str] = []
        result = runner.run(t, out=out.append)
        if result.failed:
            failures.append("".join(out))
    assert not failures, "\n".join(failures)


def test_api_doctests(tmp_path, monkeypatch):
    import peft_surgery.api as api

    monkeypatch.chdir(tmp_path)
    _run_doctests(api)


def test_hub_doctests(tmp_path, monkeypatch):
    import peft_surgery.hub as hub

    monkeypatch.chdir(tmp_path)
    _run_doctests(hub)


def test_every_api_function_has_docstring_example_and_annotations():
    import inspect

    import peft_surgery as ps
    import peft_surgery.api as api

    for name in api.__all__:
        fn = getattr(api, name)
        assert getattr(ps, name) is fn, name  # re-exported by the package
        assert fn.__doc__ and ">>> " in fn.__doc__, f"{name} has no runnable example"
        sig = inspect.signature(fn)
        assert sig.return_annotation is not inspect.Signature.empty, name
        for p in sig.parameters.values():
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                assert p.annotation is not inspect.Parameter.empty, f"{name}({p.name}) is not annotated"
    assert (REPO / "peft_surgery" / "py.typed").exists()


def test_package_import_is_lazy_and_names_resolve():
    """`import peft_surgery` does not import torch; every public name resolves; submodule names stay functions."""
    code = (
        "import sys, peft_surgery as ps\n"
        "assert 'torch' not in sys.modules, 'import peft_surgery imported torch'\n"
        "missing = [n for n in ps.__all__ if not hasattr(ps, n)]\n"
        "assert not missing, missing\n"
        "import peft_surgery.convert, peft_surgery.cli.main\n"
        "assert callable(ps.convert) and ps.convert is ps.api.convert, ps.convert\n"
        "if 'extract' in ps.__all__:\n"
        "    import peft_surgery.extract\n"
        "    assert ps.extract is ps.api.extract\n"
        "from peft_surgery.convert import ConvertReport\n"
        "print('ok')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
