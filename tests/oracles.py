"""Where other projects' code we test against lives (shared/oracles, beside the repository or
above it), for tests that import or read it and skip cleanly without it."""

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
