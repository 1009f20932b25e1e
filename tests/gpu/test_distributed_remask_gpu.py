"""Vocabulary-parallel remask_step on CUDA tensors (issue 13 item 2): the per-shard statistics
of the Triton and CUDA kernels (llada::remask_step_stats), merged as the ranks merge them
(llada_kernels.distributed.remask.merge), give the single-device step of the same backend at
T = 0 and T > 0 (the noise is keyed by the global id, so sharding changes no draw).
Skipped without a GPU; the exchange itself is tested on gloo in tests/test_distributed_*.py."""

import pytest
import torch

import gpu_common
from gpu_common import GPU
from llada_kernels.distributed import remask as vp
from llada_kernels.reference import remask as ref
from test_remask_step import MASK, MODES, rows, tie_free

pytestmark = GPU
SPLITS = [(0, 300), (300, 301), (301, 1037)]  # uneven, a one-id shard, odd offsets
SEED = 987654321


def kernels(backend):
    """(stats op, single-device step op) of `backend`."""
    if backend == "triton":
        return torch.ops.llada.remask_step_stats_triton, torch.ops.llada.remask_step_triton
    return torch.ops.llada.remask_step_stats, torch.ops.llada.remask_step


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_shards_merge_to_the_single_device_step(backend, mode, temperature):
    dev = gpu_common.DEVICE
    B, L, V = 2, 33, SPLITS[-1][1]
    k = torch.tensor([3, 5])
    logits, x, _ = tie_free(B, L, V, k, rows(L, B), mode)
    logits, x, k = logits.to(dev), x.to(dev), k.to(dev)
    end = torch.full((B,), L, device=dev)
    seed = torch.tensor([SEED], device=dev)
    stats_op, step_op = kernels(backend)
    stats, x0s = [], []
    for lo, hi in SPLITS:
        st, x0 = stats_op(logits[..., lo:hi].contiguous(), None, 0.0, x, end, MASK, temperature,
                          mode, [], [], seed, lo)
        stats.append(st.reshape(B * L, 4))
        x0s.append(x0.reshape(B * L))
    choice, conf = vp.merge(torch.stack(stats), torch.stack(x0s), mode)
    transfer = ref.select(conf.view(B, L), x == MASK, k, None)
    want = step_op(logits, None, 0.0, x, k, end, MASK, temperature, mode, None, [], [], seed)
    assert torch.equal(transfer, want[1]), f"transfer differs:\n{transfer.int()}\n{want[1].int()}"
    assert torch.equal(torch.where(transfer, choice.view(B, L), x), want[0])
