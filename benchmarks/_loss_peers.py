"""Other projects' fused linear cross-entropy as providers of the fused-loss benchmark, each
where it runs (both are in requirements.txt; a provider that does not import is left out):

    cce_torch_compile   Cut Cross-Entropy's torch.compile implementation (CPU and CUDA):
                        cut_cross_entropy.linear_cross_entropy(h, W, t, reduction="none",
                        impl="torch_compile"); its first call compiles (the warm-up).
    cce                 Cut Cross-Entropy's Triton kernels (CUDA only): impl="cce".
    liger               Liger Kernel's fused linear cross-entropy (CUDA only: Triton kernels),
                        LigerFusedLinearCrossEntropyFunction with reduction="none".

Neither takes LLaDA's per-token weight 1 / p_mask, so each runs on the masked rows only
(hidden[masked] [N, D], targets[masked] [N], the gather included in its time, as our fused op
gathers them too), returns the per-token cross-entropy (reduction "none"), and the weighting is
applied outside: (ce / p_mask[masked]).sum(), the same value as our loss, then backward.
"""

from __future__ import annotations

import importlib.util

import torch


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _cce(impl):
    def ce(hidden, weight, targets):
        from cut_cross_entropy import linear_cross_entropy

        return linear_cross_entropy(hidden, weight, targets, reduction="none", impl=impl)
    return ce


def _liger(hidden, weight, targets):
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    return LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, targets, None, None, -100,
                                                      0.0, 0.0, "none")[0]


PEERS = {"cce_torch_compile": (_cce("torch_compile"), "cut_cross_entropy", ("cpu", "cuda")),
         "cce": (_cce("cce"), "cut_cross_entropy", ("cuda",)),
         "liger": (_liger, "liger_kernel", ("cuda",))}


def fused_loss_peers(device: str) -> list[str]:
    """The peers that import here and run on `device`."""
    return [name for name, (_, module, devices) in PEERS.items()
            if device in devices and _importable(module)]


def fused_loss(provider, hidden, weight, ids, masked, p_mask) -> torch.Tensor:
    """sum over masked of CE / p_mask through a peer; hidden [B, L, D], weight [V, D]."""
    p = p_mask if p_mask.dim() == 2 else p_mask[:, None].expand_as(masked)
    ce = PEERS[provider][0](hidden[masked], weight, ids[masked])
    return (ce.float() / p[masked].float()).sum()
