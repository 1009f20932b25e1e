"""remask_step: one LLaDA sampling step, batched, in one pass over the logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _backend, _checks
from ..reference import remask as reference

OP = "remask_step"
REMASKING = ("low_confidence", "random", "margin", "entropy")
LLADA_MASK_ID = 126336
CUDA_MAX_SPECIAL_IDS = 16  # kMaxSpecialIds in csrc/cuda/remask_step.cu: kernel parameters


def remask_step(
    logits: torch.Tensor,
    x: torch.Tensor,
    num_transfer: int | torch.Tensor,
    *,
    mask_id: int = LLADA_MASK_ID,
    block_end: int | torch.Tensor | None = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    threshold: float | None = None,
    uncond_logits: torch.Tensor | None = None,
    cfg_scale: float = 0.0,
    suppress_ids: Sequence[int] = (),
    zero_confidence_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of LLaDA's low-confidence remasking sampler, for a whole batch.

    For every candidate position (x == mask_id and position < block_end) it chooses a token x0
    and a confidence, then commits the num_transfer[b] most confident candidates of row b.

    Args:
        logits: [B, L, V] float32, bfloat16 or float16. Rows may be strided; the vocabulary
            dimension is made contiguous if it is not (a copy).
        x: [B, L] int64, the current tokens; mask_id marks the positions still to decode.
        num_transfer: int or [B] int64, k >= 0 per row. k above a row's candidate count
            commits every candidate, never a non-candidate.
        mask_id: the mask token id, in [0, V).
        block_end: None (= L), int, or [B] int64. Positions >= block_end[b] are never chosen.
        temperature: 0 takes x0 = argmax(logits). T > 0 samples x0 = argmax(logits + T * g) with
            g standard Gumbel noise (Gumbel-max), made from 53-bit uniforms so that its tail
            matches LLaDA's float64 noise.
        remasking: how a candidate is scored, all in fp32 on the noise-free logits:
            "low_confidence"  softmax(logits)[x0] (LLaDA's default);
            "random"          u ~ U[0, 1);
            "margin"          top-1 minus top-2 probability (Dream);
            "entropy"         sum p log p, the negative entropy (Dream).
        threshold: Fast-dLLM parallel decoding. Besides the top num_transfer[b], commit every
            candidate whose fp32 confidence >= threshold. Fast-dLLM's rule is num_transfer=1
            (always the best candidate, plus all above the threshold). SGLang's strict rule
            (confidence > tau) is threshold = the next fp32 above tau.
        uncond_logits: [B, L, V], same dtype as logits, for classifier-free guidance. The step
            reads un + (cfg_scale + 1) * (logits - un) in fp32, never materialising it.
        cfg_scale: the guidance scale s.
        suppress_ids: ids never chosen: their logits count as -inf (LLaDA's logits_eos_inf).
        zero_confidence_ids: ids whose logits count as -inf in the confidence softmax, after
            x0 is chosen (LLaDA's confidence_eos_eot_inf: pass (EOS, EoT) at temperature 0;
            at temperature > 0 the reference removes only EoT).
        generator: torch.Generator on the logits' device, for temperature > 0 and "random".
        backend: "reference", "cpu", "triton" or "cuda"; see llada_kernels._backend.

    Returns:
        x_new: [B, L] int64, x with the committed positions set to x0.
        transfer: [B, L] bool, the committed positions.

    Ties: confidences are compared in fp32, and equal confidences commit the lower position
    first, on every backend. At temperature 0, a row whose argmax is tied takes the lowest id.
    A row whose confidence logits are all -inf scores 0.
    """
    B, L, V = _check(logits, x, uncond_logits, remasking, temperature, mask_id, threshold)
    device = logits.device
    name = _backend.resolve(OP, backend, device)
    suppress = _checks.check_ids(OP, "suppress_ids", suppress_ids, V)
    zero_conf = _checks.check_ids(OP, "zero_confidence_ids", zero_confidence_ids, V)
    if len(set(suppress)) == V:
        _checks.fail(OP, f"suppress_ids covers the whole vocabulary (V={V}); nothing can be chosen")
    if name == "cuda" and len(set(suppress) | set(zero_conf)) > CUDA_MAX_SPECIAL_IDS:
        _checks.fail(OP, f"the cuda backend takes at most {CUDA_MAX_SPECIAL_IDS} distinct "
                         f"suppress_ids and zero_confidence_ids together; got "
                         f"{len(set(suppress) | set(zero_conf))}")
    k = _row_tensor("num_transfer", num_transfer, B, device, default=None)
    _checks.check_min(OP, "num_transfer", k, 0)
    end = _row_tensor("block_end", block_end, B, device, default=L)
    if generator is not None and generator.device != device:
        _checks.fail(OP, f"generator is on {generator.device} but logits is on {device}")

    if name == "reference":
        return reference.remask_step(
            logits, x, k, mask_id=mask_id, block_end=end, temperature=temperature,
            remasking=remasking, threshold=threshold, uncond_logits=uncond_logits,
            cfg_scale=cfg_scale, suppress_ids=suppress, zero_confidence_ids=zero_conf,
            generator=generator)

    seed = None
    if temperature > 0 or remasking == "random":
        # One draw from the caller's generator, on the logits' device: no host sync.
        seed = torch.empty(1, dtype=torch.int64, device=device).random_(generator=generator)
    op = torch.ops.llada.remask_step_triton if name == "triton" else torch.ops.llada.remask_step
    return op(_checks.unit_stride(logits), None if uncond_logits is None else _checks.unit_stride(uncond_logits),
              float(cfg_scale), x, k, end, int(mask_id), float(temperature), remasking,
              None if threshold is None else float(threshold), suppress, zero_conf, seed)


def _check(logits, x, uncond_logits, remasking, temperature, mask_id, threshold):
    _checks.check_tensor(OP, "logits", logits, dtypes=_checks.FLOAT_DTYPES, ndim=3)
    B, L, V = logits.shape
    _checks.check_tensor(OP, "x", x, dtypes=(torch.int64,), ndim=2)
    _checks.check_shape(OP, "x", x, (B, L))
    _checks.check_device(OP, "x", x, logits.device, "logits")
    if uncond_logits is not None:
        _checks.check_tensor(OP, "uncond_logits", uncond_logits, dtypes=(logits.dtype,), ndim=3)
        _checks.check_shape(OP, "uncond_logits", uncond_logits, (B, L, V))
        _checks.check_device(OP, "uncond_logits", uncond_logits, logits.device, "logits")
    if remasking not in REMASKING:
        _checks.fail(OP, f"remasking must be one of {REMASKING}; got {remasking!r}")
    if not temperature >= 0:  # also rejects NaN
        _checks.fail(OP, f"temperature must be >= 0; got {temperature}")
    if threshold is not None and threshold != threshold:
        _checks.fail(OP, f"threshold must be a number or None; got {threshold}")
    if isinstance(mask_id, bool) or not isinstance(mask_id, int) or not 0 <= mask_id < V:
        _checks.fail(OP, f"mask_id must be an int in [0, V={V}); got {mask_id!r}")
    if L >= 2**31:
        _checks.fail(OP, f"L must be < 2^31; got {L}")
    return B, L, V


def _row_tensor(name, value, B, device, default):
    """An int, None or [B] tensor -> a contiguous [B] int64 tensor on `device`."""
    if value is None:
        if default is None:
            _checks.fail(OP, f"{name} is required", TypeError)
        value = default
    if isinstance(value, torch.Tensor):
        _checks.check_tensor(OP, name, value, dtypes=(torch.int64, torch.int32))
        if value.dim() == 0:
            value = value.expand(B)
        _checks.check_shape(OP, name, value, (B,))
        _checks.check_device(OP, name, value, device, "logits")
        return value.to(torch.int64).contiguous()
    if isinstance(value, bool) or not isinstance(value, int):
        _checks.fail(OP, f"{name} must be an int or a [B] int64 tensor; got {type(value).__name__}", TypeError)
    if value < 0:
        _checks.fail(OP, f"{name} must be >= 0; got {value}")
    return torch.full((B,), value, dtype=torch.int64, device=device)


def _fake(logits, uncond_logits, cfg_scale, x, num_transfer, block_end, mask_id, temperature,
          remasking, threshold, suppress_ids, zero_confidence_ids, seed):
    return torch.empty_like(x), torch.empty(x.shape, dtype=torch.bool, device=x.device)


def register_fakes():
    for name in ("llada::remask_step", "llada::remask_step_triton"):
        torch.library.register_fake(name)(_fake)
