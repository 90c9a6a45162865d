"""``peft-surgery init pissa|olora|milora|to-lora``."""

from __future__ import annotations

import click

from .common import allow_pickle_option, device_option, echo_json, handle_errors, hub_options, json_option, \
    maybe_push, output_option, overwrite_option, parse_dtype, quiet_option, resolve_device
from .common import subfolder_option


@click.group("init")
def init_group() -> None:
    """Weight-aware LoRA initialisation (PiSSA, OLoRA, MiLoRA) with a residual base, and back to plain LoRA.

    \b
    Example:
      peft-surgery init pissa ./llama --rank 16 -o pissa-r16
      peft-surgery init to-lora ./trained --initial pissa-r16/adapter -o lora
    """


def _init_options(fn):
    fn = click.option("--seed", type=int, default=0, show_default=True,
                      help="Seed of the randomized SVD (--niter).")(fn)
    fn = click.option("--quantize", type=click.Choice(["nf4"]), default=None,
                      help="Store the residual NF4-quantized (QPiSSA) and report its error against QLoRA.")(fn)
    fn = click.option("--dtype", default=None, help="Adapter dtype: fp32 (default, as PEFT), fp16 or bf16. "
                                                     "The residual always keeps BASE's dtype.")(fn)
    fn = click.option("--rslora", is_flag=True, help="Scale alpha/√r instead of alpha/r (use_rslora).")(fn)
    fn = click.option("--alpha", type=float, default=None, help="lora_alpha (default: the rank, i.e. scale 1).")(fn)
    fn = click.option("--target-modules", default=None,
                      help="Comma-separated module names (PEFT list semantics: exact name or '.name' suffix), or "
                           "all-linear. Default: PEFT's default for the model type.")(fn)
    fn = click.option("--rank", "-r", type=int, default=16, show_default=True, help="Adapter rank.")(fn)
    return fn


def _run_init(method, base, rank, target_modules, alpha, rslora, dtype, quantize, seed, niter, device, output,
              overwrite, allow_pickle, as_json, quiet, push_to_hub, private, commit_message):
    from ..initialize import init_adapter

    report = init_adapter(base, output, method=method, rank=rank, target_modules=target_modules, alpha=alpha,
                          rslora=rslora, niter=niter, seed=seed, device=resolve_device(device),
                          adapter_dtype=parse_dtype(dtype), quantize=quantize, overwrite=overwrite,
                          allow_pickle=allow_pickle, progress=not quiet and not as_json)
    if as_json:
        echo_json(report.to_dict())
    elif not quiet:
        click.echo(report.to_text())
        click.echo(f"\nwrote {output}/adapter and {output}/residual")
    maybe_push(f"{output}/adapter", push_to_hub, private=private, commit_message=commit_message, report=report,
               kind="adapter", base_model=None, quiet=quiet or as_json)


def _make_init_command(method: str, summary: str, extra_help: str):
    @click.command(method, help=f"{summary}\n\n{extra_help}")
    @click.argument("base", metavar="BASE")
    @_init_options
    @device_option
    @output_option(help="Output folder (gets adapter/, residual/ and report.json).")
    @overwrite_option
    @allow_pickle_option
    @json_option
    @quiet_option
    @hub_options
    @subfolder_option("base", what="BASE")
    @handle_errors
    def cmd(base, rank, target_modules, alpha, rslora, dtype, quantize, seed, device, output, overwrite,
            allow_pickle, as_json, quiet, push_to_hub, private, commit_message, niter=None):
        _run_init(method, base, rank, target_modules, alpha, rslora, dtype, quantize, seed, niter, device, output,
                  overwrite, allow_pickle, as_json, quiet, push_to_hub, private, commit_message)

    return cmd


pissa_cmd = _make_init_command(
    "pissa",
    "PiSSA: put the rank-r principal part of each targeted weight into a LoRA adapter, the rest into a residual "
    "base (W_res = W − s·B·A).",
    "\b\nExample:\n  peft-surgery init pissa ./llama --rank 16 --target-modules q_proj,v_proj -o pissa-r16\n"
    "  peft-surgery init pissa ./llama -r 64 --target-modules all-linear --niter 16 -o pissa-fast",
)
pissa_cmd = click.option("--niter", type=int, default=None,
                         help="Randomized SVD with K power iterations (PEFT's pissa_niter_K), seeded by --seed.")(
    pissa_cmd)
olora_cmd = _make_init_command(
    "olora",
    "OLoRA: QR of each targeted weight (W = QR); B = Q[:, :r], A = R[:r], residual W − s·B·A (as PEFT defines it).",
    "\b\nExample:\n  peft-surgery init olora ./llama --rank 16 -o olora-r16",
)
milora_cmd = _make_init_command(
    "milora",
    "MiLoRA: like PiSSA, but the r minor singular components go into the adapter.",
    "\b\nExample:\n  peft-surgery init milora ./llama --rank 16 -o milora-r16",
)


@click.command("to-lora")
@click.argument("trained", metavar="TRAINED_ADAPTER")
@click.option("--initial", default=None, help="The adapter as initialised (e.g. OUT/adapter from init).")
@click.option("--base", default=None, help="The original BASE checkpoint: recompute the initial adapter (exact "
                                           "PiSSA, OLoRA, MiLoRA only).")
@click.option("--method", type=click.Choice(["pissa", "olora", "milora"]), default=None,
              help="Init method for --base (default: read from the adapter config).")
@click.option("--rank", "-r", type=int, default=None,
              help="Recompress the doubled-rank result to this rank (factored SVD) and report the error.")
@device_option
@output_option(help="Output PEFT adapter folder.")
@overwrite_option
@allow_pickle_option
@json_option
@quiet_option
@hub_options
@subfolder_option('trained', what='TRAINED_ADAPTER')
@handle_errors
def to_lora_cmd(trained, initial, base, method, rank, device, output, overwrite, allow_pickle, as_json, quiet,
                push_to_hub, private, commit_message):
    """Turn a trained PiSSA/OLoRA/MiLoRA adapter into a plain LoRA that applies to the original BASE.

    A' = [A; A0], B' = [B, −B0]: rank and alpha doubled (alpha ×√2 with rsLoRA), as PEFT's
    path_initial_model_for_weight_conversion does.

    \b
    Example:
      peft-surgery init to-lora ./trained --initial pissa-r16/adapter -o lora
      peft-surgery init to-lora ./trained --base ./llama --method pissa --rank 16 -o lora-r16
    """
    from ..initialize import to_lora

    report = to_lora(trained, output, initial=initial, base=base, method=method, rank=rank,
                     device=resolve_device(device), overwrite=overwrite, allow_pickle=allow_pickle,
                     progress=not quiet and not as_json)
    if as_json:
        echo_json(report.to_dict())
    elif not quiet:
        click.echo(report.to_text())
    maybe_push(output, push_to_hub, private=private, commit_message=commit_message, report=report, kind="adapter",
               quiet=quiet or as_json)


for _cmd in (pissa_cmd, olora_cmd, milora_cmd, to_lora_cmd):
    init_group.add_command(_cmd)

commands = [init_group]
