"""The block-diffusion sampler (LLaDA2.0/2.1, SDAR, Fast-dLLM v2) with an exact KV cache.

The sequence is decoded block by block, left to right; inside a block, masked positions are
filled in parallel over a few steps. Attention is block-causal, so once a block is committed
its keys and values never change: caching them is exact, not an approximation (unlike
Fast-dLLM v1's prefix cache for LLaDA 1).

    x = block_generate(model, prompt, gen_length=256)              # LLaDA2's defaults
    x, stats = block_generate(model, prompt, gen_length=256, threshold=0.9,
                              editing_threshold=0.5, stop_at_eos=True, return_stats=True)

The cache (cache="exact", the default): every step runs only the current block's queries
against the cached keys/values of the committed blocks plus the block itself, and the
lm_head only on the block. A committed block's keys and values are computed once from its
final tokens, by an extra forward over the clean block as dInfer does, but fused into the
first step of the next block: that call runs [committed block ; next block] (block-causal, so
the committed block does not see the next one), keeps the committed block's keys and values,
and gives the next block's logits. So a block costs `steps` calls, as without the cache.
(Keeping the keys and values of a block's last denoising step instead would save nothing and
be inexact: that step's input still held masks.) cache=None recomputes the whole
block-causal forward at every step: the definition the cached tokens are tested against.

One step (LLaDA2's generate and diffusers' BlockRefinementScheduler, at temperature 0 the
same tokens as diffusers' LLaDA2Pipeline):
  * x0 = argmax of the logits (T = 0), or a sample at temperature T; confidence = the fp32
    softmax probability of x0 (remask_step's low_confidence);
  * commit the k_s most confident masked positions of the block, plus every masked position
    whose confidence > threshold (strictly, as LLaDA2); k_s spreads block_length evenly over
    the steps, so with steps <= block_length every step commits at least one token
    (LLaDA2's rule); threshold=None (or > 1) is plain low-confidence top-k;
  * editing (LLaDA2.1, editing_threshold): a committed, non-prompt position of the block is
    replaced by x0 when x0 differs and its confidence > editing_threshold (remask_step's
    edit_threshold, in the step's one pass over the logits). Once the block has
    no mask left, steps continue while some position was edited, at most max_post_steps.

Uniform corruption (corruption="uniform", DiffusionGemma's mode of diffusers'
BlockRefinementScheduler, which selects it with mask_token_id=None): there is no [MASK]. A
block starts as uniformly random ids, and every step the model sees the whole block:
  * x0 and its confidence as above, at every position;
  * commit, among the positions not yet committed, the most confident ones still owed by a
    cumulative quota (after step s, ceil((s + 1) * n / steps) of the block's n generated
    positions are committed), plus every one whose confidence > threshold;
  * editing (editing_threshold): a position committed at an earlier step is replaced by x0
    when x0 differs and its confidence > editing_threshold;
  * every position still uncommitted is renoised with fresh uniformly random ids.
A block takes exactly `steps` steps (steps may exceed b: some steps then commit nothing and
only refine). The ids are drawn with torch.randint(0, V, (B, b), generator=generator) for the
whole batch, once at the start of each block and once after every step (the pipeline's and
the scheduler's draws, so at temperature 0 the tokens are DiffusionGemmaPipeline's with the
same generator); prompt positions of the block count as committed and are never edited.
With stop_at_eos, a row whose generation holds eos_id at the end of a block is finished.

Layout (LLaDA2's and diffusers'): blocks are aligned to absolute positions 0, b, 2b, ...; the
prompt's last partial block is decoded together with the first generated tokens; the
sequence is padded to a multiple of b and the padding past Lp + gen_length is decoded but
hidden as keys (diffusers' convention). A batch of prompts of different lengths is
left-padded, with attention_mask 0 on the padding (hidden as keys; positions stay absolute).

Shapes: B batch, Lp prompt, b block_length, V vocabulary, T = ceil((Lp + gen_length) / b) * b.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import _checks, masks
from .generate import crop_cache
from .ops.remask import remask_step

CACHES = ("exact", None)
CORRUPTIONS = ("mask", "uniform")


@dataclass
class BlockGenerateStats:
    """What a block_generate() call did: model_calls counts forward passes."""

    model_calls: int = 0
    calls_per_block: list[int] = field(default_factory=list)
    finished_rows_per_block: list[int] = field(default_factory=list)


def transfer_schedule(block_length: int, steps: int) -> list[int]:
    """k_s, the tokens committed at step s: block_length spread evenly over the steps (the
    first block_length % steps steps one more), LLaDA2's and diffusers' schedule."""
    base, rem = divmod(block_length, steps)
    return [base + (s < rem) for s in range(steps)]


def block_generate(model, prompt, attention_mask=None, *, gen_length=2048, block_length=None,
                   steps=None, temperature=0.0, threshold=0.95, editing_threshold=None,
                   max_post_steps=16, minimal_topk=1, stop_at_eos=False, mask_id=None,
                   eos_id=None, cache="exact", generator=None, backend=None,
                   return_stats=False, corruption="mask"):
    """Sample a completion of every prompt, block by block, with an exact KV cache.

    Args:
        model: an LLaDAModel in block-diffusion mode (config.block_size set), or a model
            patched by llada_kernels.patch.patch_llada2 (LLaDA2's own model file).
        prompt: [B, Lp] int64, left-padded when prompts differ in length.
        attention_mask: [B, Lp] (1 = token, 0 = padding) or None.
        gen_length: tokens to generate.
        block_length: b, default the model's config.block_size; a multiple of it for an
            LLaDAModel (so that committed blocks are attention blocks).
        steps: refinement steps per block (default b), capped at gen_length // minimal_topk
            as LLaDA2 does.
        temperature: 0 = argmax; T > 0 samples x0 (Gumbel-max, remask_step) with `generator`.
            The confidence is softmax(logits)[x0] (LLaDA 1's rule; LLaDA2 takes the tempered
            softmax(logits / T)[x0]).
        threshold: commit every masked position with confidence > threshold besides the
            schedule's top-k; None: top-k only.
        editing_threshold: LLaDA2.1's token editing (None or <= 0: off); max_post_steps: the
            editing steps after a block's last mask, at most.
        minimal_topk: caps steps at gen_length // minimal_topk (LLaDA2's and diffusers' use
            of it).
        stop_at_eos: a row whose generation holds eos_id with no mask before it is finished:
            it is frozen at once, leaves the batch at the end of the block, and its positions
            after the EOS are set to eos_id. Rows still running get the same tokens.
        mask_id, eos_id: default the model's config.mask_token_id / eos_token_id.
        cache: "exact" (the KV cache above) or None (recompute the whole window every step).
        generator: torch.Generator for temperature > 0.
        backend: remask_step's backend.
        return_stats: also return a BlockGenerateStats.
        corruption: "mask" (LLaDA2: blocks start as mask_id, the steps above) or "uniform"
            (DiffusionGemma: blocks start as random ids, the steps of "Uniform corruption"
            above; mask_id is not used, steps is not capped, max_post_steps and minimal_topk
            do not apply, editing_threshold must be None or > 0, and generator also drives
            the random ids).

    Returns:
        x [B, Lp + gen_length] int64 (prompt then generation), and the stats with
        return_stats.

    Host synchronisation: one per step (whether masks remain, edits happened, rows finished),
    as the references.
    """
    _check_model(model)
    config = getattr(model, "config", None)
    if corruption not in CORRUPTIONS:
        _fail(f"corruption must be one of {CORRUPTIONS}; got {corruption!r}")
    uniform = corruption == "uniform"
    mask_id = _id(mask_id, config, "mask_token_id", required=not uniform)
    eos_id = _id(eos_id, config, "eos_token_id", required=stop_at_eos)
    b = _check(model, prompt, attention_mask, gen_length, block_length, steps, temperature,
               threshold, editing_threshold, max_post_steps, minimal_topk, mask_id, cache)
    if uniform:
        return _generate_uniform(model, prompt, attention_mask, gen_length, b, steps or b,
                                 temperature, threshold, editing_threshold, stop_at_eos,
                                 eos_id, cache, generator, backend, return_stats)
    steps = min(b if steps is None else steps, max(gen_length // minimal_topk, 1))
    schedule = transfer_schedule(b, steps)
    strict = None if threshold is None else _next_fp32(threshold)
    editing = editing_threshold is not None and editing_threshold > 0

    with torch.inference_mode():
        B, Lp = prompt.shape
        device = _device(model)
        x, am = _canvas(prompt, attention_mask, gen_length, b, mask_id, device)
        T = x.shape[1]
        stats = BlockGenerateStats()
        runner = _Runner(model, b, cache)
        rows = torch.arange(B, device=device)          # the rows still running (stop_at_eos)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for n in range(Lp // b, T // b):
            s, e = n * b, (n + 1) * b
            xa, ama, done_a = x[rows], am[rows], done[rows]
            editable = torch.arange(s, e, device=device) >= Lp              # [b] not prompt
            step = post = calls = 0
            left = bool(((xa[:, s:e] == mask_id) & ~done_a[:, None]).any())  # masks left
            while True:
                block = xa[:, s:e].clone()
                post += not left
                logits = runner.logits(xa, ama, s, e)                             # [B', b, V]
                k = schedule[min(step, steps - 1)] if left else 0
                # LLaDA2.1's editing in the same pass: committed, non-prompt positions whose
                # x0 differs with confidence > editing_threshold (remask_step's edit rule).
                edit = dict(edit_threshold=editing_threshold,
                            editable=editable.expand_as(block)) if editing else {}
                new, transfer = remask_step(logits, block, k, mask_id=mask_id,
                                            temperature=temperature, threshold=strict,
                                            generator=generator, backend=backend, **edit)
                edited = transfer & (block != mask_id)
                xa[:, s:e] = torch.where(done_a[:, None], block, new)
                calls += 1
                step += left
                if stop_at_eos:
                    done_a |= _finished(xa[:, Lp:e], mask_id, eos_id)
                edited &= ~done_a[:, None]
                still, any_edit, all_done = torch.stack([
                    ((xa[:, s:e] == mask_id) & ~done_a[:, None]).any(), edited.any(),
                    done_a.all()]).tolist()
                # diffusers' check_block_should_continue, less its last call when nothing
                # is left to do (no mask and no editing: that call could change nothing).
                if all_done or (not left and not (editing and any_edit)) \
                        or (left and step >= steps) or (not left and post > max_post_steps) \
                        or (not editing and not still):
                    break
                left = still
            stats.model_calls += calls
            stats.calls_per_block.append(calls)
            x[rows], done[rows] = xa, done_a
            if stop_at_eos:
                rows = _keep_running(rows, ~done_a, done, runner, stats)
                if len(rows) == 0:
                    break
        x = x[:, :Lp + gen_length]
        if stop_at_eos:
            x[:, Lp:] = _after_eos(x[:, Lp:], eos_id)
    x = x.clone()  # an ordinary tensor, not an inference tensor
    return (x, stats) if return_stats else x


def _canvas(prompt, attention_mask, gen_length, b, fill, device):
    """The sequence block_generate decodes: x [B, T] int64 (the prompt, then `fill` up to T, the
    prompt plus gen_length rounded up to a multiple of b) and its key padding am [B, T] bool
    (the prompt's attention_mask, the generated positions, not the padding past them)."""
    B, Lp = prompt.shape
    T = -(-(Lp + gen_length) // b) * b
    x = torch.full((B, T), fill, dtype=torch.long, device=device)
    x[:, :Lp] = prompt.to(device)
    am = torch.zeros(B, T, dtype=torch.bool, device=device)
    am[:, :Lp] = True if attention_mask is None else attention_mask.to(device).bool()
    am[:, Lp:Lp + gen_length] = True
    return x, am


def _keep_running(rows, keep, done, runner, stats):
    """After a block with stop_at_eos: record how many rows are finished, and keep the rows
    (indices into the batch) and the runner's cache rows where keep [B'] is True."""
    stats.finished_rows_per_block.append(int(done.sum()))
    if not bool(keep.all()):
        rows = rows[keep]
        runner.keep_rows(keep)
    return rows


def _finished(gen, mask_id, eos_id):
    """[B', n] generated tokens -> [B'] bool: an EOS with no mask before the first one."""
    is_eos = gen == eos_id
    before = is_eos.long().cumsum(1) == 0                       # positions before the first EOS
    return is_eos.any(1) & ~((gen == mask_id) & before).any(1)


def _after_eos(gen, eos_id):
    """Positions after each row's first EOS set to eos_id."""
    after = (gen == eos_id).long().cumsum(1) > 0
    return torch.where(after, eos_id, gen)


class _Runner:
    """The model calls of one block_generate: logits of the current block [s, e), with the
    exact cache of positions [0, C) (C = the start of the block once its first step ran)."""

    def __init__(self, model, b, cache):
        self.model, self.b, self.cache = model, b, cache
        self.fast = hasattr(model, "hidden_states") and hasattr(model, "lm_head")
        self.kv = None          # LLaDAModel: per layer (k, v) [B', Hkv, C, Dh]; HF: DynamicCache
        self.C = 0

    def logits(self, x, am, s, e):
        start = self.C if self.cache else 0
        first = self.cache and self.C < s        # this call also writes [C, s) into the cache
        if self.fast:
            out = self.model.hidden_states(
                x[:, start:e], am[:, :e], past_kv=self.kv if start else None,
                return_kv=first, output_positions=slice(s - start, e - start), check_ids=False)
            h = out[0] if first else out
            if first:
                self.kv, self.C = [(k[:, :, :s], v[:, :, :s]) for k, v in out[1]], s
            return self.model.lm_head(h)
        return self._hf_logits(x, am, start, s, e, first)

    def _hf_logits(self, x, am, start, s, e, first):
        """A patched LLaDA2 (HF) model: its DynamicCache, cropped back to the committed
        blocks after each call, and the block-causal mask as an AttentionMask."""
        if self.cache and self.kv is None:
            from transformers import DynamicCache

            self.kv = DynamicCache()
        mask = masks.block_causal(self.b, seq_len=e, q_len=e - start, key_padding_mask=am[:, :e])
        pos = torch.arange(start, e, device=x.device)[None].expand(x.shape[0], -1)
        out = self.model(input_ids=x[:, start:e], attention_mask=mask, position_ids=pos,
                         past_key_values=self.kv if self.cache else None,
                         use_cache=bool(self.cache))
        if self.cache:
            crop_cache(self.kv, s)
            self.C = s
        return out.logits[:, s - start:]

    def keep_rows(self, keep):
        if not self.cache or self.kv is None:
            return
        if self.fast:
            self.kv = [(k[keep], v[keep]) for k, v in self.kv]
        else:
            self.kv.batch_select_indices(keep.nonzero()[:, 0])


def _device(model):
    device = getattr(model, "device", None)
    return device if device is not None else next(model.parameters()).device


def _next_fp32(t):
    """The smallest fp32 above fp32(t): `conf >= that` is `conf > t` in fp32 (LLaDA2's rule)."""
    t32 = torch.tensor(float(t), dtype=torch.float32)
    return float(torch.nextafter(t32, torch.tensor(math.inf)))


def _id(value, config, name, required):
    if value is None:
        value = getattr(config, name, None)
    if value is None and required:
        _fail(f"{name.replace('_token', '')} is needed: the model's config has no {name}")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        _fail(f"{name.replace('_token', '')} must be an int; got {value!r}", TypeError)
    return value


def _fail(msg, exc=ValueError):
    raise exc(f"block_generate: {msg}")


def _check_model(model):
    fast = hasattr(model, "hidden_states") and hasattr(model, "lm_head")
    if fast and getattr(model.config, "block_size", None) is None:
        _fail("the model is not in block-diffusion mode (config.block_size is None); use "
              "llada_kernels.generate.generate for LLaDA 1, or set config.block_size")
    if not fast and not getattr(model, "_llada2_patched", False):
        _fail(f"model must be an LLaDAModel in block mode or a model patched by "
              f"llada_kernels.patch.patch_llada2; got {type(model).__name__}", TypeError)


def _check(model, prompt, attention_mask, gen_length, block_length, steps, temperature,
           threshold, editing_threshold, max_post_steps, minimal_topk, mask_id, cache):
    """Argument checks; returns the block length."""
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.dtype != torch.long:
        got = (f"{prompt.dtype} tensor of shape {list(prompt.shape)}"
               if isinstance(prompt, torch.Tensor) else type(prompt).__name__)
        _fail(f"prompt must be a [B, Lp] int64 tensor; got {got}", TypeError)
    B, Lp = prompt.shape
    config = getattr(model, "config", None)
    model_block = getattr(config, "block_size", None)
    fast = hasattr(model, "hidden_states") and hasattr(model, "lm_head")
    b = model_block if block_length is None else block_length
    for name, v in (("gen_length", gen_length), ("block_length", b), ("max_post_steps", max_post_steps),
                    ("minimal_topk", minimal_topk)) + ((("steps", steps),) if steps is not None else ()):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "max_post_steps" else 1):
            _fail(f"{name} must be a positive int; got {v!r}")
    if fast and b % model_block:
        _fail(f"block_length ({b}) must be a multiple of the model's block size ({model_block}): "
              "committed blocks must be whole attention blocks for the cache to be exact")
    if cache not in CACHES:
        _fail(f"cache must be one of {CACHES}; got {cache!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        _fail(f"temperature must be a finite float >= 0; got {temperature!r}")
    for name, t in (("threshold", threshold), ("editing_threshold", editing_threshold)):
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)):
            _fail(f"{name} must be a finite float or None; got {t!r}")
    rows = getattr(config, "embedding_size", None) or getattr(config, "vocab_size", None)
    if rows is not None:
        if mask_id is not None and not 0 <= mask_id < rows:
            _fail(f"mask_id ({mask_id}) is outside the model's vocabulary [0, {rows})")
        _checks.check_index("block_generate", "prompt", prompt, rows)
    max_len = getattr(config, "max_sequence_length", None) or getattr(config, "max_position_embeddings", None)
    T = -(-(Lp + gen_length) // b) * b
    if max_len is not None and T > max_len:
        _fail(f"the prompt ({Lp}) and gen_length ({gen_length}), padded to a multiple of "
              f"block_length ({b}), need {T} positions; the model has {max_len}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, Lp):
            got = (list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor)
                   else type(attention_mask).__name__)
            _fail(f"attention_mask must have the prompt's shape {[B, Lp]}; got {got}")
        if mask_id is not None and bool(((attention_mask == 0)
                                         & (prompt.to(attention_mask.device) == mask_id)).any()):
            _fail(f"the prompt's padding uses mask_id ({mask_id}); pad with another id")
    return b


# ---- uniform corruption (DiffusionGemma) ---------------------------------------------------

def uniform_quota(step, n, steps):
    """The positions of a block's n generated ones that are committed after step `step`
    (0-based) of `steps` in uniform-corruption mode: ceil((step + 1) * n / steps), the
    cumulative quota of diffusers' BlockRefinementScheduler. A step commits what is still
    owed, so positions committed early by the threshold lower the later steps' top-k."""
    return -(-(step + 1) * n // steps)


def _generate_uniform(model, prompt, attention_mask, gen_length, b, steps, temperature,
                      threshold, editing_threshold, stop_at_eos, eos_id, cache, generator,
                      backend, return_stats):
    """block_generate(corruption="uniform"); the arguments are checked. Each step is one
    remask_step whose candidates are the uncommitted positions (passed as x = 0 there, 1
    elsewhere, with mask_id=0) and num_transfer the quota still owed per row; editing is a
    second remask_step over the committed positions (num_transfer=0, the editing threshold):
    at temperature > 0 it draws its own x0 (diffusers edits with the step's one sample). One
    pass would need remask_step to take the candidates as a [B, L] mask (not x == mask_id:
    here every id is a real token) and to edit the other positions against the real tokens.
    Host synchronisation: none per step; one per block with stop_at_eos."""
    config = model.config
    V = getattr(config, "embedding_size", None) or getattr(config, "vocab_size", None)
    if V is None:
        _fail("corruption='uniform' draws ids in [0, V): the model's config has neither "
              "embedding_size nor vocab_size")
    if editing_threshold is not None and editing_threshold <= 0:
        _fail(f"editing_threshold must be None or > 0 with corruption='uniform' (diffusers' "
              f"uniform mode edits at any value that is not None, its mask mode only above 0: "
              f"a value <= 0 would mean different things); got {editing_threshold!r}")
    strict = None if threshold is None else _next_fp32(threshold)
    edit_strict = None if editing_threshold is None else _next_fp32(editing_threshold)
    with torch.inference_mode():
        B, Lp = prompt.shape
        device = _device(model)
        x, am = _canvas(prompt, attention_mask, gen_length, b, 0, device)  # 0: redrawn per block
        T = x.shape[1]
        stats = BlockGenerateStats()
        runner = _Runner(model, b, cache)
        rows = torch.arange(B, device=device)          # the rows still running (stop_at_eos)
        done = torch.zeros(B, dtype=torch.bool, device=device)

        def noise():  # [B', b]: the batch's draw, so a row's ids do not depend on the others
            return torch.randint(0, V, (B, b), device=device, generator=generator)[rows]

        for n in range(Lp // b, T // b):
            s, e = n * b, (n + 1) * b
            xa, ama = x[rows], am[rows]
            gen = torch.arange(s, e, device=device) >= Lp                     # [b] generated
            ngen = e - max(s, Lp)
            xa[:, s:e] = torch.where(gen, noise(), xa[:, s:e])
            committed = (~gen).expand(len(rows), b).clone()                   # [B', b]
            for step in range(steps):
                block = xa[:, s:e]
                logits = runner.logits(xa, ama, s, e)                         # [B', b, V]
                owed = (uniform_quota(step, ngen, steps) - (committed & gen).sum(1)).clamp(min=0)
                new, transfer = remask_step(logits, committed.long(), owed, mask_id=0,
                                            temperature=temperature, threshold=strict,
                                            generator=generator, backend=backend)
                tokens = torch.where(transfer, new, block)
                if edit_strict is not None:
                    was = committed & gen
                    x0, sure = remask_step(logits, (~was).long(), 0, mask_id=0,
                                           temperature=temperature, threshold=edit_strict,
                                           generator=generator, backend=backend)
                    tokens = torch.where(sure & (x0 != block), x0, tokens)
                committed |= transfer
                xa[:, s:e] = torch.where(committed, tokens, noise())
            stats.model_calls += steps
            stats.calls_per_block.append(steps)
            x[rows] = xa
            if stop_at_eos:
                keep = ~(xa[:, Lp:e] == eos_id).any(1)
                done[rows] = ~keep
                rows = _keep_running(rows, keep, done, runner, stats)
                if len(rows) == 0:
                    break
        x = x[:, :Lp + gen_length]
        if stop_at_eos:
            x[:, Lp:] = _after_eos(x[:, Lp:], eos_id)
    x = x.clone()  # an ordinary tensor, not an inference tensor
    return (x, stats) if return_stats else x
