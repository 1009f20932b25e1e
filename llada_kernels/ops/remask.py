"""remask_step: one LLaDA sampling step, batched, in one pass over the logits."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from .. import _backend, _checks
from ..constants import MASK_ID as LLADA_MASK_ID
from ..distributed import _exchange
from ..reference import remask as reference

OP = "remask_step"
REMASKING = ("low_confidence", "random", "margin", "entropy")
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
    edit_threshold: float | None = None,
    editable: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
    group=None,
    vocab_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of LLaDA's low-confidence remasking sampler, for a whole batch.

    For every candidate position (x == mask_id and position < block_end) it chooses a token x0
    and a confidence, then commits the num_transfer[b] most confident candidates of row b.
    With edit_threshold (LLaDA2.1's token editing), editable positions that hold a committed
    token are scored in the same pass and take x0 when it differs with confidence above it.

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
        threshold: a real number (not NaN) or None. Fast-dLLM parallel decoding: besides the
            top num_transfer[b], commit every candidate whose fp32 confidence >= threshold. Fast-dLLM's rule is num_transfer=1
            (always the best candidate, plus all above the threshold). SGLang's strict rule
            (confidence > tau) is threshold = the next fp32 above tau.
        uncond_logits: [B, L, V], same dtype as logits, for classifier-free guidance. The step
            reads un + (cfg_scale + 1) * (logits - un) in fp32, never materialising it.
        cfg_scale: the guidance scale s, a real number finite in fp32.
        suppress_ids: ids never chosen: their logits count as -inf (LLaDA's logits_eos_inf).
        zero_confidence_ids: ids whose logits count as -inf in the confidence softmax, after
            x0 is chosen (LLaDA's confidence_eos_eot_inf: pass (EOS, EoT) at temperature 0;
            at temperature > 0 the reference removes only EoT).
        edit_threshold: None (no editing) or a real number >= 0 (not NaN): LLaDA2.1's token
            editing (diffusers' BlockRefinementScheduler, editing_threshold). An editable
            position holding a committed token (x != mask_id; block_end does not apply) gets
            x0 and its confidence by the same rules as a candidate, with its own noise (the
            same CFG, suppress_ids, zero_confidence_ids and non-finite contract), and is
            replaced by x0 iff x0 != x and confidence > edit_threshold, strictly, in fp32.
            Edited positions take no part in the selection of candidates (num_transfer and
            threshold count candidates only). A confidence of 0, as non-finite rows score,
            is never above it; above 1 nothing is edited. remasking must be
            "low_confidence" (the rule compares p(x0)).
        editable: [B, L] bool on the logits' device, the positions editing may change (e.g.
            not the prompt); masked positions in it are candidates as usual, never edited.
            None: every committed position (as diffusers without a prompt_mask). Only with
            edit_threshold.
        generator: torch.Generator on the logits' device, for temperature > 0 and "random".
            Under torch.compile it must be None (compiled code cannot take a generator): the
            draws then come from the global RNG, seeded by torch.manual_seed.
        backend: "reference", "cpu", "triton" or "cuda"; see llada_kernels._backend.
        group, vocab_offset: vocabulary parallelism (llada_kernels.distributed): a
            torch.distributed process group over which the vocabulary is split, and the first
            id of this rank's shard. logits (and uncond_logits) are then the shard
            [B, L, V_r] of ids [vocab_offset, vocab_offset + V_r) (uneven shards allowed);
            x, num_transfer, block_end, the ids (global) and the generator's state are the
            same on every rank. Each rank scores its shard with the single-device kernel in
            statistics mode, the ranks all-gather 24 bytes per position (never logits), and
            every rank merges them into the same (x_new, transfer): x0 exactly the
            single-process choice at every temperature (the noise is keyed by the global id),
            confidences equal to fp32 rounding. Editing works there too (the editable
            positions are scored with the candidates).

    Returns:
        x_new: [B, L] int64, x with the committed and edited positions set to x0.
        transfer: [B, L] bool, the committed candidates and the edited positions (edited ones
            are those where x != mask_id).

    Ties: confidences are compared in fp32, and equal confidences commit the lower position
    first, on every backend. At temperature 0, a row whose argmax is tied takes the lowest id.

    Non-finite logits, the same on every backend (README, "Non-finite and extreme inputs"):
        x0          in torch.argmax's order over the fp32 logits after guidance, with
                    suppress_ids at -inf: the first NaN id, else the first +inf id, at every
                    temperature (noise never moves them); else the (Gumbel-)argmax of the
                    finite logits, never a -inf id; a row of -inf takes the lowest id that is
                    not suppressed.
        confidence  the formulas above, in fp32; where they are undefined (a NaN or +inf
                    confidence logit, or none finite) the confidence is 0, ranked with every
                    other 0 by position: below any positive confidence, above every
                    "entropy" score of a finite row (those are negative).
        guidance    un + (s + 1) (cond - un) in fp32: an inf or NaN it makes is a logit
                    like any other.

    Raises:
        TypeError, ValueError: naming the argument, before any backend runs: tensors' dtypes,
        shapes and devices; mask_id an int in [0, V); num_transfer and block_end ints in
        [0, 2^63) or [B] integer tensors; temperature (>= 0) and cfg_scale real and finite in
        fp32; threshold real; the ids iterables of ints in [0, V); generator a torch.Generator;
        edit_threshold real >= 0 with remasking="low_confidence"; editable a [B, L] bool tensor
        on the logits' device, given only with edit_threshold.
    """
    vocab_offset = _exchange.check_args(OP, group, vocab_offset)
    B, L, V = _check(logits, x, uncond_logits, remasking)
    device = logits.device
    # A shard's ids are checked against the whole vocabulary later (that takes a collective).
    top = V if group is None else 2**62
    mask_id = _checks.check_int(OP, "mask_id", mask_id, 0, top - 1)
    temperature = _checks.check_real(OP, "temperature", temperature, lo=0.0, f32=True)
    cfg_scale = _checks.check_real(OP, "cfg_scale", cfg_scale, f32=True)
    if threshold is not None:
        threshold = _checks.check_real(OP, "threshold", threshold, finite=False)
    edit_threshold = _check_editing(edit_threshold, editable, remasking, B, L, device)
    _checks.check_generator(OP, "generator", generator, device, "logits")
    if generator is not None and torch.compiler.is_compiling():
        _checks.fail(OP, "generator must be None under torch.compile, which cannot trace a "
                         "torch.Generator: the draws then come from the global RNG "
                         "(torch.manual_seed)")
    name = _backend.resolve(OP, backend, device)
    suppress = _checks.check_ids(OP, "suppress_ids", suppress_ids, top)
    zero_conf = _checks.check_ids(OP, "zero_confidence_ids", zero_confidence_ids, top)
    if len(set(suppress)) == V and group is None:
        _checks.fail(OP, f"suppress_ids covers the whole vocabulary (V={V}); nothing can be chosen")
    if name == "cuda" and len(set(suppress) | set(zero_conf)) > CUDA_MAX_SPECIAL_IDS:
        _checks.fail(OP, f"the cuda backend takes at most {CUDA_MAX_SPECIAL_IDS} distinct "
                         f"suppress_ids and zero_confidence_ids together; got "
                         f"{len(set(suppress) | set(zero_conf))}")
    k = _row_tensor("num_transfer", num_transfer, B, device, default=None)
    _checks.check_min(OP, "num_transfer", k, 0)
    end = _row_tensor("block_end", block_end, B, device, default=L)

    if group is not None:
        from ..distributed import remask as vocab_parallel
        return vocab_parallel.remask_step(
            logits, x, k, end, mask_id=mask_id, temperature=temperature, remasking=remasking,
            threshold=threshold, uncond_logits=uncond_logits, cfg_scale=cfg_scale,
            suppress_ids=suppress, zero_confidence_ids=zero_conf, generator=generator,
            edit_threshold=edit_threshold, editable=editable, backend=name, group=group,
            offset=vocab_offset, op=OP)
    if name == "reference":
        return reference.remask_step(
            logits, x, k, mask_id=mask_id, block_end=end, temperature=temperature,
            remasking=remasking, threshold=threshold, uncond_logits=uncond_logits,
            cfg_scale=cfg_scale, suppress_ids=suppress, zero_confidence_ids=zero_conf,
            generator=generator, edit_threshold=edit_threshold, editable=editable)

    seed = None
    if temperature > 0 or remasking == "random":
        # One draw from the caller's generator, on the logits' device: no host sync, and an
        # out-of-place op that torch.compile traces (Tensor.random_ breaks the graph).
        seed = torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, device=device, generator=generator)
    op = torch.ops.llada.remask_step_triton if name == "triton" else torch.ops.llada.remask_step
    return op(_checks.unit_stride(logits), None if uncond_logits is None else _checks.unit_stride(uncond_logits),
              cfg_scale, x, k, end, mask_id, temperature, remasking, threshold, suppress, zero_conf, seed,
              edit_threshold, editable)


def _check_editing(edit_threshold, editable, remasking, B, L, device):
    """edit_threshold None or real >= 0 (not NaN) with low_confidence remasking; editable None
    or a [B, L] bool tensor on `device`, only with edit_threshold. Returns edit_threshold."""
    if editable is not None:
        if edit_threshold is None:
            _checks.fail(OP, "editable needs edit_threshold: it says which positions token "
                             "editing may change, and editing is off without a threshold")
        _checks.check_tensor(OP, "editable", editable, dtypes=(torch.bool,), ndim=2)
        _checks.check_shape(OP, "editable", editable, (B, L))
        _checks.check_device(OP, "editable", editable, device, "logits")
    if edit_threshold is None:
        return None
    edit_threshold = _checks.check_real(OP, "edit_threshold", edit_threshold, finite=False, lo=0.0)
    if remasking != "low_confidence":
        _checks.fail(OP, f"edit_threshold needs remasking='low_confidence' (token editing "
                         f"compares p(x0) with it); got remasking={remasking!r}")
    return edit_threshold


def _check(logits, x, uncond_logits, remasking):
    _checks.check_tensor(OP, "logits", logits, dtypes=_checks.FLOAT_DTYPES, ndim=3)
    B, L, V = logits.shape
    _checks.check_tensor(OP, "x", x, dtypes=(torch.int64,), ndim=2)
    _checks.check_shape(OP, "x", x, (B, L))
    _checks.check_device(OP, "x", x, logits.device, "logits")
    if uncond_logits is not None:
        _checks.check_tensor(OP, "uncond_logits", uncond_logits, dtypes=(logits.dtype,), ndim=3)
        _checks.check_shape(OP, "uncond_logits", uncond_logits, (B, L, V))
        _checks.check_device(OP, "uncond_logits", uncond_logits, logits.device, "logits")
    if not isinstance(remasking, str) or remasking not in REMASKING:
        _checks.fail(OP, f"remasking must be one of {REMASKING}; got {remasking!r}")
    if V == 0:
        _checks.fail(OP, "logits must have a vocabulary dimension V >= 1; got 0")
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
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _checks.fail(OP, f"{name} must be an int or a [B] int64 tensor; got {type(value).__name__} "
                         f"{value!r}", TypeError)
    value = _checks.check_int(OP, name, value, 0, 2**63 - 1)
    return torch.full((B,), value, dtype=torch.int64, device=device)


def _fake(logits, uncond_logits, cfg_scale, x, num_transfer, block_end, mask_id, temperature,
          remasking, threshold, suppress_ids, zero_confidence_ids, seed, edit_threshold=None,
          editable=None):
    return torch.empty_like(x), torch.empty(x.shape, dtype=torch.bool, device=x.device)


def _stats_fake(logits, uncond_logits, cfg_scale, x, block_end, mask_id, temperature, remasking,
                suppress_ids, zero_confidence_ids, seed, vocab_offset):
    B, L, _ = logits.shape
    return logits.new_empty((B, L, 4), dtype=torch.float32), torch.empty_like(x)


def register_fakes():
    for name in ("llada::remask_step", "llada::remask_step_triton"):
        torch.library.register_fake(name)(_fake)
    for name in ("llada::remask_step_stats", "llada::remask_step_stats_triton"):
        torch.library.register_fake(name)(_stats_fake)
