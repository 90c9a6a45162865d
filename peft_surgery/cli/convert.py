"""``peft-surgery convert``."""

from __future__ import annotations

import click

from ..convert import convert
from .common import allow_pickle_option, echo_json, handle_errors, hub_options, json_option, maybe_push, \
    output_option, overwrite_option, quiet_option
from .common import subfolder_option


@click.command("convert")
@click.argument("input_path", metavar="IN")
@click.option("--to", "to_format", required=True, help="Target format: peft, diffusers, kohya, lycoris, mlx.")
@click.option("--from", "from_format", default="auto", show_default=True, help="Source format (default: detect).")
@click.option("--type", "to_type", default=None, type=click.Choice(["lora", "loha", "lokr"]),
              help="Convert the adapter type too (LoHa/LoKr → LoRA is lossy and reported).")
@click.option("--base", default=None, help="Base checkpoint or config to resolve module names.")
@click.option("--arch", default="auto", show_default=True, help="auto, sd1, sd2, sdxl, flux or llm.")
@click.option("--rank", type=int, default=None, help="Rank for lossy type conversions.")
@click.option("--energy", type=float, default=None, help="Retained energy fraction for lossy conversions.")
@click.option("--skip-unresolved", is_flag=True, help="Drop module names that cannot be resolved, and report them.")
@output_option()
@overwrite_option
@allow_pickle_option
@json_option
@quiet_option
@hub_options
@subfolder_option('input_path', what='IN')
@handle_errors
def convert_cmd(input_path, to_format, from_format, to_type, base, arch, rank, energy, skip_unresolved, output,
                overwrite, allow_pickle, as_json, quiet, push_to_hub, private, commit_message):
    """Convert an adapter between formats (and adapter types).

    \b
    Example:
      peft-surgery convert ./peft-adapter --to peft -o normalized
      peft-surgery convert lora.safetensors --to peft --base runwayml/stable-diffusion-v1-5 -o adapter
    """
    report = convert(input_path, output, to=to_format, from_format=from_format, to_type=to_type, base=base,
                     arch=arch, rank=rank, energy=energy, skip_unresolved=skip_unresolved, overwrite=overwrite,
                     allow_pickle=allow_pickle)
    if as_json:
        echo_json(report.to_dict())
    elif not quiet:
        click.echo(report.to_text())
    maybe_push(output, push_to_hub, private=private, commit_message=commit_message, report=report, kind="adapter",
               quiet=quiet or as_json)


commands = [convert_cmd]
