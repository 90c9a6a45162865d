"""Shared CLI plumbing: consistent options, one-line errors, JSON/table output."""

from __future__ import annotations

import functools
import json
import math
import shlex
import sys
from typing import Any, Callable, Iterable, Sequence

import click

from ..errors import SurgeryError
from ..report import format_cell


def output_option(required: bool = True, help: str = "Output path.") -> Callable:
    return click.option("-o", "--output", "output", type=click.Path(), required=required, help=help)


overwrite_option = click.option("--overwrite", is_flag=True, help="Replace an existing output.")
allow_pickle_option = click.option(
    "--allow-pickle", is_flag=True, help="Allow legacy .bin/.pt pickles (loaded with torch.load(weights_only=True))."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def _quiet_callback(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:  # also silence huggingface_hub's download/upload progress bars
        try:
            from huggingface_hub.utils import disable_progress_bars
        except ImportError:  # pragma: no cover
            return value
        disable_progress_bars()
    return value


quiet_option = click.option("-q", "--quiet", is_flag=True, callback=_quiet_callback,
                            help="No progress bars or tables; errors only.")
device_option = click.option(
    "--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto (GPU when present)."
)
dtype_option = click.option("--dtype", default=None, help="Output dtype: fp32, fp16 or bf16 (default: keep).")


def handle_errors(fn: Callable) -> Callable:
    """Turn user errors into one line on stderr and a non-zero exit; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SurgeryError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except FileNotFoundError as exc:
            click.echo(f"Error: {exc.filename}: no such file or folder", err=True)
            sys.exit(2)
        except PermissionError as exc:
            click.echo(f"Error: {exc.filename}: permission denied", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("Interrupted; no output was written.", err=True)
            sys.exit(130)
        except MemoryError:
            click.echo("Error: out of memory (try --device cpu, a smaller --rank, or --svd randomized)", err=True)
            sys.exit(3)

    return wrapper


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SurgeryError(f"--device {device} requested but CUDA is not available")
    return device


def parse_dtype(name: str | None):
    import torch

    if name is None:
        return None
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp64": torch.float64}
    try:
        return table[name.lower()]
    except KeyError:
        raise SurgeryError(f"unknown dtype '{name}' (use fp32, fp16 or bf16)") from None


def parse_floats(text: str | None, what: str = "weights") -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SurgeryError(f"--{what} must be comma-separated numbers, got '{text}'") from None


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=_json_default))


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], max_rows: int | None = None) -> str:
    rows = [[format_cell(c) for c in r] for r in rows]
    shown = rows if max_rows is None or len(rows) <= max_rows else rows[:max_rows]
    widths = [len(h) for h in headers]
    for r in shown:
        widths = [max(w, len(c)) for w, c in zip(widths, r)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in shown]
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more rows (use --json for all)")
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def hub_options(fn: Callable) -> Callable:
    """--push-to-hub REPO_ID [--private] [--commit-message] for commands that write an adapter or model."""
    fn = click.option("--commit-message", default=None, help="Commit message for --push-to-hub.")(fn)
    fn = click.option("--private", is_flag=True, help="Create the Hub repo as private (with --push-to-hub).")(fn)
    fn = click.option("--push-to-hub", "push_to_hub", default=None, metavar="REPO_ID",
                      help="Upload the result to this Hugging Face Hub repo (with a generated model card).")(fn)
    return fn


def maybe_push(output: str, push_to_hub: str | None, *, private: bool = False, commit_message: str | None = None,
               report: Any = None, kind: str = "adapter", base_model: str | None = None, quiet: bool = False) -> None:
    """Push ``output`` to the Hub when ``--push-to-hub`` was given (model card with the command and report)."""
    if not push_to_hub:
        return
    from ..hub import push_folder

    url = push_folder(output, push_to_hub, private=private, commit_message=commit_message, report=report,
                      kind=kind, base_model=base_model, command=shlex.join(["peft-surgery", *sys.argv[1:]]))
    if not quiet:
        click.echo(f"pushed to {url}")


def with_subfolder(location: str, subfolder: str | None) -> str:
    """``location`` narrowed to ``subfolder``: a local path gets ``/subfolder``; a Hub id ``org/name[@rev]``
    (or ``hf://…``) becomes ``hf://org/name[@rev]/subfolder``."""
    if not subfolder:
        return location
    from pathlib import Path

    from ..checkpoint import is_hub_id, parse_hf_url

    parsed = parse_hf_url(location)
    if parsed is not None:
        repo, path = parsed
        return f"hf://{repo}/" + "/".join(x for x in (path, subfolder.strip("/")) if x)
    if is_hub_id(location):
        return f"hf://{location}/{subfolder.strip('/')}"
    return str(Path(location) / subfolder)


def subfolder_option(*arguments: str, what: str = "the input") -> Callable:
    """Add ``--subfolder`` to a command: it narrows the named arguments (local folders or Hub repos) to a
    sub-folder, e.g. ``unet`` of a diffusers pipeline."""

    def decorator(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, subfolder: str | None = None, **kwargs: Any) -> Any:
            if subfolder:
                for name in arguments:
                    value = kwargs.get(name)
                    if isinstance(value, (list, tuple)):
                        kwargs[name] = type(value)(with_subfolder(v, subfolder) for v in value)
                    elif value is not None:
                        kwargs[name] = with_subfolder(value, subfolder)
            return fn(*args, **kwargs)

        return click.option("--subfolder", default=None, metavar="DIR",
                            help=f"Read {what} from this sub-folder of a local folder or Hub repo (e.g. unet).")(wrapper)

    return decorator
