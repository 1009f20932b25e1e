"""LLaDA's sampler on remask_step: the reference `generate()` with its signature and, at
temperature 0, its tokens, plus Fast-dLLM threshold decoding, Dream's margin and entropy
confidences, per-row stop at EOS and a prefix KV cache.

Where the time goes in the reference, and what this sampler does instead:
  * the lm_head runs over the whole sequence every step: here only over the current block
    (hidden states of the other positions never meet the [V, D] head), and the last layer
    computes its queries, attention output and MLP only for the block's rows (its keys and
    values still cover the whole sequence; exact, see LLaDAModel.hidden_states);
  * CFG materialises three [B, L, V] tensors: here the conditional and unconditional rows come
    from one batched model call and remask_step combines them on the fly;
  * a Python loop over the batch runs torch.topk per row: here remask_step takes a [B] tensor
    of per-row counts, so a step has no loop and no host synchronisation.

Shapes: B batch, Lp prompt length, L = Lp + gen_length, W the logits window of a block
(its width is block_length unless the prompt itself holds mask tokens), V vocabulary.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

import llada_kernels

from . import _checks
from .constants import EOS_ID, EOT_ID, MASK_ID
from .ops.remask import REMASKING


@dataclass
class GenerateStats:
    """What a generate() call did. model_calls counts forward passes of the model (a CFG
    step is one call on a doubled batch)."""

    model_calls: int = 0
    calls_per_block: list[int] = field(default_factory=list)
    finished_rows_per_block: list[int] = field(default_factory=list)


def num_transfer_schedule(block_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """[B] masked counts of a block -> [B, steps] tokens to commit per step: every step gets
    m // steps and the first m % steps steps one more (LLaDA's get_num_transfer_tokens,
    without its loop over the batch)."""
    base, rem = block_masked // steps, block_masked % steps
    return base[:, None] + (torch.arange(steps, device=block_masked.device) < rem[:, None])


def _inference(fn):
    """Run fn under torch.inference_mode, whose ops skip the autograd bookkeeping that
    no_grad still does (version counters, view tracking): a few % of a small model's step.
    The token tensor it returns is cloned out of inference mode, so that it is an ordinary
    tensor (an inference tensor cannot be saved for a later backward, e.g. as a training
    batch)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode():
            out = fn(*args, **kwargs)
        return (out[0].clone(), *out[1:]) if isinstance(out, tuple) else out.clone()
    return wrapper


@_inference
def generate(model, prompt, attention_mask=None, steps=128, gen_length=128, block_length=128,
             temperature=0., cfg_scale=0., remasking="low_confidence", mask_id=None,
             logits_eos_inf=False, confidence_eos_eot_inf=False, *, eos_id=None,
             eot_id=EOT_ID, threshold=None, stop_at_eos=False, prefix_cache=False,
             progress=False, generator=None, backend=None, return_stats=False):
    """Sample a completion of every prompt by semi-autoregressive masked diffusion.

    The first eleven arguments are those of LLaDA's generate() (ML-GSAI/LLaDA generate.py), in
    its order and with its defaults (but for mask_id: the model's own); at temperature 0 the
    tokens are identical to it (see "Differences" for the tie rules).

    Args:
        model: an LLaDAModel (fast path: hidden states, lm_head on the current block only), or
            any module whose `model(x, attention_mask=...)` returns `.logits` [B, L, V], such
            as the released model or another transformers model (logits over the whole
            sequence). Its device is `model.device`, else its first parameter's, else the
            prompt's.
        prompt: [B, Lp] int64, left-padded when prompts differ in length; ids inside the
            model's vocabulary (embedding_size rows) where its config gives one.
        attention_mask: [B, Lp] (1 = token, 0 = padding) or None. Padding keys are hidden
            from every query; generated positions are always attended.
        steps: sampling steps in all; a multiple of gen_length / block_length.
        gen_length: tokens to generate; a multiple of block_length.
        block_length: the semi-autoregressive block. Blocks are decoded left to right, each in
            steps / num_blocks steps.
        temperature: 0 = argmax; T > 0 = Gumbel-max sampling with float64-quality noise.
        cfg_scale: classifier-free guidance s: logits = un + (s + 1) (cond - un), where the
            unconditional input has every prompt position (padding included) masked.
        remasking: "low_confidence" (softmax probability of the chosen token), "random",
            "margin" (top-1 minus top-2 probability) or "entropy" (negative entropy).
        mask_id: the mask token id; None = the model's config.mask_token_id, or LLaDA's
            126336 for a model without one.
        logits_eos_inf: never choose eos_id (LLaDA's Appendix B.4).
        confidence_eos_eot_inf: give EOS and EoT zero confidence at temperature 0, and EoT only
            at temperature > 0, exactly as the reference does.
        eos_id, eot_id: the EOS and EoT ids (the reference hard-codes LLaDA-8B's). eos_id
            None = the model's config.eos_token_id, or LLaDA's; eot_id defaults to LLaDA's.
        threshold: Fast-dLLM parallel decoding. Each step commits, per row, its most confident
            candidate plus every candidate whose fp32 confidence >= threshold, and a block ends
            when it has no mask left; `steps` then only has to be valid. The number of model
            calls depends on the model's confidence: see return_stats. (SGLang's strict rule,
            confidence > tau, is threshold = torch.nextafter(tau, inf) in fp32.)
        stop_at_eos: after each block, a row whose generation so far holds eos_id is finished:
            its remaining positions become eos_id (what LLaDA's SFT data trains as padding) and
            it leaves the batch, so later blocks cost nothing for it. Rows still running get
            the same tokens as without stop_at_eos.
        prefix_cache: Fast-dLLM's prefix KV cache. At each block's first step the whole
            sequence runs and every layer's keys and values left of the block are kept; the
            block's other steps run only the block and what follows it, against the cached
            prefix. APPROXIMATE: with bidirectional attention the cached prefix keys should
            change as the block fills in, and here they do not. Tokens can differ from the
            exact sampler; the demo reports the accuracy difference. Supported by an
            LLaDAModel, and by a transformers model whose forward takes `past_key_values`
            and `use_cache=True` and returns `past_key_values` (a Cache with `crop`, as
            DynamicCache, or per-layer (k, v) tuples): Qwen2-style models such as Dream's.
            Not by the released modeling_llada.py, whose forward refuses any cache ("The
            kvcache is not supported for MDM"): load the checkpoint as an LLaDAModel for it.
            With a transformers model, the positions of the cached call are those the model
            derives from the cache's length (as with no cache: 0..L-1 whatever the padding).
        progress: show a tqdm progress bar over the steps, if tqdm is installed.
        generator: torch.Generator for temperature > 0 and "random" (on the model's device).
        backend: remask_step's backend (None = its default; "reference" = eager).
        return_stats: also return a GenerateStats.

    Returns:
        x [B, Lp + gen_length] int64 (prompt then generation), and a GenerateStats with
        return_stats.

    Differences from the reference, all deliberate:
        * confidences are fp32 whatever the logits' dtype, and equal confidences commit the
          lower position first (torch.topk leaves ties unspecified);
        * cfg_scale > 0 with attention_mask=None works (the reference raises NameError);
        * host synchronisation: one per block (to find masks left of the block, which stay
          candidates), plus one per step in threshold mode (to know whether the block is
          done) and one per block with stop_at_eos.
    """
    config = getattr(model, "config", None)
    mask_id = _from_config(mask_id, config, "mask_token_id", MASK_ID)
    eos_id = _from_config(eos_id, config, "eos_token_id", EOS_ID)
    B, Lp = _check(model, prompt, attention_mask, steps, gen_length, block_length, temperature,
                   cfg_scale, remasking, mask_id, threshold, prefix_cache)
    device = _model_device(model, prompt)
    steps_per_block = steps // (gen_length // block_length)
    suppress = (eos_id,) if logits_eos_inf else ()
    zero_conf = (((eos_id, eot_id) if temperature == 0 else (eot_id,))
                 if confidence_eos_eot_inf else ())
    fast = hasattr(model, "hidden_states") and hasattr(model, "lm_head")

    x = torch.full((B, Lp + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :Lp] = prompt
    am = None
    if attention_mask is not None:
        # An LLaDAModel gets it as bool once here, not converted again at every call.
        dtype = torch.bool if fast else attention_mask.dtype
        am = torch.cat([attention_mask.to(device=device, dtype=dtype),
                        torch.ones(B, gen_length, dtype=dtype, device=device)], -1)
    prompt_index = x != mask_id                                              # [B, L]

    stats = GenerateStats()
    rows = torch.arange(B, device=device)  # the rows still being generated (stop_at_eos)
    bar = _progress_bar(progress, steps if threshold is None else None)  # threshold: unknown
    for nb in range(gen_length // block_length):
        s = Lp + nb * block_length
        e = s + block_length
        xa, ama, pia = (x, am, prompt_index) if len(rows) == B else (
            x[rows], None if am is None else am[rows], prompt_index[rows])
        lo = _window_start(xa, s, mask_id)
        schedule = num_transfer_schedule((xa[:, s:e] == mask_id).sum(1), steps_per_block)
        cache = None
        calls = 0
        while True:
            if threshold is None and calls == steps_per_block:
                break
            if threshold is not None and (calls == e - lo or not bool((xa[:, lo:e] == mask_id).any())):
                break
            k = schedule[:, calls] if threshold is None else 1
            if fast:
                cond, un, cache = _block_logits(model, xa, ama, pia, lo, e, cfg_scale, mask_id,
                                                prefix_cache, cache)
            elif prefix_cache:
                cond, un, cache = _cached_logits(model, xa, ama, pia, lo, e, cfg_scale, mask_id,
                                                 cache)
            else:
                cond, un = _full_logits(model, xa, ama, pia, lo, e, cfg_scale, mask_id)
            xw, _ = llada_kernels.remask_step(
                cond, xa[:, lo:e].contiguous(), k, mask_id=mask_id, temperature=temperature,
                remasking=remasking, threshold=threshold, uncond_logits=un, cfg_scale=cfg_scale,
                suppress_ids=suppress, zero_confidence_ids=zero_conf, generator=generator,
                backend=backend)
            xa[:, lo:e] = xw
            calls += 1
            if bar is not None:
                bar.update(1)
        stats.model_calls += calls
        stats.calls_per_block.append(calls)
        if xa is not x:
            x[rows] = xa
        if stop_at_eos:
            done = (x[rows, Lp:e] == eos_id).any(1)                          # [B']
            x[rows[done], e:] = eos_id
            rows = rows[~done]
            stats.finished_rows_per_block.append(B - len(rows))
            if len(rows) == 0:
                break
    if bar is not None:
        bar.close()
    return (x, stats) if return_stats else x


def _window_start(x, s, mask_id):
    """Where the logits window of the block starting at s begins: s, or the first position
    left of it that is still masked. The reference keeps every masked position before the
    block's end a candidate: masks in the prompt (infilling), and positions of earlier blocks
    where the chosen token was mask_id itself, so that they stayed masked. One host sync."""
    left = (x[:, :s] == mask_id).any(0).nonzero()                            # [n, 1]
    return int(left[0]) if len(left) else s


def _cfg_batch(x, am, prompt_index, mask_id):
    """[x; x with every prompt position masked] and the doubled attention mask."""
    un_x = x.masked_fill(prompt_index, mask_id)
    return torch.cat([x, un_x]), None if am is None else torch.cat([am, am])


def _block_logits(model, x, am, prompt_index, lo, hi, cfg_scale, mask_id, prefix_cache, cache):
    """LLaDAModel path: logits [B, hi - lo, V] of the window only (and the unconditional
    ones with CFG). With prefix_cache, `cache` is (start, per-layer kv) of the block."""
    B = x.shape[0]
    xin, amin = _cfg_batch(x, am, prompt_index, mask_id) if cfg_scale > 0 else (x, am)
    # The ids were checked once, in _check: no value check (a host sync) at every step.
    if not prefix_cache:
        h = model.hidden_states(xin, amin, output_positions=slice(lo, hi),
                                check_ids=False)                                  # [B(x2), W, D]
    elif cache is None:
        h, kv = model.hidden_states(xin, amin, return_kv=True, output_positions=slice(lo, hi),
                                    check_ids=False)
        cache = (lo, [(k[:, :, :lo], v[:, :, :lo]) for k, v in kv])
    else:
        start, kv = cache
        h = model.hidden_states(xin[:, start:], amin, past_kv=kv,
                                output_positions=slice(lo - start, hi - start), check_ids=False)
    logits = model.lm_head(h)                                                # [B(x2), W, V]
    if cfg_scale > 0:
        return logits[:B], logits[B:], cache
    return logits, None, cache


def _full_logits(model, x, am, prompt_index, lo, hi, cfg_scale, mask_id):
    """Any model with .logits: the whole sequence's logits, sliced to the window."""
    B = x.shape[0]
    xin, amin = _cfg_batch(x, am, prompt_index, mask_id) if cfg_scale > 0 else (x, am)
    logits = model(xin, attention_mask=amin).logits[:, lo:hi]
    if cfg_scale > 0:
        return logits[:B], logits[B:]
    return logits, None


def _cached_logits(model, x, am, prompt_index, lo, hi, cfg_scale, mask_id, cache):
    """A transformers model with past_key_values: the window's logits (and the unconditional
    ones with CFG); at the block's first step (cache None) the whole sequence runs and its
    cache, cut to the lo positions left of the window, is returned; later steps run x[:, lo:]
    against it. The cut cache is never extended: a Cache object is cut back after each call."""
    B = x.shape[0]
    xin, amin = _cfg_batch(x, am, prompt_index, mask_id) if cfg_scale > 0 else (x, am)
    if cache is None:
        out = model(xin, attention_mask=amin, use_cache=True)
        past = getattr(out, "past_key_values", None)
        if past is None:
            _fail(f"prefix_cache: {type(model).__name__} returned no past_key_values with "
                  "use_cache=True; its interface has no KV cache to reuse")
        cache = _cut_cache(past, lo)
        logits = out.logits[:, lo:hi]
    else:
        logits = model(xin[:, lo:], attention_mask=amin, past_key_values=cache,
                       use_cache=True).logits[:, :hi - lo]
        cache = _cut_cache(cache, lo)
    if cfg_scale > 0:
        return logits[:B], logits[B:], cache
    return logits, None, cache


def crop_cache(cache, n: int) -> None:
    """Cut a transformers Cache (DynamicCache) to its first n positions, in place. Both
    transformers lines take crop(-r) as "remove the last r positions" (4.x also reads a
    positive value as the length to keep; 5.x refuses positive values), so this passes -r."""
    drop = cache.get_seq_length() - n
    if drop > 0:
        cache.crop(-drop)


def _cut_cache(past, n):
    """The first n positions of a transformers cache: a Cache with crop() is cut in place
    (crop_cache); per-layer (k, v) tuples [B, H, L, Dh] are sliced."""
    if hasattr(past, "crop"):
        crop_cache(past, n)
        return past
    if isinstance(past, (tuple, list)) and all(isinstance(kv, (tuple, list)) for kv in past):
        return tuple(tuple(t[:, :, :n] for t in kv) for kv in past)
    _fail(f"prefix_cache: past_key_values of type {type(past).__name__} can be neither cropped "
          "nor sliced")


def _model_device(model, prompt):
    """model.device, else the device of its first parameter, else the prompt's."""
    device = getattr(model, "device", None)
    if isinstance(device, (torch.device, str)):
        return torch.device(device)
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else prompt.device


def _supports_cache(model) -> str | None:
    """Why the model's interface cannot serve prefix_cache, or None when it can."""
    if hasattr(model, "hidden_states"):
        return None
    inner = getattr(model, "model", model)
    if getattr(inner, "transformer", None) is not None:
        return ("the released modeling_llada.py refuses past_key_values (\"The kvcache is not "
                "supported for MDM\"); load the checkpoint with llada_kernels.model.LLaDAModel"
                ".from_pretrained for the prefix cache")
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        params = {}
    if not {"past_key_values", "use_cache"} <= set(params):
        return (f"{type(model).__name__}.forward takes no past_key_values and use_cache; "
                "prefix_cache needs an LLaDAModel or a transformers model with a KV cache")
    return None


def _progress_bar(progress, total):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="generate", unit="step", leave=False)


def _fail(msg, exc=ValueError):
    raise exc(f"generate: {msg}")


def _from_config(value, config, name, default):
    """value, else the config's field `name`, else LLaDA's default."""
    if value is None:
        value = getattr(config, name, None)
    return default if value is None else value


def _vocab_rows(config):
    """The number of token ids the model embeds, where its config says (None otherwise)."""
    return getattr(config, "embedding_size", None) or getattr(config, "vocab_size", None)


def _check(model, prompt, attention_mask, steps, gen_length, block_length, temperature,
           cfg_scale, remasking, mask_id, threshold, prefix_cache):
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.dtype != torch.long:
        got = (f"{prompt.dtype} tensor of shape {list(prompt.shape)}" if isinstance(prompt, torch.Tensor)
               else type(prompt).__name__)
        _fail(f"prompt must be a [B, Lp] int64 tensor; got {got}", TypeError)
    B, Lp = prompt.shape
    for name, v in (("steps", steps), ("gen_length", gen_length), ("block_length", block_length)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            _fail(f"{name} must be a positive int; got {v!r}")
    if gen_length % block_length:
        _fail(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        _fail(f"steps ({steps}) must be a multiple of the number of blocks "
              f"(gen_length / block_length = {num_blocks})")
    if remasking not in REMASKING:
        _fail(f"remasking must be one of {REMASKING}; got {remasking!r}")
    if not temperature >= 0:
        _fail(f"temperature must be >= 0; got {temperature}")
    if not cfg_scale >= 0:
        _fail(f"cfg_scale must be >= 0; got {cfg_scale}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and abs(threshold) < float("inf")):
        _fail(f"threshold must be a finite float or None; got {threshold!r}")
    config = getattr(model, "config", None)
    if isinstance(mask_id, bool) or not isinstance(mask_id, int):
        _fail(f"mask_id must be an int; got {mask_id!r}", TypeError)
    rows = _vocab_rows(config)
    if rows is not None:
        if not 0 <= mask_id < rows:
            _fail(f"mask_id ({mask_id}) is outside the model's vocabulary [0, {rows})")
        _checks.check_index("generate", "prompt", prompt, rows)
    max_len = getattr(config, "max_sequence_length", None)
    if max_len is not None and Lp + gen_length > max_len:
        _fail(f"prompt length {Lp} + gen_length {gen_length} = {Lp + gen_length} exceeds the "
              f"model's max_sequence_length ({max_len})")
    if getattr(config, "pad_token_id", None) == mask_id:
        _fail(f"the model's pad_token_id equals mask_id ({mask_id}); padding would be decoded "
              "as masks. Pad with another id (LLaDA pads with EOS)")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, Lp):
            got = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            _fail(f"attention_mask must have the prompt's shape {[B, Lp]}; got {got}")
        if bool(((attention_mask == 0) & (prompt.to(attention_mask.device) == mask_id)).any()):
            _fail(f"the prompt's padding uses mask_id ({mask_id}); the sampler would decode it. "
                  "Pad with another id (LLaDA pads with EOS)")
    why = _supports_cache(model) if prefix_cache else None
    if why is not None:
        _fail(f"prefix_cache is not supported for this model: {why}")
    return B, Lp
