"""Every command follows the same conventions: help with an example, the same flags spelled the same way."""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from peft_surgery import __version__
from peft_surgery.cli import common
from peft_surgery.cli.main import cli

# Commands that upload, or only read and report: no -o/--output. Everything else writes an adapter or model.
NO_OUTPUT = {"inspect", "push", "quant-error"}
# Commands that read no checkpoint/adapter tensors (push uploads a folder as bytes).
NO_CHECKPOINT_INPUT = {"push"}


def _walk(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, cmd in sorted(group.commands.items()):
        path = (*prefix, name)
        if isinstance(cmd, click.Group):
            yield path, cmd
            yield from _walk(cmd, path)
        else:
            yield path, cmd


COMMANDS = [(" ".join(p), c) for p, c in _walk(cli)]
LEAVES = [(n, c) for n, c in COMMANDS if not isinstance(c, click.Group)]


def _opts(cmd: click.Command) -> dict[str, click.Option]:
    return {o.name: o for o in cmd.params if isinstance(o, click.Option)}


def _help(name: str) -> str:
    res = CliRunner().invoke(cli, [*name.split(), "--help"], prog_name="peft-surgery")
    assert res.exit_code == 0, res.output
    return res.output


def test_there_are_commands():
    names = {n for n, _ in COMMANDS}
    assert {"inspect", "convert", "push"} <= names


@pytest.mark.parametrize("name,cmd", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_help_has_a_runnable_example(name, cmd):
    text = _help(name)
    m = re.search(r"Examples?:\n((?:[ \t]+\S.*\n?)+)", text)
    assert m, f"`peft-surgery {name} --help` has no Example: block"
    lines = [ln.strip() for ln in m.group(1).splitlines() if ln.strip()]
    top = name.split()[0]
    assert any(ln.startswith(f"peft-surgery {top}") for ln in lines), f"example lines do not run `{top}`: {lines}"
    # the \b marker keeps click from re-wrapping the example into one paragraph
    assert all(len(ln) < 120 for ln in lines)


@pytest.mark.parametrize("name,cmd", LEAVES, ids=[n for n, _ in LEAVES])
def test_writing_commands_have_output_overwrite_and_hub_options(name, cmd):
    opts = _opts(cmd)
    if name in NO_OUTPUT:
        assert "output" not in opts
        return
    assert "output" in opts, f"{name}: no -o/--output"
    assert set(opts["output"].opts) == {"-o", "--output"}, f"{name}: output flags are {opts['output'].opts}"
    assert "overwrite" in opts and opts["overwrite"].opts == ["--overwrite"] and opts["overwrite"].is_flag, name
    for hub in ("push_to_hub", "private", "commit_message"):
        assert hub in opts, f"{name}: writes an adapter/model but has no --{hub.replace('_', '-')}"


@pytest.mark.parametrize("name,cmd", LEAVES, ids=[n for n, _ in LEAVES])
def test_reading_commands_accept_allow_pickle_and_json(name, cmd):
    opts = _opts(cmd)
    if name not in NO_CHECKPOINT_INPUT:
        assert "allow_pickle" in opts and opts["allow_pickle"].opts == ["--allow-pickle"], name
    assert "as_json" in opts and opts["as_json"].opts == ["--json"], f"{name}: no --json"


def test_same_option_same_spelling_everywhere():
    """A destination name is spelled with the same flags (and defaults) in every command; flags are kebab-case."""
    seen: dict[str, tuple[str, tuple[str, ...], object]] = {}
    for name, cmd in LEAVES:
        for dest, o in _opts(cmd).items():
            if dest == "help":
                continue
            for flag in o.opts + o.secondary_opts:
                assert re.fullmatch(r"-[a-zA-Z]|--[a-z0-9]+(-[a-z0-9]+)*", flag), f"{name}: flag {flag}"
            key = (tuple(sorted(o.opts)), o.is_flag)
            if dest in seen and dest not in ("rank", "format", "method", "base", "weights", "dtype"):
                first, flags, default = seen[dest]
                assert flags == key, f"--{dest}: {name} spells it {key[0]}, {first} spells it {flags[0]}"
            seen.setdefault(dest, (name, key, o.default))
    # the shared options keep their shared spelling and defaults
    for name, cmd in LEAVES:
        opts = _opts(cmd)
        if "quiet" in opts:
            assert set(opts["quiet"].opts) == {"-q", "--quiet"}, name
        if "device" in opts:
            assert opts["device"].default == "auto", f"{name}: --device default is {opts['device'].default}"
        # no synonyms for the standard flags
        for bad in ("--out", "--force", "--outdir", "--output-dir", "--verbose-json", "--pickle"):
            assert all(bad not in o.opts for o in opts.values()), f"{name} uses {bad}"


@pytest.mark.parametrize("name,cmd", LEAVES, ids=[n for n, _ in LEAVES])
def test_compute_commands_offer_device_and_quiet(name, cmd):
    opts = _opts(cmd)
    if name in NO_OUTPUT and name != "push":
        return
    assert "quiet" in opts, f"{name}: no -q/--quiet"


def test_version_and_help():
    runner = CliRunner()
    for flag in ("--version", "-V"):
        res = runner.invoke(cli, [flag], prog_name="peft-surgery")
        assert res.exit_code == 0 and res.output.strip() == f"peft-surgery, version {__version__}"
    res = runner.invoke(cli, ["-h"], prog_name="peft-surgery")
    assert res.exit_code == 0 and "Commands:" in res.output
    for name, _ in COMMANDS:
        if " " not in name:
            assert name in res.output


def test_shell_completion(monkeypatch):
    """The documented `_PEFT_SURGERY_COMPLETE=bash_source peft-surgery` works, and completion knows the commands."""
    runner = CliRunner()
    res = runner.invoke(cli, [], prog_name="peft-surgery", env={"_PEFT_SURGERY_COMPLETE": "bash_source"})
    assert res.exit_code == 0 and "_peft_surgery_completion" in res.output and "complete " in res.output
    res = runner.invoke(cli, [], prog_name="peft-surgery", env={
        "_PEFT_SURGERY_COMPLETE": "bash_complete", "COMP_WORDS": "peft-surgery pu", "COMP_CWORD": "1"})
    assert res.exit_code == 0 and "plain,push" in res.output.split()
    res = runner.invoke(cli, [], prog_name="peft-surgery", env={
        "_PEFT_SURGERY_COMPLETE": "bash_complete", "COMP_WORDS": "peft-surgery push out me/x --dry", "COMP_CWORD": "4"})
    assert "plain,--dry-run" in res.output.split()
    for shell in ("zsh", "fish"):
        res = runner.invoke(cli, [], prog_name="peft-surgery", env={"_PEFT_SURGERY_COMPLETE": f"{shell}_source"})
        assert res.exit_code == 0 and "peft-surgery" in res.output.replace("peft_surgery", "peft-surgery")


def test_shared_options_are_the_ones_commands_use():
    """Guard against a command re-declaring a shared flag with different help/semantics."""
    ref = {
        "allow_pickle": common.allow_pickle_option(lambda: None).__click_params__[0],
        "as_json": common.json_option(lambda: None).__click_params__[0],
        "overwrite": common.overwrite_option(lambda: None).__click_params__[0],
    }
    for name, cmd in LEAVES:
        opts = _opts(cmd)
        for dest, r in ref.items():
            if dest in opts:
                assert opts[dest].help == r.help, f"{name}: --{dest} help differs from cli.common"
