"""Checkpoints in the released format (llada_kernels.checkpoint, on the safetensors package):
round trips, the released config fields, hostile and broken folders (every error names the
file and the tensor), and nothing read outside the folder."""

import json
import os
import re
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from llada_kernels.checkpoint import CheckpointError
from llada_kernels.model import LLaDAConfig, LLaDAModel
from oracles import oracle_dir
from test_model import RELEASED_CONFIG, V, tiny_model

WTE = "model.transformer.wte.weight"
Q0 = "model.transformer.blocks.0.q_proj.weight"


def _header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def _edit_header(path, edit):
    """Rewrite a safetensors file's JSON header through edit(header), the data unchanged."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _saved(tmp_path, name="ckpt", **kw):
    model = tiny_model()
    model.save_pretrained(tmp_path / name, **kw)
    return model, tmp_path / name


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------

def test_checkpoint_round_trip_sharded(tmp_path):
    model = tiny_model(seed=5)
    model.save_pretrained(tmp_path, max_shard_size=6000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert set(index["weight_map"]) == set(model.state_dict())
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert index["metadata"]["total_size"] == total
    h = _header(tmp_path / files[0])
    assert h["__metadata__"] == {"format": "pt"}
    assert h[next(k for k in h if k != "__metadata__")]["dtype"] == "F32"
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["d_model"] == 32 and cfg["block_type"] == "llama"

    loaded = LLaDAModel.from_pretrained(tmp_path)
    for (n1, a), (n2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b), n1
    ids = torch.randint(0, V, (2, 7))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    # Saving again, unsharded, leaves no stale shard or index behind.
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_checkpoint_single_file_bf16_and_dtype_choice(tmp_path):
    model = tiny_model(seed=6, weight_tying=True).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert _header(tmp_path / "model.safetensors")[WTE]["dtype"] == "BF16"
    assert LLaDAModel.from_pretrained(tmp_path).dtype == torch.bfloat16
    loaded = LLaDAModel.from_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(loaded.lm_head_weight, model.lm_head_weight.float())
    with pytest.raises(TypeError, match=r"dtype must be None or one of"):
        LLaDAModel.from_pretrained(tmp_path, dtype=torch.int32)


def test_checkpoint_files_are_standard_safetensors(tmp_path):
    model, path = _saved(tmp_path)
    tensors = load_file(path / "model.safetensors")
    for name, t in model.state_dict().items():
        assert torch.equal(tensors[name], t)


@pytest.mark.parametrize("size,exc", [(0, ValueError), ("-5GB", ValueError), ("lots", ValueError),
                                      (True, ValueError)])
def test_bad_max_shard_size(tmp_path, size, exc):
    with pytest.raises(exc, match="max_shard_size must be a positive number of bytes"):
        tiny_model().save_pretrained(tmp_path, max_shard_size=size)


# --------------------------------------------------------------------------------------------
# The released config (issue 12 item 2)
# --------------------------------------------------------------------------------------------

def test_saved_config_has_every_released_field(tmp_path):
    """Every field of the released config.json, LLaDA's values where ours do not differ; the
    dropouts are 0 (the released modeling file's defaults are GPT-2's 0.1)."""
    model, path = _saved(tmp_path, auto_map=True)
    saved = json.loads((path / "config.json").read_text())
    assert set(RELEASED_CONFIG) - set(saved) == {"transformers_version"}
    ours = {"d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "vocab_size",
            "embedding_size", "max_sequence_length", "rope_theta", "mask_token_id",
            "eos_token_id", "pad_token_id"}
    for key in set(RELEASED_CONFIG) - ours - {"transformers_version"}:
        assert saved[key] == RELEASED_CONFIG[key], key
    assert saved["attention_dropout"] == saved["residual_dropout"] == saved["embedding_dropout"] == 0.0
    assert LLaDAConfig.from_dict(saved).to_dict(auto_map=True) == saved
    assert "auto_map" not in json.loads((_saved(tmp_path, "plain")[1] / "config.json").read_text())


def test_saved_config_has_every_field_of_the_released_configuration_file(tmp_path):
    """Every field of ModelConfig in LLaDA's configuration_llada.py (read from the oracle's
    source, not imported: that needs transformers)."""
    import ast
    source = (oracle_dir("dllm", "llada") / "configuration_llada.py").read_text()
    cls = next(n for n in ast.walk(ast.parse(source))
               if isinstance(n, ast.ClassDef) and n.name == "ModelConfig")
    fields = {s.target.id for s in cls.body if isinstance(s, ast.AnnAssign)}
    assert len(fields) > 40
    _, path = _saved(tmp_path)
    assert fields - set(json.loads((path / "config.json").read_text())) == set()


def test_released_modeling_file_loads_our_checkpoint_in_train_mode(tmp_path, monkeypatch):
    """Our checkpoint through transformers' AutoModelForCausalLM with trust_remote_code (found
    by auto_map) and LLaDA's own modeling_llada.py: the same logits in eval mode, and in train
    mode too (before the dropout fields were written, the released file used dropouts of 0.1).
    The released file builds its model on "cuda"; the test copies it with "cpu" instead."""
    transformers = pytest.importorskip("transformers")
    src = oracle_dir("dllm", "llada")
    model, path = _saved(tmp_path, auto_map=True)
    shutil.copy(src / "configuration_llada.py", path)
    text = (src / "modeling_llada.py").read_text()
    assert text.count('model_config.init_device = "cuda"') == 1
    (path / "modeling_llada.py").write_text(text.replace('model_config.init_device = "cuda"',
                                                         'model_config.init_device = "cpu"'))
    import transformers.dynamic_module_utils as dmu
    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                                           dtype=torch.float32)
    assert type(hf).__name__ == "LLaDAModelLM"
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(0))
    for train in (False, True):
        model.train(train)
        hf.train(train)
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Broken and hostile folders: CheckpointError naming the file and the tensor (issue 9 item 10)
# --------------------------------------------------------------------------------------------

def _set(name, key, value):
    def edit(h):
        h[name][key] = value
    return edit


def _share_bytes(h):  # v_proj reads k_proj's bytes (same shape and dtype)
    h["model.transformer.blocks.0.v_proj.weight"]["data_offsets"] = \
        list(h["model.transformer.blocks.0.k_proj.weight"]["data_offsets"])


def _swap_offsets(h):
    h[Q0]["data_offsets"] = h[Q0]["data_offsets"][::-1]


HEADER_EDITS = {
    "offsets_begin_after_end": (_swap_offsets, Q0),
    "shape_too_large_for_its_bytes": (_set(Q0, "shape", [32, 64]), Q0),
    "shape_with_minus_one": (_set(Q0, "shape", [-1, 32]), Q0),
    "two_tensors_share_bytes": (_share_bytes, r"tensors model.transformer.blocks.0.[kv]_proj.weight "
                                              r"and model.transformer.blocks.0.[kv]_proj.weight: "
                                              "their bytes overlap"),
    "unknown_dtype": (_set(Q0, "dtype", "Q7"), Q0),
}


@pytest.mark.parametrize("case", list(HEADER_EDITS))
def test_corrupt_header_names_file_and_tensor(tmp_path, case):
    edit, tensor = HEADER_EDITS[case]
    _, path = _saved(tmp_path)
    _edit_header(path / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match="model.safetensors: not a valid safetensors file") as e:
        LLaDAModel.from_pretrained(path)
    assert str(path) in str(e.value)
    assert re.search(tensor, str(e.value))


@pytest.mark.parametrize("content,why", [
    (b"abc", "header too small"),
    (struct.pack("<Q", 10) + b"not json!!", "invalid JSON"),
    (struct.pack("<Q", 2**62) + b"{}", "header too large"),
    (struct.pack("<Q", 2) + b"[]", "invalid"),
])
def test_unreadable_shard_names_file_and_its_tensors(tmp_path, content, why):
    """A file with no readable header names no tensor itself: the error lists those the index
    puts in it."""
    model = tiny_model()
    model.save_pretrained(tmp_path, max_shard_size=6000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    (tmp_path / index["weight_map"][Q0]).write_bytes(content)
    with pytest.raises(CheckpointError, match=why) as e:
        LLaDAModel.from_pretrained(tmp_path)
    assert index["weight_map"][Q0] in str(e.value) and Q0 in str(e.value)


def test_truncated_file_names_the_tensor(tmp_path):
    _, path = _saved(tmp_path)
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    last = list(_header_names(file))[-1]
    with pytest.raises(CheckpointError, match=rf"at tensor {last}: data_offsets .* end past the file's"):
        LLaDAModel.from_pretrained(path)


def _header_names(file):
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    h = json.loads(raw[8:8 + n])
    return sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])


def _rewrite(path, edit):
    """Let edit change the tensors of a saved single-file checkpoint, and write them back."""
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_unexpected_and_misshapen_tensors(tmp_path):
    _, path = _saved(tmp_path, "missing")
    _rewrite(path, lambda t: t.pop("model.transformer.blocks.1.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.transformer.blocks.1.up_proj.weight'\]"):
        LLaDAModel.from_pretrained(path)

    _, path = _saved(tmp_path, "extra")
    _rewrite(path, lambda t: t.update({"model.transformer.wpe.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['model.transformer.wpe.weight'\]"):
        LLaDAModel.from_pretrained(path)

    _, path = _saved(tmp_path, "shape")
    _rewrite(path, lambda t: t.update({Q0: torch.zeros(16, 32)}))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor {Q0} has shape \[16, 32\], "
                                              r"but the config gives \[32, 32\]"):
        LLaDAModel.from_pretrained(path)

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        LLaDAModel.from_pretrained(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="is not a folder"):
        LLaDAModel.from_pretrained(tmp_path / "nowhere")


def test_one_fp16_tensor_in_an_fp32_checkpoint(tmp_path):
    """Refused by name (it loaded, and the forward failed later); dtype= casts them all."""
    model, path = _saved(tmp_path)
    _rewrite(path, lambda t: t.update({Q0: t[Q0].half()}))
    with pytest.raises(CheckpointError, match=rf"tensor {Q0} is F16 but the other tensors are F32; "
                                              "pass dtype="):
        LLaDAModel.from_pretrained(path)
    loaded = LLaDAModel.from_pretrained(path, dtype=torch.float32)
    torch.testing.assert_close(loaded.state_dict()[Q0], model.state_dict()[Q0].half().float())

    _rewrite(path, lambda t: t.update({Q0: torch.zeros(32, 32, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=rf"tensor {Q0} has dtype I32; parameters are floating"):
        LLaDAModel.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("index,match", [
    ("not json", r"model.safetensors.index.json: not valid JSON"),
    ("[1, 2]", r"model.safetensors.index.json: must hold a JSON object; got list"),
    ('{"metadata": {}}', r"needs a 'weight_map' object \(tensor name -> file name\); got NoneType"),
    ('{"weight_map": [1]}', r"needs a 'weight_map' object.*got list"),
    (json.dumps({"weight_map": {Q0: 3}}), rf"weight_map maps tensor {Q0} to 3, not a file name"),
])
def test_broken_index(tmp_path, index, match):
    tiny_model().save_pretrained(tmp_path, max_shard_size=6000)
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=match):
        LLaDAModel.from_pretrained(tmp_path)


def test_index_naming_a_file_without_the_tensor(tmp_path):
    tiny_model().save_pretrained(tmp_path, max_shard_size=6000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    other = next(f for f in index["weight_map"].values() if f != index["weight_map"][Q0])
    index["weight_map"][Q0] = other
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{other}: holds no tensor {Q0}, which"):
        LLaDAModel.from_pretrained(tmp_path)
    index["weight_map"][Q0] = "model-00009-of-00009.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"model-00009-of-00009.safetensors, named by "
                                              rf"model.safetensors.index.json \(for tensor {Q0}\), does not exist"):
        LLaDAModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("field,value,match", [
    ("d_model", "32", r"d_model must be an int; got '32'"),
    ("n_heads", 0, r"n_heads must be >= 1; got 0"),
    ("rope_theta", 0, r"rope_theta must be finite and > 0"),
    ("mask_token_id", V + 5, r"mask_token_id=69 is outside the vocabulary"),
    ("block_type", "sequential", r"block_type='sequential' is not supported"),
])
def test_bad_config_json_names_the_file_and_field(tmp_path, field, value, match):
    _, path = _saved(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg[field] = value
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"config.json: LLaDAConfig: {match}"):
        LLaDAModel.from_pretrained(path)


@pytest.mark.parametrize("content,match", [("{", "config.json: not valid JSON"),
                                           ("[]", "config.json: must hold a JSON object"),
                                           (b"\xff\xfe", "config.json: not valid JSON")])
def test_unreadable_config_json(tmp_path, content, match):
    _, path = _saved(tmp_path)
    f = path / "config.json"
    f.write_bytes(content) if isinstance(content, bytes) else f.write_text(content)
    with pytest.raises(CheckpointError, match=match):
        LLaDAModel.from_pretrained(path)


# --------------------------------------------------------------------------------------------
# Nothing outside the folder is read
# --------------------------------------------------------------------------------------------

@pytest.fixture
def outside(tmp_path):
    """A sharded checkpoint in tmp_path/ckpt, and a valid copy of its first shard outside it
    (in tmp_path), so that only the path check can refuse it."""
    tiny_model().save_pretrained(tmp_path / "ckpt", max_shard_size=6000)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    first = index["weight_map"][WTE]
    shutil.copy(tmp_path / "ckpt" / first, tmp_path / "outside.safetensors")
    return tmp_path / "ckpt", index, first


def _point(path, index, first, to):
    index = {**index, "weight_map": {n: (to if f == first else f) for n, f in index["weight_map"].items()}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "dotdot_inside"])
def test_shard_names_outside_the_folder_are_refused(outside, kind, monkeypatch):
    path, index, first = outside
    to = {"dotdot": "../outside.safetensors",
          "absolute": str(path.parent / "outside.safetensors"),
          "dotdot_inside": f"sub/../{first}"}[kind]  # even when it would come back inside
    _point(path, index, first, to)
    opened = []
    from safetensors import safe_open as real_open
    monkeypatch.setattr("llada_kernels.checkpoint.safe_open",
                        lambda f, **kw: opened.append(f) or real_open(f, **kw), raising=False)
    with pytest.raises(CheckpointError, match=rf"names {repr(to)}, a path outside the folder; only files "
                                              "inside the checkpoint folder are read"):
        LLaDAModel.from_pretrained(path)
    assert not any("outside" in f for f in opened)


def test_links_pointing_out_are_refused(outside):
    path, index, first = outside
    os.symlink(path.parent / "outside.safetensors", path / "model-00099-of-00099.safetensors")
    _point(path, index, first, "model-00099-of-00099.safetensors")
    with pytest.raises(CheckpointError, match=r"model-00099-of-00099.safetensors is a link to .*outside"
                                              r"\.safetensors, outside .*ckpt; only files inside"):
        LLaDAModel.from_pretrained(path)
    # config.json and the index are held to the same rule.
    for name in ("config.json", "model.safetensors.index.json"):
        (path.parent / name).write_bytes((path / name).read_bytes())
        (path / name).unlink()
        os.symlink(path.parent / name, path / name)
        with pytest.raises(CheckpointError, match=rf"{name} is a link to .*, outside"):
            LLaDAModel.from_pretrained(path)
        (path / name).unlink()
        shutil.move(path.parent / name, path / name)


def test_links_inside_the_folder_and_the_hugging_face_cache_layout(tmp_path):
    """Links that stay inside are fine, and so is a Hugging Face cache snapshot, whose files
    link to ../../blobs/<hash>."""
    model, path = _saved(tmp_path)
    (path / "weights").mkdir()
    shutil.move(path / "model.safetensors", path / "weights" / "data")
    os.symlink("weights/data", path / "model.safetensors")
    assert torch.equal(LLaDAModel.from_pretrained(path).lm_head_weight, model.lm_head_weight)

    repo = tmp_path / "models--org--llada"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, name in enumerate(("config.json", "model.safetensors")):
        shutil.copy(path / name, blobs / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snap / name)
    assert torch.equal(LLaDAModel.from_pretrained(snap).lm_head_weight, model.lm_head_weight)
    # ... but not beyond the cache's blobs/.
    (snap / "model.safetensors").unlink()
    os.symlink(path / "weights" / "data", snap / "model.safetensors")
    with pytest.raises(CheckpointError, match="is a link to .*, outside"):
        LLaDAModel.from_pretrained(snap)
