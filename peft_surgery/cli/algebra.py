"""``peft-surgery merge | unmerge | combine | rescale | resize``: adapter algebra (logic in peft_surgery.algebra)."""

from __future__ import annotations

import click

from .common import allow_pickle_option, device_option, echo_json, handle_errors, hub_options, json_option, \
    maybe_push, output_option, overwrite_option, parse_floats, quiet_option, resolve_device

weights_option = click.option("--weights", default=None, metavar="W1,W2,…",
                              help="One weight per adapter, comma-separated (default: all 1.0).")
format_option = click.option("--format", "out_format", default="peft", show_default=True,
                             help="Output adapter format (peft, diffusers, kohya, lycoris, mlx, …).")
from .common import subfolder_option


def _emit(report, as_json: bool, quiet: bool) -> None:
    if as_json:
        echo_json(report.to_dict())
    elif not quiet:
        click.echo(report.to_text())


@click.command("merge")
@click.argument("base", metavar="BASE")
@click.argument("adapters", metavar="ADAPTER...", nargs=-1, required=True)
@weights_option
@device_option
@output_option(help="Output checkpoint (same layout as BASE: file, sharded folder or pipeline folder).")
@overwrite_option
@allow_pickle_option
@json_option
@quiet_option
@hub_options
@subfolder_option('base', what='BASE')
@handle_errors
def merge_cmd(base, adapters, weights, device, output, overwrite, allow_pickle, as_json, quiet, push_to_hub, private,
              commit_message):
    """Merge one or more adapters into BASE and write a full checkpoint laid out like BASE.

    Streams one tensor at a time; W' = W + Σ wᵢ·ΔWᵢ in float32, cast once to each tensor's dtype.
    Works for LoRA (incl. rsLoRA, conv, embedding, fan_in_fan_out), LoHa, LoKr and DoRA; modules_to_save
    tensors replace the base's. Shards, index, dtypes and side files (config, tokenizer, …) follow BASE.

    \b
    Example:
      peft-surgery merge ./llama ./adapter -o llama-merged
      peft-surgery merge ./sdxl-pipeline style.safetensors detail/ --weights 0.8,0.5 -o sdxl-merged
    """
    from ..algebra import merge

    report = merge(base, list(adapters), output, weights=parse_floats(weights), overwrite=overwrite,
                   allow_pickle=allow_pickle, device=resolve_device(device), progress=not (quiet or as_json))
    _emit(report, as_json, quiet)
    maybe_push(output, push_to_hub, private=private, commit_message=commit_message, report=report, kind="model",
               base_model=str(base), quiet=quiet or as_json)


@click.command("unmerge")
@click.argument("merged", metavar="MERGED")
@click.argument("adapters", metavar="ADAPTER...", nargs=-1, required=True)
@weights_option
@click.option("--ignore-modules-to-save", is_flag=True,
              help="Leave tensors the adapter replaced (modules_to_save) as they are instead of failing.")
@device_option
@output_option(help="Output checkpoint (same layout as MERGED).")
@overwrite_option
@allow_pickle_option
@json_option
@quiet_option
@hub_options
@subfolder_option('merged', what='MERGED')
@handle_errors
def unmerge_cmd(merged, adapters, weights, ignore_modules_to_save, device, output, overwrite, allow_pickle, as_json,
                quiet, push_to_hub, private, commit_message):
    """Subtract adapters from a merged checkpoint again (W = W' − Σ wᵢ·ΔWᵢ, in reverse order).

    DoRA cannot be unmerged from a checkpoint alone (the merge rescaled rows by norms only the original
    base knows): that is refused with an error.

    \b
    Example:
      peft-surgery unmerge llama-merged ./adapter -o llama-base
    """
    from ..algebra import unmerge

    report = unmerge(merged, list(adapters), output, weights=parse_floats(weights), overwrite=overwrite,
                     allow_pickle=allow_pickle, device=resolve_device(device), progress=not (quiet or as_json),
                     ignore_modules_to_save=ignore_modules_to_save)
    _emit(report, as_json, quiet)
    maybe_push(output, push_to_hub, private=private, commit_message=commit_message, report=report, kind="model",
               quiet=quiet or as_json)


@click.command("combine")
@click.argument("adapters", metavar="ADAPTER...", nargs=-1, required=True)
@click.option("--method", type=click.Choice(["stack", "svd", "linear", "ties", "dare", "dare_ties"]),
              default="stack", show_default=True,
              help="stack: exact rank concat; svd: best rank-N of the sum (from factors); linear: the exact sum "
                   "re-factored, rank capped by --rank; ties/dare/dare_ties: on ΔW, seeded.")
@weights_option
@click.option("--rank", type=int, default=None, help="Output rank (svd: default the largest input rank; linear: cap).")
@click.option("--energy", type=float, default=None,
              help="Per-module rank: keep this fraction of ‖ΔW‖² (instead of --rank).")
@click.option("--density", type=float, default=0.5, show_default=True, help="ties/dare: fraction of entries kept.")
@click.option("--majority", type=click.Choice(["total", "frequency"]), default="total", show_default=True,
              help="ties/dare_ties sign election.")
@click.option("--seed", type=int, default=0, show_default=True, help="dare: seed of the random drop.")
@device_option
@format_option
@output_option(help="Output adapter.")
@overwrite_option
@allow_pickle_option
@json_option
@quiet_option
@hub_options
@subfolder_option('adapters', what='every ADAPTER')
@handle_errors
def combine_cmd(adapters, method, weights, rank, energy, density, majority, seed, device, out_format, output,
                overwrite, allow_pickle, as_json, quiet, push_to_hub, private, commit_message):
    """Combine adapters for the same base into one adapter: ΔW = Σ wᵢ·ΔWᵢ (each scale applied once).

    Mixed types (LoRA + LoHa/LoKr) go through the dense ΔW and are reported.

    \b
    Example:
      peft-surgery combine style/ subject/ --method stack --weights 1.0,0.7 -o both
      peft-surgery combine a/ b/ c/ --method svd --rank 32 -o abc-r32
      peft-surgery combine a/ b/ --method ties --density 0.3 -o ab-ties
    """
    from ..algebra import combine

    report = combine(list(adapters), output, method=method, weights=parse_floats(weights), rank=rank, energy=energy,
                     density=density, seed=seed, majority=majority, format=out_format, overwrite=overwrite,
                     allow_pickle=allow_pickle, progress=not (quiet or as_json), device=resolve_device(device))
    _emit(report, as_json, quiet)
    maybe_push(output, push_to_hub, private=private, commit_message=commit_message, report=report, kind="adapter",
               quiet=quiet or as_json)


@click.command("rescale")
@click.argument("adapter", metavar="ADAPTER")
@click.option("--to-rslora", is_flag=True, help="Same ΔW, expressed as rsLoRA (alpha = s·√r).")
@click.option("--to-lora", is_flag=True, help="Same ΔW, expressed as plain LoRA (alpha = s·r).")
@click.option("--alpha", type=float, default=None, help="New alpha; B compensates so ΔW is unchanged.")
@click.option("--config-only", is_flag=True, help="With --alpha: change only alpha (ΔW changes by new/old scale).")
@click.option("--strength", type=float, default=None, help="Multiply ΔW by this factor (through B).")
@click.option("--fold-scale", is_flag=True, help="Fold the scale into B and write alpha = r (scale 1).")
@format_option
@output_option(help="Output adapter.")
@overwrite_option
@allow_pickle_option
@json_option
@quiet_option
@hub_options
@subfolder_option('adapter', what='ADAPTER')
@handle_errors
def rescale_cmd(adapter, to_rslora, to_lora, alpha, config_only, strength, fold_scale, out_format, output, overwrite,
                allow_pickle, as_json, quiet, push_to_hub, private, commit_message):
    """Restate an adapter's scaling: LoRA ↔ rsLoRA, a new alpha, a strength, or the scale folded into B.

    ΔW is unchanged except under --strength (or --alpha --config-only). Per-module ranks and alphas are
    written as rank_pattern / alpha_pattern.

    \b
    Example:
      peft-surgery rescale adapter/ --to-rslora -o adapter-rs
      peft-surgery rescale lora.safetensors --fold-scale --format kohya -o lora-folded.safetensors
      peft-surgery rescale adapter/ --strength 0.6 -o adapter-weak
    """
    from ..algebra import rescale

    report = rescale(adapter, output, to_rslora=to_rslora, to_lora=to_lora, alpha=alpha, strength=strength,
                     fold_scale=fold_scale, config_only=config_only, format=out_format, overwrite=overwrite,
                     allow_pickle=allow_pickle)
    _emit(report, as_json, quiet)
    maybe_push(output, push_to_hub, private=private, commit_message=commit_message, report=report, kind="adapter",
               quiet=quiet or as_json)


@click.command("resize")
@click.argument("adapter", metavar="ADAPTER")
@click.option("--rank", type=int, default=None, help="New rank (modules already at or below it are kept).")
@click.option("--energy", type=float, default=None,
              help="Per-module rank: the smallest k keeping this fraction of ‖ΔW‖²_F (0 < F ≤ 1).")
@click.option("--sv-ratio", type=float, default=None, help="Per-module rank: keep singular values ≥ S₀/T.")
@click.option("--max-rank", type=int, default=None, help="Cap for --energy / --sv-ratio.")
@device_option
@format_option
@output_option(help="Output adapter.")
@overwrite_option
@allow_pickle_option
@json_option
@quiet_option
@hub_options
@subfolder_option('adapter', what='ADAPTER')
@handle_errors
def resize_cmd(adapter, rank, energy, sv_ratio, max_rank, device, out_format, output, overwrite, allow_pickle,
               as_json, quiet, push_to_hub, private, commit_message):
    """Optimal lower-rank LoRA (Eckart–Young) from the factors, with a per-module retained-energy report.

    Like kohya's resize_lora but without the dense ΔW and without its off-by-one in rank selection.

    \b
    Example:
      peft-surgery resize adapter/ --rank 8 -o adapter-r8
      peft-surgery resize lora.safetensors --energy 0.95 --max-rank 32 -o lora-dyn
    """
    from ..algebra import resize

    report = resize(adapter, output, rank=rank, energy=energy, sv_ratio=sv_ratio, max_rank=max_rank,
                    device=resolve_device(device), format=out_format, overwrite=overwrite, allow_pickle=allow_pickle,
                    progress=not (quiet or as_json))
    _emit(report, as_json, quiet)
    maybe_push(output, push_to_hub, private=private, commit_message=commit_message, report=report, kind="adapter",
               quiet=quiet or as_json)


commands = [merge_cmd, unmerge_cmd, combine_cmd, rescale_cmd, resize_cmd]
