"""``peft-surgery quantize``, ``dequantize`` and ``quant-error`` (NF4/FP4, bitsandbytes layout)."""

from __future__ import annotations

import click

from .common import (
    allow_pickle_option,
    device_option,
    echo_json,
    handle_errors,
    hub_options,
    json_option,
    maybe_push,
    output_option,
    overwrite_option,
    parse_dtype,
    quiet_option,
    resolve_device,
)
from ..report import require_matplotlib
from .common import subfolder_option


def _split(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def _emit(report, as_json: bool, quiet: bool, report_path: str | None = None, plot: str | None = None) -> None:
    from ..quantize import plot_error_report

    if report_path:
        report.save_json(report_path)
    if plot:
        plot_error_report(report, plot)
    if as_json:
        echo_json(report.to_dict())
    elif not quiet:
        click.echo(report.to_text())


blocksize_option = click.option("--blocksize", type=int, default=64, show_default=True,
                                help="Elements per absmax block (transformers always uses 64).")
dq_option = click.option("--double-quant/--no-double-quant", default=True, show_default=True,
                         help="Quantize the block scales again (8-bit, blocks of 256): 4.127 instead of 4.5 bits/param.")
skip_option = click.option("--skip", default=None, metavar="NAMES",
                           help="Comma-separated module names/patterns to keep unquantized, in addition to the "
                                "defaults (output head, tied weights); written to llm_int8_skip_modules.")
plot_option = click.option("--plot", default=None, metavar="FILE.png",
                           help="Draw the relative error per tensor for each method (needs matplotlib).")


@click.command("quantize")
@click.argument("model", metavar="MODEL")
@output_option(help="Output folder.")
@click.option("--quant-type", type=click.Choice(["nf4", "fp4"]), default="nf4", show_default=True)
@dq_option
@blocksize_option
@click.option("--compute-dtype", default="bf16", show_default=True, help="bnb_4bit_compute_dtype: bf16, fp16 or fp32.")
@click.option("--quant-storage", default="uint8", show_default=True,
              help="bnb_4bit_quant_storage (e.g. bfloat16 for FSDP-QLoRA); the packed bytes are viewed as it.")
@skip_option
@click.option("--report", "report_path", default=None, metavar="FILE.json",
              help="Also measure the error per tensor (NF4, FP4 and int4 side by side) and save it as JSON.")
@plot_option
@click.option("--max-shard-size", default="5GB", show_default=True)
@device_option
@overwrite_option
@allow_pickle_option
@json_option
@quiet_option
@hub_options
@subfolder_option('model', what='MODEL')
@handle_errors
def quantize_cmd(model, output, quant_type, double_quant, blocksize, compute_dtype, quant_storage, skip, report_path,
                 plot, max_shard_size, device, overwrite, allow_pickle, as_json, quiet, push_to_hub, private,
                 commit_message):
    """Quantize a model checkpoint to bitsandbytes NF4/FP4 (loadable with transformers + bitsandbytes).

    Every linear weight is written as bitsandbytes' Linear4bit saves it (packed codes, absmax, quant_map,
    nested_absmax, nested_quant_map, quant_state JSON) and config.json gets a matching quantization_config.
    Embeddings, norms and the output head stay unquantized. No GPU and no bitsandbytes are needed.

    \b
    Example:
      peft-surgery quantize ./llama-7b -o llama-7b-nf4
      peft-surgery quantize ./llama-7b -o llama-7b-fp4 --quant-type fp4 --no-double-quant --report err.json
    """
    from ..quantize import quantize_checkpoint

    if plot:
        require_matplotlib()  # fail before writing the model, not after
    want_errors = bool(report_path or plot)
    report = quantize_checkpoint(model, output, quant_type=quant_type, double_quant=double_quant,
                                 blocksize=blocksize, compute_dtype=compute_dtype, quant_storage=quant_storage,
                                 skip=_split(skip), device=resolve_device(device), error_report=want_errors,
                                 max_shard_size=max_shard_size, overwrite=overwrite, allow_pickle=allow_pickle,
                                 progress=not quiet and not as_json)
    _emit(report, as_json, quiet, report_path, plot)
    maybe_push(output, push_to_hub, private=private, commit_message=commit_message, report=report, kind="model",
               base_model=model, quiet=quiet)


@click.command("dequantize")
@click.argument("qmodel", metavar="QMODEL")
@output_option(help="Output folder.")
@click.option("--dtype", default=None, help="Output dtype: fp32, fp16 or bf16 (default: as recorded per weight).")
@click.option("--max-shard-size", default="5GB", show_default=True)
@device_option
@overwrite_option
@allow_pickle_option
@json_option
@quiet_option
@hub_options
@subfolder_option('qmodel', what='QMODEL')
@handle_errors
def dequantize_cmd(qmodel, output, dtype, max_shard_size, device, overwrite, allow_pickle, as_json, quiet,
                   push_to_hub, private, commit_message):
    """Turn a bitsandbytes 4-bit checkpoint (ours or one saved by transformers) back into a plain one.

    \b
    Example:
      peft-surgery dequantize llama-7b-nf4 -o llama-7b-dequant --dtype bf16
    """
    from ..quantize import dequantize_checkpoint

    report = dequantize_checkpoint(qmodel, output, dtype=parse_dtype(dtype), device=resolve_device(device),
                                   max_shard_size=max_shard_size, overwrite=overwrite, allow_pickle=allow_pickle,
                                   progress=not quiet and not as_json)
    if as_json:
        echo_json(report.to_dict())
    elif not quiet:
        click.echo(report.to_text(max_rows=20))
    maybe_push(output, push_to_hub, private=private, commit_message=commit_message, report=report, kind="model",
               base_model=qmodel, quiet=quiet)


@click.command("quant-error")
@click.argument("model", metavar="MODEL")
@click.option("--methods", default="nf4,fp4,int4", show_default=True,
              help="Comma-separated, first is the primary: nf4, fp4, int4 (symmetric absmax).")
@dq_option
@blocksize_option
@skip_option
@click.option("--top", type=int, default=10, show_default=True, help="How many worst tensors to list.")
@click.option("--report", "report_path", default=None, metavar="FILE.json", help="Save the report as JSON.")
@plot_option
@device_option
@allow_pickle_option
@json_option
@quiet_option
@subfolder_option('model', what='MODEL')
@handle_errors
def quant_error_cmd(model, methods, double_quant, blocksize, skip, top, report_path, plot, device, allow_pickle,
                    as_json, quiet):
    """Measure 4-bit quantization error per tensor without writing a model: MSE, relative Frobenius error,
    SQNR, max |error| and bits/param, for NF4, FP4 and int4-absmax side by side.

    \b
    Example:
      peft-surgery quant-error ./llama-7b --plot err.png
      peft-surgery quant-error ./llama-7b --methods nf4,int4 --no-double-quant --json
    """
    from ..quantize import quant_error_report

    if plot:
        require_matplotlib()  # fail before the (long) measurement, not after
    report = quant_error_report(model, methods=_split(methods), double_quant=double_quant, blocksize=blocksize,
                                skip=_split(skip), device=resolve_device(device), top=top, allow_pickle=allow_pickle,
                                progress=not quiet and not as_json)
    _emit(report, as_json, quiet, report_path, plot)


commands = [quantize_cmd, dequantize_cmd, quant_error_cmd]
