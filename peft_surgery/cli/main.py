"""The ``peft-surgery`` console script."""

from __future__ import annotations

import importlib

import click

from .. import __version__

# Each module defines ``commands``: a list of click commands to register.
COMMAND_MODULES = ("inspect", "convert", "extract", "init", "algebra", "quantize", "hub")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="peft-surgery")
def cli() -> None:
    """Model surgery and adapter-format conversion on checkpoint tensors.

    \b
    Examples:
      peft-surgery inspect ./my-adapter --json
      peft-surgery extract BASE FT --rank 16 -o adapter
      peft-surgery convert lora.safetensors --to peft -o adapter
    """


for _name in COMMAND_MODULES:
    try:
        _mod = importlib.import_module(f"{__package__}.{_name}")
    except ModuleNotFoundError as _exc:  # a command module not written yet
        if _exc.name != f"{__package__}.{_name}":
            raise
        continue
    for _cmd in _mod.commands:
        cli.add_command(_cmd)


def main() -> None:
    cli(prog_name="peft-surgery")


if __name__ == "__main__":
    main()
