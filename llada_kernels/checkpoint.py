"""Load and save LLaDA checkpoints in the released format: a folder with `config.json` and
safetensors shards (`model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`,
or a single `model.safetensors`), with the released parameter names. Nothing is downloaded.

The safetensors format is simple enough to read and write here without the `safetensors`
package: an 8-byte little-endian header size, a JSON header mapping each name to its dtype,
shape and byte range, then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint folder that does not match the model: names the tensor or file."""


# ---- safetensors ---------------------------------------------------------------------------

def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    header, offset = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())


def read_safetensors_header(path) -> tuple[dict, int]:
    """The header dict (without __metadata__) and the byte offset of the data."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def read_tensor(f, entry: dict, data_start: int) -> torch.Tensor:
    begin, end = entry["data_offsets"]
    if entry["dtype"] not in _DTYPES:
        raise CheckpointError(f"unsupported safetensors dtype {entry['dtype']!r}")
    buf = bytearray(end - begin)
    f.seek(data_start + begin)
    if f.readinto(buf) != len(buf):
        raise CheckpointError(f"{f.name} is truncated")
    t = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
    return t.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


# ---- save -----------------------------------------------------------------------------------

def _bytes(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size must be bytes or like '5GB'; got {size!r}")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


def save_pretrained(model, path, *, max_shard_size: int | str = "5GB"):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    limit = _bytes(max_shard_size)
    shards, current, size = [], {}, 0
    for name, t in model.state_dict().items():
        n = t.numel() * t.element_size()
        if current and size + n > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += n
    shards.append(current)
    for old in list(path.glob("model*.safetensors")) + [path / INDEX]:
        old.unlink(missing_ok=True)
    if len(shards) == 1:
        write_safetensors(path / SINGLE, shards[0])
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(path / fname, shard)
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX).write_text(json.dumps(index, indent=2) + "\n")


# ---- load -----------------------------------------------------------------------------------

def _weight_map(path: Path) -> dict[str, str]:
    if (path / INDEX).exists():
        return json.loads((path / INDEX).read_text())["weight_map"]
    if (path / SINGLE).exists():
        header, _ = read_safetensors_header(path / SINGLE)
        return {name: SINGLE for name in header}
    raise CheckpointError(f"{path} holds neither {INDEX} nor {SINGLE}")


def load_pretrained(cls, path, *, dtype=None, device=None):
    from .model import LLaDAConfig

    path = Path(path)
    if not (path / CONFIG).exists():
        raise CheckpointError(f"{path} has no {CONFIG}")
    config = LLaDAConfig.from_dict(json.loads((path / CONFIG).read_text()))
    with torch.device("meta"):
        model = cls(config)  # no memory: every parameter is assigned from the checkpoint
    device = torch.device(device) if device is not None else torch.device("cpu")
    params = model.state_dict()

    weight_map = _weight_map(path)
    missing = sorted(set(params) - set(weight_map))
    unexpected = sorted(set(weight_map) - set(params))
    if missing:
        raise CheckpointError(f"{path}: missing tensors {_names(missing)}")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors {_names(unexpected)}")
    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(fname, []).append(name)
    loaded = {}
    for fname, names in by_file.items():
        if not (path / fname).exists():
            raise CheckpointError(f"{path}: {fname}, named by {INDEX}, does not exist")
        header, start = read_safetensors_header(path / fname)
        with open(path / fname, "rb") as f:
            for name in names:
                if name not in header:
                    raise CheckpointError(f"{fname} does not hold {name}, which {INDEX} maps to it")
                t = read_tensor(f, header[name], start)
                if tuple(t.shape) != tuple(params[name].shape):
                    raise CheckpointError(f"{name}: shape {list(t.shape)} in {fname}, but the "
                                          f"config gives {list(params[name].shape)}")
                loaded[name] = t.to(device=device, dtype=dtype or t.dtype)
    model.load_state_dict(loaded, assign=True)
    return model.eval()


def _names(names: list[str]) -> str:
    return f"{names[:5]}{' ...' if len(names) > 5 else ''} ({len(names)} in all)"
