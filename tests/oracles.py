"""Where other projects' code we test against lives (shared/oracles, beside the repository or
above it), for tests that import or read it and skip cleanly without it."""

import importlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def oracle_dir(*parts: str) -> Path:
    """shared/oracles/<parts> from $LLADA_SHARED or the first shared/ above the repository;
    skips the test when it is absent."""
    candidates = [Path(os.environ["LLADA_SHARED"])] if os.environ.get("LLADA_SHARED") else []
    candidates += [p / "shared" for p in ROOT.parents]
    for shared in candidates:
        path = shared.joinpath("oracles", *parts)
        if path.exists():
            return path
    pytest.skip(f"shared/oracles/{'/'.join(parts)} is absent (it sits beside the repository in "
                "CI and on developer machines)")


def released_llada(ours):
    """The released architecture (dllm's copy of LLaDA's modeling_llada.py, imported from
    shared/oracles, not copied) holding the weights of `ours`, an llada_kernels LLaDAModel:
    an LLaDAModelLM on the CPU. The file builds its inner model on "cuda"; this passes it an
    inner model built with init_device="cpu" instead (its `model=` argument). Skips without
    transformers or the oracle."""
    import importlib.util
    import sys

    pytest.importorskip("transformers")
    folder = oracle_dir("dllm", "llada")
    name = "oracle_llada_released"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package  # a namespace: the folder has no __init__.py
    modeling = importlib.import_module(f"{name}.modeling_llada")
    config = modeling.LLaDAConfig(**ours.config.to_dict())
    model_config = modeling.create_model_config_from_pretrained_config(config)
    model_config.init_device = "cpu"
    hf = modeling.LLaDAModelLM(config, model=modeling.LLaDAModel(model_config, init_params=False))
    hf.load_state_dict(ours.state_dict())
    return hf.to(next(ours.parameters()).dtype)
