"""Checkpoint I/O: lazy one-tensor-at-a-time reading, and atomic, sharded writing.

Reading accepts a ``.safetensors`` file, a model folder (single file or sharded with an index), diffusers
component sub-folders, a PEFT adapter folder, or a Hugging Face Hub repo id (``org/name[@revision]``).
Legacy pickles (``.bin``/``.pt``) are refused unless ``allow_pickle=True``.

Writing goes to a temporary sibling first and is renamed into place at the end, so an error never leaves a
partial output behind. Inputs are never written into or over.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import Tensor

from .errors import FormatError, OutputExistsError, SurgeryError

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
INDEX_NAMES = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")
# Single-file weight names, in the order we look for them inside a folder.
WEIGHT_FILE_NAMES = (
    "model.safetensors",
    "adapter_model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "pytorch_lora_weights.safetensors",
    "adapters.safetensors",
)
PICKLE_FILE_NAMES = ("pytorch_model.bin", "adapter_model.bin", "diffusion_pytorch_model.bin", "pytorch_lora_weights.bin")
DIFFUSERS_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae", "prior")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    _DTYPES["F8_E4M3"] = torch.float8_e4m3fn
    _DTYPES["F8_E5M2"] = torch.float8_e5m2


# --------------------------------------------------------------------------------------------------------
# Low-level safetensors header handling (validates files before we trust them)
# --------------------------------------------------------------------------------------------------------


@dataclass
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse and validate a safetensors header; return (tensor entries, metadata).

    Raises FormatError naming the file for truncated or corrupt files.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise FormatError("not a safetensors file (shorter than its 8-byte header length)", path=path)
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise FormatError(
                    f"not a safetensors file or truncated (header claims {n} bytes, file has {size})", path=path
                )
            header = json.loads(fh.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"corrupt safetensors header ({exc.__class__.__name__})", path=path) from None
    except OSError as exc:
        raise SurgeryError(f"cannot read file: {exc.strerror}", path=path) from None
    if not isinstance(header, dict):
        raise FormatError("corrupt safetensors header", path=path)
    meta = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    for key, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            dtype = entry["dtype"]
        except (TypeError, KeyError, ValueError):
            raise FormatError("corrupt safetensors header entry", path=path, tensor=key) from None
        if end > data_len:
            raise FormatError(
                f"file is truncated: tensor data ends at byte {end} but only {data_len} bytes are present",
                path=path,
                tensor=key,
            )
        if dtype not in _DTYPES:
            raise FormatError(f"unsupported dtype {dtype}", path=path, tensor=key)
    return header, {str(k): str(v) for k, v in meta.items()}


# --------------------------------------------------------------------------------------------------------
# Resolution of user-given locations (local paths and Hub ids)
# --------------------------------------------------------------------------------------------------------


def is_hub_id(location: str) -> bool:
    """``org/name`` or ``org/name@rev`` that is not an existing local path."""
    return bool(HUB_ID_RE.match(location)) and not Path(location).exists() and not location.startswith((".", "/"))


def split_revision(location: str) -> tuple[str, str | None]:
    if "@" in location:
        repo, rev = location.split("@", 1)
        return repo, rev
    return location, None


HF_URL_RE = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+(?:@(?:refs/pr/\d+|[\w.\-]+))?)(?:/(?P<path>.*))?$")


def parse_hf_url(location: str) -> tuple[str, str | None] | None:
    """``hf://org/name[@rev][/path/in/repo]`` → (``org/name[@rev]``, path or None); None for anything else.

    >>> parse_hf_url("hf://org/pipe@v2/unet")
    ('org/pipe@v2', 'unet')
    """
    m = HF_URL_RE.match(location)
    if not m:
        return None
    return m.group("repo"), (m.group("path") or "").strip("/") or None


HUB_ALLOW_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.model",
    "*.txt",
    "tokenizer*",
    "*.tiktoken",
]


def resolve_location(
    location: str | os.PathLike,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
    allow_pickle: bool = False,
) -> Path:
    """Turn a local path or a Hub repo id into a local path.

    Hub downloads fetch only weight/config files (``allow_patterns``) through ``huggingface_hub``, which
    honours ``HF_HUB_OFFLINE`` and the local cache.
    """
    loc = str(location)
    hf = parse_hf_url(loc)
    if hf is not None:
        # hf://org/name[@rev]/path: a sub-folder, or a single weight file, inside a Hub repo
        repo, path = hf
        if path and path.endswith((SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES)):
            return resolve_location(repo, revision=revision, allow_patterns=[path], allow_pickle=allow_pickle) / path
        sub = "/".join(x for x in (path, subfolder) if x) or None
        return resolve_location(repo, subfolder=sub, revision=revision, allow_patterns=allow_patterns,
                                allow_pickle=allow_pickle)
    p = Path(loc).expanduser()
    if p.exists():
        return p / subfolder if subfolder else p
    if not is_hub_id(loc):
        raise SurgeryError("no such file or folder", path=loc)
    repo_id, rev = split_revision(loc)
    rev = revision or rev
    patterns = list(allow_patterns or HUB_ALLOW_PATTERNS)
    if allow_pickle:
        patterns += ["*.bin", "*.pt"]
    if subfolder:
        patterns = [f"{subfolder}/{pat}" for pat in patterns] + patterns[:0]
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise SurgeryError("huggingface_hub is required for Hub repo ids", path=loc) from None
    try:
        local = snapshot_download(repo_id, revision=rev, allow_patterns=patterns)
    except (RepositoryNotFoundError, LocalEntryNotFoundError) as exc:
        raise SurgeryError(
            f"not a local path, and not found on the Hugging Face Hub or in the local cache ({exc.__class__.__name__})",
            path=loc,
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise SurgeryError(f"could not fetch from the Hugging Face Hub: {msg}", path=loc) from None
    out = Path(local)
    return out / subfolder if subfolder else out


# --------------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------------


class Checkpoint(Mapping[str, Tensor]):
    """Lazy, read-only view of a checkpoint's tensors: one tensor is loaded per ``get``/``[]``.

    >>> ckpt = Checkpoint.open("fixtures/tiny_lora/adapter_model.safetensors")  # doctest: +SKIP
    >>> ckpt.shape("base_model.model.fc.lora_A.weight")  # doctest: +SKIP
    (4, 16)

    ``files`` lists the weight files; ``shard_of(key)`` says which file holds a tensor; ``metadata`` is the
    merged safetensors ``__metadata__``; ``root`` is the folder (for side files like config.json).
    """

    def __init__(self, infos: dict[str, TensorInfo], metadata: dict[str, str], root: Path, source: str,
                 pickled: dict[str, Tensor] | None = None, prefixes: dict[str, str] | None = None,
                 index: dict[str, Any] | None = None):
        self._infos = infos
        self.metadata = metadata
        self.root = root
        self.source = source
        self._pickled = pickled
        self._handles: dict[Path, Any] = {}
        self._prefixes = prefixes or {}  # exposed key -> stored key (diffusers component folders)
        self.index = index

    # -- construction ----------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        location: str | os.PathLike,
        *,
        allow_pickle: bool = False,
        subfolder: str | None = None,
        revision: str | None = None,
    ) -> "Checkpoint":
        path = resolve_location(location, subfolder=subfolder, revision=revision, allow_pickle=allow_pickle)
        source = str(location)
        if path.is_file():
            return cls._open_file(path, allow_pickle=allow_pickle, source=source)
        if path.is_dir():
            return cls._open_dir(path, allow_pickle=allow_pickle, source=source)
        raise SurgeryError("no such file or folder", path=source)

    @classmethod
    def _open_file(cls, path: Path, *, allow_pickle: bool, source: str, root: Path | None = None) -> "Checkpoint":
        root = root or path.parent
        if path.name.endswith(".safetensors.index.json"):
            return cls._open_index(path, source=source)
        if path.suffix == SAFETENSORS_SUFFIX:
            header, meta = read_safetensors_header(path)
            infos = {k: TensorInfo(tuple(v["shape"]), _DTYPES[v["dtype"]], path) for k, v in header.items()}
            return cls(infos, meta, root, source)
        if path.suffix in PICKLE_SUFFIXES:
            return cls._open_pickle(path, allow_pickle=allow_pickle, source=source)
        raise FormatError("unsupported file type (expected .safetensors)", path=path)

    @classmethod
    def _open_pickle(cls, path: Path, *, allow_pickle: bool, source: str) -> "Checkpoint":
        if not allow_pickle:
            raise SurgeryError(
                "is a pickle file; pickles can run arbitrary code, so they are refused. "
                "Convert it to safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)",
                path=path,
            )
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for bad pickles
            raise FormatError(f"cannot load pickle with weights_only=True: {str(exc).splitlines()[0]}", path=path) from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise FormatError("pickle does not hold a flat dict of tensors", path=path)
        infos = {k: TensorInfo(tuple(v.shape), v.dtype, path) for k, v in obj.items()}
        return cls(infos, {}, path.parent, source, pickled=obj)

    @classmethod
    def _open_index(cls, index_path: Path, *, source: str) -> "Checkpoint":
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise FormatError("corrupt shard index (no weight_map)", path=index_path) from None
        infos: dict[str, TensorInfo] = {}
        meta: dict[str, str] = {}
        for fname in sorted(set(weight_map.values())):
            shard = index_path.parent / fname
            if not shard.exists():
                raise SurgeryError(f"shard '{fname}' listed in the index is missing", path=index_path)
            header, m = read_safetensors_header(shard)
            meta.update(m)
            for k, v in header.items():
                infos[k] = TensorInfo(tuple(v["shape"]), _DTYPES[v["dtype"]], shard)
        missing = set(weight_map) - set(infos)
        if missing:
            raise FormatError(f"index names {len(missing)} tensors not found in the shards, e.g. {sorted(missing)[0]}",
                              path=index_path)
        return cls(infos, meta, index_path.parent, source, index=index)

    @classmethod
    def _open_dir(cls, path: Path, *, allow_pickle: bool, source: str) -> "Checkpoint":
        for name in INDEX_NAMES:
            if (path / name).exists():
                return cls._open_index(path / name, source=source)
        for name in WEIGHT_FILE_NAMES:
            if (path / name).exists():
                return cls._open_file(path / name, allow_pickle=allow_pickle, source=source, root=path)
        st = sorted(path.glob("*.safetensors"))
        if len(st) == 1:
            return cls._open_file(st[0], allow_pickle=allow_pickle, source=source, root=path)
        if len(st) > 1:
            # Several loose safetensors files without an index: read them all as one checkpoint.
            infos: dict[str, TensorInfo] = {}
            meta: dict[str, str] = {}
            for f in st:
                header, m = read_safetensors_header(f)
                meta.update(m)
                for k, v in header.items():
                    if k in infos:
                        raise FormatError(f"tensor appears in both {infos[k].file.name} and {f.name}", path=path, tensor=k)
                    infos[k] = TensorInfo(tuple(v["shape"]), _DTYPES[v["dtype"]], f)
            return cls(infos, meta, path, source)
        # diffusers pipeline folder: expose components under "<component>." prefixes
        comps = [c for c in DIFFUSERS_COMPONENTS if (path / c).is_dir()]
        if comps:
            infos = {}
            meta = {}
            prefixes: dict[str, str] = {}
            for c in comps:
                try:
                    sub = cls._open_dir(path / c, allow_pickle=allow_pickle, source=f"{source}/{c}")
                except SurgeryError:
                    continue
                if sub._pickled is not None:
                    raise SurgeryError("pickle components inside a pipeline folder are not supported", path=path / c)
                meta.update(sub.metadata)
                for k, info in sub._infos.items():
                    infos[f"{c}.{k}"] = info
                    prefixes[f"{c}.{k}"] = k
            if infos:
                return cls(infos, meta, path, source, prefixes=prefixes)
        for name in PICKLE_FILE_NAMES:
            if (path / name).exists():
                return cls._open_pickle(path / name, allow_pickle=allow_pickle, source=source)
        raise FormatError("folder holds no .safetensors weights", path=path)

    # -- access ----------------------------------------------------------------------------------------

    def __getitem__(self, key: str) -> Tensor:
        return self.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, key: object) -> bool:
        return key in self._infos

    def keys(self):  # type: ignore[override]
        return self._infos.keys()

    def info(self, key: str) -> TensorInfo:
        try:
            return self._infos[key]
        except KeyError:
            raise SurgeryError("no such tensor", path=self.source, tensor=key) from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self.info(key).shape

    def dtype(self, key: str) -> torch.dtype:
        return self.info(key).dtype

    def shard_of(self, key: str) -> Path:
        return self.info(key).file

    @property
    def files(self) -> list[Path]:
        return sorted({i.file for i in self._infos.values()})

    @property
    def is_pickle(self) -> bool:
        return self._pickled is not None

    def get_tensor(self, key: str) -> Tensor:
        info = self.info(key)
        if self._pickled is not None:
            return self._pickled[key]
        handle = self._handles.get(info.file)
        if handle is None:
            from safetensors import safe_open

            try:
                handle = safe_open(str(info.file), framework="pt", device="cpu")
            except Exception as exc:
                raise FormatError(f"cannot open: {exc}", path=info.file) from None
            self._handles[info.file] = handle
        stored = self._prefixes.get(key, key)
        try:
            return handle.get_tensor(stored)
        except Exception as exc:
            raise FormatError(f"cannot read tensor: {exc}", path=info.file, tensor=key) from None

    def config(self, name: str = "config.json") -> dict[str, Any] | None:
        """A JSON side file next to the weights (``config.json``, ``adapter_config.json``), if present."""
        p = self.root / name
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise FormatError(f"invalid JSON ({exc.msg} at line {exc.lineno})", path=p) from None

    def total_bytes(self) -> int:
        return sum(math_prod(i.shape) * _itemsize(i.dtype) for i in self._infos.values())

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, {len(self)} tensors, {len(self.files)} files)"


def math_prod(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def load_checkpoint(location: str | os.PathLike, **kwargs: Any) -> Checkpoint:
    """Open a checkpoint lazily (see :class:`Checkpoint`)."""
    return Checkpoint.open(location, **kwargs)


# --------------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------------


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '50MiB', 1000 → bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B?)?\s*", str(text), re.I)
    if not m:
        raise SurgeryError(f"cannot parse size '{text}' (use e.g. 50MB, 2GB)")
    num = float(m.group(1))
    unit = (m.group(2) or "").upper().rstrip("B")
    powers = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    if unit not in powers:
        raise SurgeryError(f"cannot parse size '{text}'")
    return int(num * powers[unit])


def _resolved(p: Path) -> Path:
    try:
        return p.resolve()
    except OSError:
        return p.absolute()


def check_output(out: Path, *, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False) -> None:
    """Refuse to write over an existing output (without overwrite) or into/over any input."""
    out_r = _resolved(out)
    for inp in inputs:
        ip = Path(str(inp))
        if not ip.exists():
            continue
        in_r = _resolved(ip)
        if out_r == in_r or in_r in out_r.parents or out_r in in_r.parents:
            raise OutputExistsError(f"output would overwrite or be written inside the input {inp}", path=out)
    if out.exists() and not overwrite:
        raise OutputExistsError("output already exists (pass --overwrite to replace it)", path=out)


@contextmanager
def atomic_output(out: str | os.PathLike, *, is_dir: bool, inputs: Iterable[str | os.PathLike] = (),
                  overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``out``; on success rename it to ``out``, on error remove it.

    >>> with atomic_output("out_dir", is_dir=True) as tmp:  # doctest: +SKIP
    ...     (tmp / "a.json").write_text("{}")
    """
    out = Path(out)
    inputs = list(inputs)
    check_output(out, inputs=inputs, overwrite=overwrite)
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    if out.exists():
        # Checked above; overwrite was allowed. Move the old output aside until the new one is in place.
        backup = parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, backup)
        os.replace(tmp, out)
        if backup.is_dir():
            shutil.rmtree(backup, ignore_errors=True)
        else:
            backup.unlink(missing_ok=True)
    else:
        os.replace(tmp, out)
    # mkdtemp/mkstemp create private (0700/0600) paths; give the result ordinary permissions.
    if is_dir:
        os.chmod(out, 0o755)
        for dirpath, dirnames, filenames in os.walk(out):
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), 0o755)
            for f in filenames:
                os.chmod(os.path.join(dirpath, f), 0o644)
    else:
        os.chmod(out, 0o644)


def save_tensors(tensors: Mapping[str, Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write one safetensors file (contiguous, storage de-duplicated); no atomicity (use atomic_output)."""
    from safetensors.torch import save_file

    clean: dict[str, Tensor] = {}
    seen: set[int] = set()
    for k, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen and ptr != -1:
            t = t.clone()
        seen.add(ptr)
        clean[k] = t
    save_file(clean, str(path), metadata=dict(metadata) if metadata else None)


class ShardedWriter:
    """Stream tensors into safetensors shards inside a folder; write the index when there are several.

    Use inside :func:`atomic_output`. Tensors are buffered until a shard is full (``max_shard_size`` bytes),
    or, with an explicit ``plan`` (key → file name, e.g. copied from the base checkpoint's index), until every
    key of that file has been added, so memory stays near one shard.
    """

    def __init__(
        self,
        folder: Path,
        *,
        base_name: str = "model",
        max_shard_size: int | str = "5GB",
        metadata: Mapping[str, str] | None = None,
        plan: Mapping[str, str] | None = None,
    ):
        self.folder = Path(folder)
        self.base_name = base_name
        self.max_shard_size = parse_size(max_shard_size)
        self.metadata = dict(metadata or {})
        self.plan = dict(plan) if plan else None
        self._pending_by_file: dict[str, set[str]] = {}
        if self.plan:
            for k, f in self.plan.items():
                self._pending_by_file.setdefault(f, set()).add(k)
        self._buffer: dict[str, Tensor] = {}
        self._buffers_by_file: dict[str, dict[str, Tensor]] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self._tmp_names: list[str] = []
        self.total_size = 0

    def add(self, key: str, tensor: Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self.total_size += nbytes
        if self.plan is not None:
            fname = self.plan.get(key)
            if fname is None:
                raise SurgeryError("tensor is not in the output shard plan", tensor=key)
            buf = self._buffers_by_file.setdefault(fname, {})
            buf[key] = tensor
            pending = self._pending_by_file[fname]
            pending.discard(key)
            if not pending:
                self._write(fname, self._buffers_by_file.pop(fname))
            return
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_size:
            self._flush()
        self._buffer[key] = tensor
        self._buffer_bytes += nbytes

    def _flush(self) -> None:
        if not self._buffer:
            return
        name = f"{self.base_name}-part{len(self._tmp_names):05d}.safetensors"
        self._write(name, self._buffer)
        self._tmp_names.append(name)
        self._buffer = {}
        self._buffer_bytes = 0

    def _write(self, fname: str, tensors: dict[str, Tensor]) -> None:
        save_tensors(tensors, self.folder / fname, self.metadata)
        self._shards.append((fname, list(tensors)))

    def close(self) -> list[str]:
        """Finish writing; return the file names written."""
        if self.plan is not None:
            leftover = {f: keys for f, keys in self._pending_by_file.items() if keys}
            if leftover:
                f, keys = next(iter(leftover.items()))
                raise SurgeryError(f"{len(keys)} planned tensors were never written, e.g. {sorted(keys)[0]}",
                                   path=f)
            names = [f for f, _ in self._shards]
            if len(names) > 1 or any(f != f"{self.base_name}.safetensors" for f in names):
                self._write_index({k: f for f, keys in self._shards for k in keys})
            return names
        self._flush()
        n = len(self._tmp_names)
        if n == 1:
            os.replace(self.folder / self._tmp_names[0], self.folder / f"{self.base_name}.safetensors")
            return [f"{self.base_name}.safetensors"]
        weight_map = {}
        final_names = []
        for i, (tmp_name, (_, keys)) in enumerate(zip(self._tmp_names, self._shards)):
            final = f"{self.base_name}-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp_name, self.folder / final)
            final_names.append(final)
            for k in keys:
                weight_map[k] = final
        if n:
            self._write_index(weight_map)
        return final_names

    def _write_index(self, weight_map: dict[str, str]) -> None:
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / f"{self.base_name}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def copy_side_files(src: Path, dst: Path, *, exclude_suffixes: tuple[str, ...] = (".safetensors", ".bin", ".pt", ".pth"),
                    exclude_names: tuple[str, ...] = ()) -> list[str]:
    """Copy config/tokenizer/etc. files (not weights, not index files) from ``src`` folder to ``dst``."""
    copied = []
    if not src.is_dir():
        return copied
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(exclude_suffixes) and not f.name.endswith(".index.json") \
                and f.name not in exclude_names and not f.name.startswith("."):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def write_json(path: Path, obj: Any, *, sort_keys: bool = True) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


__all__ = [
    "Checkpoint",
    "ShardedWriter",
    "TensorInfo",
    "atomic_output",
    "check_output",
    "copy_side_files",
    "is_hub_id",
    "load_checkpoint",
    "parse_hf_url",
    "parse_size",
    "read_safetensors_header",
    "resolve_location",
    "save_tensors",
    "write_json",
]
