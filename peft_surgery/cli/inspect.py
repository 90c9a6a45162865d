"""``peft-surgery inspect``."""

from __future__ import annotations

import click

from ..describe import describe
from .common import allow_pickle_option, echo_json, format_table, handle_errors, human_bytes, json_option
from .common import subfolder_option


@click.command("inspect")
@click.argument("path")
@json_option
@click.option("--norms", is_flag=True, help="Also compute each module's ‖ΔW‖_F.")
@click.option("--format", "fmt", default="auto", show_default=True, help="Force a format instead of detecting it.")
@click.option("--base", default=None, help="Base model (checkpoint or config) to resolve flattened kohya names.")
@allow_pickle_option
@subfolder_option('path', what='PATH')
@handle_errors
def inspect_cmd(path: str, as_json: bool, norms: bool, fmt: str, base: str | None, allow_pickle: bool) -> None:
    """Describe a checkpoint or adapter: format (with evidence), modules, ranks, scales, size.

    \b
    Example:
      peft-surgery inspect ./my-adapter
      peft-surgery inspect lora.safetensors --json --norms
    """
    options = {"base": base} if base else {}
    info = describe(path, norms=norms, allow_pickle=allow_pickle, format=fmt, **options)
    if as_json:
        echo_json(info)
        return
    click.echo(f"{path}")
    click.echo(f"  format:      {info['format']}")
    for ev in info.get("evidence", []):
        click.echo(f"    evidence:  {ev}")
    if info["format"] == "checkpoint":
        click.echo(f"  tensors:     {info['num_tensors']} in {info['num_files']} file(s)")
        click.echo(f"  parameters:  {info['num_params']:,}")
        click.echo(f"  dtypes:      {info['dtypes']}")
        return
    click.echo(f"  base model:  {info['base_model']}")
    click.echo(f"  modules:     {info['num_modules']} {info['module_types']}")
    click.echo(f"  parameters:  {info['num_params']:,}")
    click.echo(f"  dtypes:      {info['dtypes']}")
    if info["modules_to_save"]:
        click.echo(f"  modules_to_save: {', '.join(info['modules_to_save'])}")
    headers = ["module", "rank", "scale"] + (["‖ΔW‖_F"] if norms else [])
    rows = []
    for name, rank in info["ranks"].items():
        row = [name, rank, info["scales"][name]]
        if norms:
            n = info["norms"][name]
            row.append("(DoRA: needs base)" if n is None else n)
        rows.append(row)
    click.echo("")
    click.echo(format_table(headers, rows, max_rows=60))


commands = [inspect_cmd]
