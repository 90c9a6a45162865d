"""The library API: the command-line operations as functions on the canonical objects.

``import peft_surgery as ps`` re-exports everything here. Each function is a thin wrapper over the module that
implements the operation (the CLI calls the same modules), takes local paths or Hub repo ids
(``org/name[@revision]``) wherever a checkpoint or adapter is read, and returns the canonical
:class:`~peft_surgery.adapter.Adapter` and/or a report dataclass (``.to_json()``, ``.to_markdown()``).

Every example below runs as a doctest on tiny tensors made on the spot.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

from .adapter import Adapter
from .checkpoint import Checkpoint

if TYPE_CHECKING:  # imported lazily at call time: keeps `import peft_surgery.api` light
    from .algebra import CombineReport, MergeReport
    from .convert import ConvertReport
    from .extract import ExtractReport
    from .hub import PushResult
    from .initialize import InitReport
    from .quantize import QuantReport

PathLike = str | os.PathLike


def load_adapter(path_or_id: PathLike | Checkpoint, *, format: str = "auto", allow_pickle: bool = False,
                 subfolder: str | None = None, revision: str | None = None, **reader_options: Any) -> Adapter:
    """Read an adapter in any supported format (detected, or named by ``format``) into an :class:`Adapter`.

    ``path_or_id`` is a file, a folder or a Hub repo id (``org/name`` or ``org/name@revision``; offline
    from the cache with ``HF_HUB_OFFLINE=1``). ``reader_options`` go to the format's reader (e.g. ``base=``
    to resolve kohya names against a base model).

    >>> import tempfile, torch, peft_surgery as ps
    >>> tmp = tempfile.mkdtemp()
    >>> lora = ps.LoRA(down=torch.ones(2, 8), up=torch.full((6, 2), 0.5))
    >>> ps.Adapter({"model.layers.0.self_attn.q_proj": ps.AdapterModule(lora, scale=2.0)}).save(f"{tmp}/a")
    []
    >>> adapter = ps.load_adapter(f"{tmp}/a")
    >>> adapter.source_format, adapter.ranks()
    ('peft', {'model.layers.0.self_attn.q_proj': 2})
    >>> adapter["model.layers.0.self_attn.q_proj"].delta_weight()[0, :3]  # scale · up @ down
    tensor([2., 2., 2.])
    """
    from .formats import load_adapter as _load

    return _load(path_or_id, format=format, allow_pickle=allow_pickle, subfolder=subfolder, revision=revision,
                 **reader_options)


def load_checkpoint(path_or_id: PathLike, *, allow_pickle: bool = False, subfolder: str | None = None,
                    revision: str | None = None) -> Checkpoint:
    """Open a model checkpoint lazily: a ``.safetensors`` file, a (sharded) folder or a Hub repo id.

    Tensors are read one at a time (``ckpt[key]``); ``shape``/``dtype`` come from the header without reading data.

    >>> import tempfile, torch, peft_surgery as ps
    >>> from safetensors.torch import save_file
    >>> path = f"{tempfile.mkdtemp()}/model.safetensors"
    >>> save_file({"fc.weight": torch.eye(3), "fc.bias": torch.zeros(3)}, path)
    >>> ckpt = ps.load_checkpoint(path)
    >>> sorted(ckpt.keys()), ckpt.shape("fc.weight"), ckpt["fc.weight"].trace().item()
    (['fc.bias', 'fc.weight'], (3, 3), 3.0)
    """
    return Checkpoint.open(path_or_id, allow_pickle=allow_pickle, subfolder=subfolder, revision=revision)


def save_adapter(adapter: Adapter, path: PathLike, *, format: str = "peft", overwrite: bool = False,
                 **writer_options: Any) -> list[str]:
    """Write ``adapter`` atomically in ``format`` (same as ``adapter.save(path, format=...)``).

    Returns the writer's notes about anything it had to transform to fit the format.

    >>> import os, tempfile, torch, peft_surgery as ps
    >>> tmp = tempfile.mkdtemp()
    >>> a = ps.Adapter({"model.layers.0.mlp.up_proj": ps.AdapterModule(ps.LoRA(torch.ones(1, 4), torch.ones(4, 1)))})
    >>> ps.save_adapter(a, f"{tmp}/out")
    []
    >>> sorted(os.listdir(f"{tmp}/out"))
    ['adapter_config.json', 'adapter_model.safetensors']
    """
    from .formats import save_adapter as _save

    return _save(adapter, path, format=format, overwrite=overwrite, **writer_options)


def extract(base: PathLike | Checkpoint, finetuned: PathLike | Checkpoint, *, rank: int | None = None,
            energy: float | None = None, output: PathLike | None = None, format: str = "peft",
            device: str = "auto", overwrite: bool = False, **options: Any) -> "tuple[Adapter, ExtractReport]":
    """Extract a LoRA approximating ``finetuned − base``: the optimal rank-``rank`` (Eckart–Young) factors.

    Give one of ``rank`` (default 16), ``energy``, ``sv_ratio``, ``param_budget`` or ``size``; other options
    (``svd=``, ``alpha=``, ``include=``, ``exclude=``, ...) are those of ``peft-surgery extract``. Returns
    ``(adapter, report)``, the report holding each module's relative error ‖ΔW − BA‖/‖ΔW‖. With ``output``
    the adapter is also written (in ``format``).

    >>> import tempfile, torch, peft_surgery as ps
    >>> from safetensors.torch import save_file
    >>> tmp = tempfile.mkdtemp()
    >>> g = torch.Generator().manual_seed(0)
    >>> w = torch.randn(32, 32, generator=g)
    >>> update = 0.1 * torch.randn(32, 2, generator=g) @ torch.randn(2, 32, generator=g)  # a rank-2 fine-tune
    >>> save_file({"model.layers.0.self_attn.q_proj.weight": w}, f"{tmp}/base.safetensors")
    >>> save_file({"model.layers.0.self_attn.q_proj.weight": w + update}, f"{tmp}/ft.safetensors")
    >>> adapter, report = ps.extract(f"{tmp}/base.safetensors", f"{tmp}/ft.safetensors", rank=4, device="cpu")
    >>> adapter.ranks()
    {'model.layers.0.self_attn.q_proj': 4}
    >>> report.totals["max_rel_error"] < 1e-5  # rank 4 ≥ the update's rank 2: recovered exactly
    True
    >>> torch.allclose(adapter["model.layers.0.self_attn.q_proj"].delta_weight(), update, atol=1e-5)
    True
    """
    from .extract import extract as _extract

    return _extract(base, finetuned, output, format=format, overwrite=overwrite, rank=rank, energy=energy,
                    device=device, **options)


def convert(adapter_or_path: Adapter | PathLike, output: PathLike, *, to: str = "peft", from_format: str = "auto",
            to_type: str | None = None, base: str | None = None, rank: int | None = None,
            overwrite: bool = False, **options: Any) -> "ConvertReport":
    """Convert an adapter (a path, a Hub id or an :class:`Adapter`) to format ``to``, written to ``output``.

    ``to_type`` also converts the adapter type (``lora``/``loha``/``lokr``; lossy conversions are reported).
    Same as ``peft-surgery convert``; returns the conversion report.

    >>> import tempfile, torch, peft_surgery as ps
    >>> tmp = tempfile.mkdtemp()
    >>> a = ps.Adapter({"model.layers.0.self_attn.v_proj": ps.AdapterModule(ps.LoRA(torch.ones(2, 8), torch.ones(8, 2)))})
    >>> report = ps.convert(a, f"{tmp}/converted", to="peft")
    >>> report.target_format, report.totals["modules"]
    ('peft', 1)
    >>> '"target_format": "peft"' in report.to_json()
    True
    """
    from .convert import convert as _convert

    return _convert(adapter_or_path, output, to=to, from_format=from_format, to_type=to_type, base=base, rank=rank,
                    overwrite=overwrite, **options)


def init_pissa(base: PathLike, output: PathLike, *, rank: int = 16, method: str = "pissa",
               target_modules: str | Sequence[str] | None = None, alpha: float | None = None,
               niter: int | None = None, quantize: str | None = None, device: str = "cpu",
               overwrite: bool = False, **options: Any) -> "InitReport":
    """PiSSA (or ``method="olora"``/``"milora"``) initialisation of a LoRA on ``base``.

    Writes ``output/adapter`` (a PEFT LoRA ready to train) and ``output/residual`` (the base minus the
    adapter's principal part, with the base's sharding and side files), so ``residual + adapter == base``.
    Returns the per-module report. Same as ``peft-surgery init pissa``.

    >>> import tempfile, torch, peft_surgery as ps
    >>> from safetensors.torch import save_file
    >>> tmp = tempfile.mkdtemp()
    >>> w = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    >>> save_file({"model.layers.0.self_attn.q_proj.weight": w}, f"{tmp}/model.safetensors")
    >>> report = ps.init_pissa(f"{tmp}/model.safetensors", f"{tmp}/pissa", rank=4, target_modules="q_proj")
    >>> adapter = ps.load_adapter(f"{tmp}/pissa/adapter")
    >>> residual = ps.load_checkpoint(f"{tmp}/pissa/residual")["model.layers.0.self_attn.q_proj.weight"]
    >>> delta = adapter["model.layers.0.self_attn.q_proj"].delta_weight()
    >>> torch.allclose(residual + delta, w, atol=1e-5), adapter.ranks()
    (True, {'model.layers.0.self_attn.q_proj': 4})
    """
    from .initialize import init_adapter

    return init_adapter(base, output, method=method, rank=rank, target_modules=target_modules, alpha=alpha,
                        niter=niter, quantize=quantize, device=device, overwrite=overwrite, **options)


def merge(base: PathLike, adapters: Adapter | PathLike | Sequence[Adapter | PathLike], output: PathLike, *,
          weights: Sequence[float] | None = None, device: str = "cpu", overwrite: bool = False,
          allow_pickle: bool = False) -> "MergeReport":
    """Merge adapters (each with its weight, in order) into ``base``; write a checkpoint laid out like the base.

    Streams one tensor at a time; keeps the base's shards, dtypes, metadata and side files. Same as
    ``peft-surgery merge``; returns the per-tensor report.

    >>> import tempfile, torch, peft_surgery as ps
    >>> from safetensors.torch import save_file
    >>> tmp = tempfile.mkdtemp()
    >>> save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4)}, f"{tmp}/base.safetensors")
    >>> lora = ps.AdapterModule(ps.LoRA(torch.ones(1, 4), torch.ones(4, 1)), scale=0.5)
    >>> report = ps.merge(f"{tmp}/base.safetensors", ps.Adapter({"model.layers.0.mlp.up_proj": lora}),
    ...                   f"{tmp}/merged.safetensors", weights=[2.0])
    >>> ps.load_checkpoint(f"{tmp}/merged.safetensors")["model.layers.0.mlp.up_proj.weight"][0]  # 2 · 0.5 · 1
    tensor([1., 1., 1., 1.])
    """
    from .algebra import merge as _merge

    return _merge(base, adapters, output, weights=weights, device=device, overwrite=overwrite,
                  allow_pickle=allow_pickle)


def combine(adapters: Sequence[Adapter | PathLike], *, weights: Sequence[float] | None = None,
            method: str = "stack", rank: int | None = None, energy: float | None = None, density: float = 0.5,
            seed: int = 0, allow_pickle: bool = False) -> "tuple[Adapter, CombineReport]":
    """Combine adapters (paths, Hub ids or :class:`Adapter` objects) into one, in memory.

    ``method``: ``stack`` (exact: ranks add up), ``svd``/``linear`` (optimal rank-``rank`` approximation of
    Σ wᵢ·ΔWᵢ), ``ties``, ``dare``, ``dare_ties``. Returns ``(adapter, report)``; save with ``adapter.save(...)``.
    Same as ``peft-surgery combine``.

    >>> import torch, peft_surgery as ps
    >>> g = torch.Generator().manual_seed(0)
    >>> def lora(): return ps.AdapterModule(ps.LoRA(torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)))
    >>> a, b = ps.Adapter({"fc": lora()}), ps.Adapter({"fc": lora()})
    >>> ab, report = ps.combine([a, b], weights=[1.0, 0.5])
    >>> ab.ranks()
    {'fc': 4}
    >>> exact = a["fc"].delta_weight() + 0.5 * b["fc"].delta_weight()
    >>> torch.allclose(ab["fc"].delta_weight(), exact, atol=1e-6)
    True
    """
    from .algebra import _load_all, combine_adapters

    ads, sources = _load_all(list(adapters), allow_pickle)
    return combine_adapters(ads, weights, method=method, rank=rank, energy=energy, density=density, seed=seed,
                            sources=sources)


def quantize_nf4(model: PathLike, output: PathLike, *, double_quant: bool = True, blocksize: int = 64,
                 compute_dtype: str = "bf16", skip: Sequence[str] | None = None, device: str = "auto",
                 error_report: bool = False, overwrite: bool = False, **options: Any) -> "QuantReport":
    """Write an NF4 (bitsandbytes 4-bit) copy of a model checkpoint to the folder ``output``.

    Linear weights get the exact layout ``bitsandbytes.nn.Linear4bit`` saves, plus a ``quantization_config``
    in config.json, so transformers loads the result as a 4-bit model; embeddings, norms and heads stay as they
    are. Streams one tensor at a time. ``error_report=True`` adds per-tensor errors (NF4 next to FP4/int4).
    Same as ``peft-surgery quantize``.

    >>> import tempfile, torch, peft_surgery as ps
    >>> from safetensors.torch import save_file
    >>> tmp = tempfile.mkdtemp()
    >>> w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    >>> save_file({"model.layers.0.mlp.up_proj.weight": w}, f"{tmp}/model.safetensors")
    >>> report = ps.quantize_nf4(f"{tmp}/model.safetensors", f"{tmp}/nf4", device="cpu")
    >>> report.totals["quantized_tensors"], round(report.totals["bits_per_param"], 2)
    (1, 4.14)
    >>> sorted(ps.load_checkpoint(f"{tmp}/nf4").keys())[:2]
    ['model.layers.0.mlp.up_proj.weight', 'model.layers.0.mlp.up_proj.weight.absmax']
    """
    from .quantize import quantize_checkpoint

    return quantize_checkpoint(model, output, quant_type="nf4", double_quant=double_quant, blocksize=blocksize,
                               compute_dtype=compute_dtype, skip=skip, device=device, error_report=error_report,
                               overwrite=overwrite, **options)


def push_to_hub(path: PathLike, repo_id: str, *, private: bool = False, commit_message: str | None = None,
                report: Any = None, command: str | None = None, base_model: str | None = None,
                dry_run: bool = False, **options: Any) -> "PushResult":
    """Upload an output folder (or file) to the Hub with a generated model card (see ``peft-surgery push``).

    The card records the base model, library, tags, ``command`` and the ``report`` table. With
    ``dry_run=True`` nothing is uploaded: the card is written locally and the file list returned.

    >>> import tempfile, torch, peft_surgery as ps
    >>> tmp = tempfile.mkdtemp()
    >>> a = ps.Adapter({"model.layers.0.self_attn.q_proj": ps.AdapterModule(ps.LoRA(torch.ones(1, 4), torch.ones(4, 1)))},
    ...                base_model="org/base")
    >>> _ = a.save(f"{tmp}/adapter")
    >>> result = ps.push_to_hub(f"{tmp}/adapter", "me/my-adapter", dry_run=True)
    >>> [name for name, size in result.files]
    ['README.md', 'adapter_config.json', 'adapter_model.safetensors']
    >>> print(open(f"{tmp}/adapter/README.md").read().split("---")[1].strip())
    base_model: org/base
    library_name: peft
    tags:
    - peft-surgery
    - lora
    - "base_model:adapter:org/base"
    """
    from .hub import push_folder

    return push_folder(path, repo_id, private=private, commit_message=commit_message, report=report,
                       command=command, base_model=base_model, dry_run=dry_run, **options)


__all__ = ["combine", "convert", "extract", "init_pissa", "load_adapter", "load_checkpoint", "merge", "push_to_hub",
           "quantize_nf4", "save_adapter"]
