"""``peft-surgery extract``."""

from __future__ import annotations

import click

from ..extract import default_output_name, extract, plot_report
from ..report import require_matplotlib
from .common import allow_pickle_option, device_option, dtype_option, echo_json, handle_errors, human_bytes, \
    hub_options, json_option, maybe_push, output_option, overwrite_option, parse_dtype, quiet_option


@click.command("extract")
@click.argument("base", metavar="BASE")
@click.argument("finetuned", metavar="FT")
@click.option("--rank", "-r", type=int, default=None, help="Fixed LoRA rank for every module (default 16).")
@click.option("--energy", type=float, default=None,
              help="Per-module rank: smallest rank keeping this fraction of ‖ΔW‖_F² (e.g. 0.95).")
@click.option("--sv-ratio", type=float, default=None, help="Per-module rank: keep singular values ≥ σ₁ / RATIO.")
@click.option("--param-budget", type=int, default=None,
              help="Global budget in parameters, allocated across modules to minimise total squared error.")
@click.option("--size", default=None, help="Global budget as an adapter size, e.g. 50MB (uses the output dtype).")
@click.option("--max-rank", type=int, default=None, help="Cap every module's rank.")
@click.option("--svd", type=click.Choice(["auto", "exact", "randomized"]), default="auto", show_default=True,
              help="SVD solver; auto = randomized when the rank is small against the matrix.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@click.option("--alpha", type=float, default=None, help="lora_alpha to write (default: alpha = rank, scale 1).")
@click.option("--rslora", is_flag=True, help="Write use_rslora (scale = alpha/√r).")
@click.option("--distribute-scale", is_flag=True,
              help="Split singular values as √S into A and B (default: all in B).")
@click.option("--embed-lora", is_flag=True, help="LoRA on embeddings/lm_head instead of saving them whole.")
@click.option("--skip-1d", is_flag=True, help="Leave out changed 1-D tensors (norms, biases).")
@click.option("--skip-mismatched", is_flag=True, help="Skip tensors whose names or shapes differ, and report them.")
@click.option("--include", multiple=True, metavar="REGEX", help="Only tensors matching this regex (repeatable).")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Skip tensors matching this regex (repeatable).")
@click.option("--min-diff", type=float, default=0.0, show_default=True,
              help="Treat a tensor as unchanged when max|FT − BASE| ≤ this.")
@click.option("--subfolder", default=None, help="Read both models from this sub-folder (e.g. unet).")
@click.option("--format", "fmt", default="peft", show_default=True, help="Output format (peft, kohya, diffusers, …).")
@click.option("--report", "report_path", default=None, type=click.Path(), help="Write the report as JSON here.")
@click.option("--plot", "plot_path", default=None, type=click.Path(),
              help="Write a PNG of per-module error and spectra (needs matplotlib).")
@output_option(required=False, help="Output adapter folder (default: <FT name>-lora-r<rank>).")
@overwrite_option
@dtype_option
@device_option
@allow_pickle_option
@json_option
@quiet_option
@hub_options
@handle_errors
def extract_cmd(base, finetuned, rank, energy, sv_ratio, param_budget, size, max_rank, svd, seed, alpha, rslora,
                distribute_scale, embed_lora, skip_1d, skip_mismatched, include, exclude, min_diff, subfolder, fmt,
                report_path, plot_path, output, overwrite, dtype, device, allow_pickle, as_json, quiet, push_to_hub,
                private, commit_message):
    """Extract a LoRA adapter from a full fine-tune: FT − BASE → truncated SVD.

    BASE and FT are local folders, .safetensors files or Hub ids. Tensors are streamed one pair at a time.
    Identical models give no adapter: a warning, nothing written, exit status 0.

    \b
    Example:
      peft-surgery extract ./llama-base ./llama-ft --rank 16 -o llama-ft-lora
      peft-surgery extract BASE FT --energy 0.9 --max-rank 64 --report report.json
      peft-surgery extract BASE FT --size 50MB --plot spectra.png
    """
    if plot_path:
        require_matplotlib()  # fail before the work, not after
    if output is None:
        output = default_output_name(finetuned, rank=rank, energy=energy, sv_ratio=sv_ratio,
                                     param_budget=param_budget, size=size)
    adapter, report = extract(
        base, finetuned, output, format=fmt, overwrite=overwrite, rank=rank, energy=energy, sv_ratio=sv_ratio,
        param_budget=param_budget, size=size, max_rank=max_rank, svd=svd, seed=seed, alpha=alpha, rslora=rslora,
        distribute_scale=distribute_scale, embed_lora=embed_lora, skip_1d=skip_1d,
        skip_mismatched=skip_mismatched, include=include, exclude=exclude, min_diff=min_diff,
        dtype=parse_dtype(dtype), device=device, allow_pickle=allow_pickle, subfolder=subfolder,
        progress=not quiet and not as_json)
    if report_path:
        report.save_json(report_path)
    if plot_path:
        plot_report(report, plot_path)
    if not report.written:
        click.echo(f"Warning: {finetuned} and {base} have no differing tensors; the adapter would be empty, so "
                   "nothing was written.", err=True)
    if as_json:
        echo_json(report.to_dict())
    elif not quiet:
        click.echo(report.to_text())
        if report.written:
            t = report.totals
            click.echo(f"wrote {output} ({human_bytes(t['adapter_bytes'])}, {t['lora_modules']} LoRA modules, "
                       f"{t['full_tensors']} full tensors)")
    if report.written:
        maybe_push(str(output), push_to_hub, private=private, commit_message=commit_message, report=report,
                   kind="adapter", base_model=base, quiet=quiet or as_json)


commands = [extract_cmd]
