"""Checkpoints in the released format: a folder with `config.json` and safetensors files (one
`model.safetensors`, or shards `model-0000i-of-0000n.safetensors` listed by
`model.safetensors.index.json`), with the released parameter names. Nothing is downloaded.

The `safetensors` package reads and writes the files: it validates every header (its size, the
JSON, dtypes, shapes, byte ranges that tile the data without overlap) and memory-maps the data.
On top, this module
  * reads nothing outside the folder it is given: a file name that is absolute, holds `..`, or
    is a link whose target lies outside is refused (one exception: a Hugging Face cache
    snapshot, `.../snapshots/<rev>/`, whose files link to the cache's `blobs/`);
  * checks the tensors against the model's: every name present, none unexpected, shapes equal,
    floating dtypes, one dtype for all (unless `dtype=` casts them);
  * raises CheckpointError naming the file and, where one is at fault, the tensor.

The model is not imported here: `LLaDAModel.from_pretrained` passes its (meta) state dict, so
any model with a config dict and a state dict can use these functions.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
MAX_JSON_BYTES = 64 << 20  # config.json and the index; a real index is a few hundred KB
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                "BF16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read as the model: the message names the file and,
    where one is at fault, the tensor."""


# ---- save -----------------------------------------------------------------------------------

def save(path, config: dict, tensors: Mapping[str, torch.Tensor], *,
         max_shard_size: int | str = "5GB"):
    """Write config.json and the tensors (in order, shards of at most max_shard_size bytes, or
    one file when they fit). Earlier model*.safetensors files and index in `path` are removed."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    limit = _bytes(max_shard_size)
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if current and size + n > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += n
    shards.append(current)
    for old in path.iterdir():
        if old.name in (SINGLE, INDEX) or SHARD.fullmatch(old.name):
            old.unlink()
    (path / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if len(shards) == 1:
        _write(shards[0], path / SINGLE)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write(shard, path / fname)
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _write(shard: dict[str, torch.Tensor], file: Path):
    """One file; tensors reach host memory one shard at a time."""
    save_file({n: t.detach().cpu().contiguous() for n, t in shard.items()}, file,
              metadata={"format": "pt"})


def _bytes(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", size.upper()) if isinstance(size, str) else None
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes or like '5GB'; got {size!r}")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


# ---- load -----------------------------------------------------------------------------------

def read_config(path) -> dict:
    """config.json of the folder, as a dict."""
    folder = _folder(path)
    return _read_json(folder, CONFIG)


def read_tensors(path, like: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None,
                 device=None) -> dict[str, torch.Tensor]:
    """The folder's tensors, checked against `like` (name -> a tensor of the wanted shape;
    meta tensors will do), cast to dtype when given and moved to device (default cpu).

    Without dtype, every tensor must have the same floating dtype: a checkpoint that mixes
    them is refused, naming the odd tensor (the model would fail later, far from the cause).
    """
    if dtype is not None and dtype not in FLOAT_DTYPES.values():
        raise TypeError(f"dtype must be None or one of {list(FLOAT_DTYPES.values())}; got {dtype!r}")
    folder = _folder(path)
    weight_map = _weight_map(folder)
    missing = [n for n in like if n not in weight_map]
    unexpected = [n for n in weight_map if n not in like]
    source = folder / (INDEX if (folder / INDEX).exists() else SINGLE)
    if missing:
        raise CheckpointError(f"{source}: missing tensors {_names(missing)}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensors {_names(unexpected)}")

    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(fname, []).append(name)
    files = {fname: _inside(folder, fname, f"{INDEX} (for tensor {names[0]})")
             for fname, names in by_file.items()}

    # Headers first (safetensors validates them; nothing is read yet), then the data.
    dtypes = {}
    for fname, names in by_file.items():
        with _open(files[fname], names) as f:
            held = set(f.keys())
            for name in names:
                if name not in held:
                    raise CheckpointError(f"{files[fname]}: holds no tensor {name}, which {INDEX} "
                                          "maps to it")
                view = f.get_slice(name)
                dtypes[name], shape = view.get_dtype(), list(view.get_shape())
                if dtypes[name] not in FLOAT_DTYPES:
                    raise CheckpointError(f"{files[fname]}: tensor {name} has dtype {dtypes[name]}; "
                                          f"parameters are floating point ({', '.join(FLOAT_DTYPES)})")
                if shape != list(like[name].shape):
                    raise CheckpointError(f"{files[fname]}: tensor {name} has shape {shape}, but the "
                                          f"config gives {list(like[name].shape)}")
    if dtype is None and len(set(dtypes.values())) > 1:
        common = Counter(dtypes.values()).most_common(1)[0][0]
        odd = next(n for n, d in dtypes.items() if d != common)
        raise CheckpointError(f"{files[weight_map[odd]]}: tensor {odd} is {dtypes[odd]} but the other "
                              f"tensors are {common}; pass dtype= to cast them all")

    device = torch.device("cpu") if device is None else torch.device(device)
    out = {}
    for fname, names in by_file.items():
        with _open(files[fname]) as f:
            for name in names:
                try:
                    t = f.get_tensor(name)
                except (SafetensorError, OSError, RuntimeError) as e:
                    raise CheckpointError(f"{files[fname]}: cannot read tensor {name} ({e})") from e
                out[name] = t.to(device=device, dtype=dtype or t.dtype)
    return out


def _folder(path) -> Path:
    folder = Path(path).resolve()
    if not folder.is_dir():
        raise CheckpointError(f"{path} is not a folder (a checkpoint is a folder with {CONFIG} "
                              "and safetensors files)")
    return folder


def _inside(folder: Path, name, source: str) -> Path:
    """folder / name as a real path, refused unless it lies inside folder (or, for a Hugging
    Face cache snapshot folder, in the cache's blobs/, where its files link). `source` says
    who named the file, for the messages."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{folder}: {source} names {name!r}, not a file name")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(f"{folder}: {source} names {name!r}, a path outside the folder; "
                              "only files inside the checkpoint folder are read")
    real = (folder / rel).resolve()
    roots = [folder]
    if folder.parent.name == "snapshots":
        roots.append(folder.parent.parent / "blobs")
    if not any(real.is_relative_to(r) for r in roots):
        raise CheckpointError(f"{folder / rel} is a link to {real}, outside {folder}; only files "
                              "inside the checkpoint folder are read")
    if not real.is_file():
        raise CheckpointError(f"{folder / rel}, named by {source}, does not exist or is not a file")
    return real


def _read_json(folder: Path, name: str) -> dict:
    if not (folder / name).exists() and not (folder / name).is_symlink():
        raise CheckpointError(f"{folder} has no {name}")
    file = _inside(folder, name, "the checkpoint format")
    if file.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{file}: {file.stat().st_size} bytes, more than the "
                              f"{MAX_JSON_BYTES} a {name} may have")
    try:
        d = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{file}: must hold a JSON object; got {type(d).__name__}")
    return d


def _weight_map(folder: Path) -> dict[str, str]:
    """tensor name -> file name, from the index, or from model.safetensors alone."""
    if (folder / INDEX).exists() or (folder / INDEX).is_symlink():
        index = _read_json(folder, INDEX)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{folder / INDEX}: needs a 'weight_map' object (tensor name -> "
                                  f"file name); got {type(weight_map).__name__}")
        for name, fname in weight_map.items():
            if not isinstance(fname, str):
                raise CheckpointError(f"{folder / INDEX}: weight_map maps tensor {name} to "
                                      f"{fname!r}, not a file name")
        return weight_map
    if (folder / SINGLE).exists() or (folder / SINGLE).is_symlink():
        with _open(_inside(folder, SINGLE, "the checkpoint format")) as f:
            return {name: SINGLE for name in f.keys()}
    raise CheckpointError(f"{folder} holds neither {INDEX} nor {SINGLE}")


def _open(file: Path, holds: list[str] | None = None):
    """safe_open(file), its errors as CheckpointError naming the file and the tensor at fault
    (or, when the header names none, `holds`: the tensors the index puts in this file)."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        why = _culprit(file, e) if isinstance(e, SafetensorError) else str(e)
        if holds and "at tensor" not in why and "for tensor" not in why:
            why += f"; {INDEX} puts these tensors in it: {_names(holds)}"
        raise CheckpointError(f"{file}: not a valid safetensors file ({why})") from e


# ---- naming the tensor a refused header is about ----------------------------------------------

_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32,
         "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64}


def _culprit(file: Path, error: Exception) -> str:
    """safetensors' reason, and the tensor it concerns: the first header entry with a
    malformed dtype, shape or byte range, or two entries whose bytes overlap (found by reading
    the header again, only on this error path); else the one safetensors names, if any."""
    reason = str(error)
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            header = json.loads(f.read(n)) if 0 < n <= MAX_JSON_BYTES else None
        data_bytes = file.stat().st_size - 8 - n
    except (OSError, ValueError):
        header = None
    if not isinstance(header, dict):
        return reason if "for tensor `" in reason else f"{reason}; the header names no tensor"
    ranges = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(e, dict):
            return f"{reason}; at tensor {name}: its entry is not an object"
        shape, offsets, dt = e.get("shape"), e.get("data_offsets"), e.get("dtype")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            return f"{reason}; at tensor {name}: shape {shape!r}"
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and o >= 0 for o in offsets) and offsets[0] <= offsets[1]):
            return f"{reason}; at tensor {name}: data_offsets {offsets!r}"
        if offsets[1] > data_bytes:
            return (f"{reason}; at tensor {name}: data_offsets {offsets} end past the file's "
                    f"{data_bytes} bytes of data")
        if not isinstance(dt, str) or dt not in _BITS and not dt.startswith(("F4", "F6", "F8")):
            return f"{reason}; at tensor {name}: dtype {dt!r}"
        numel = math.prod(shape)
        if dt in _BITS and numel * _BITS[dt] != 8 * (offsets[1] - offsets[0]):
            return (f"{reason}; at tensor {name}: shape {shape} of {dt} needs "
                    f"{numel * _BITS[dt] // 8} bytes, data_offsets {offsets} hold "
                    f"{offsets[1] - offsets[0]}")
        ranges.append((offsets[0], offsets[1], name))
    ranges.sort()
    for (_, end, a), (begin, _, b) in zip(ranges, ranges[1:]):
        if begin < end:
            return f"{reason}; at tensors {a} and {b}: their bytes overlap"
    return reason


def _names(names: list[str]) -> str:
    return f"{names[:5]}{' ...' if len(names) > 5 else ''} ({len(names)} in all)"
