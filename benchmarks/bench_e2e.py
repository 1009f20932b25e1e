"""End to end: whole sampling runs and training steps of a small LLaDA, ours against the same
model with every op on the eager reference path.

  eager   sampling: LLaDA's generate() (llada_kernels.reference.llada_official, the full-sequence
          lm_head every step, a Python loop over the batch) with attention on its reference
          backend; training: GUIDELINES.md's loss on full [B, L, V] logits.
  ours    sampling: llada_kernels.generate (the last layer's queries, MLP and the lm_head on
          the current block only, remask_step, inference_mode);
          training: llada_kernels.training.pretrain_loss (the last layer's attn_out and MLP on
          the masked rows only, their hidden states into the fused loss).
  ours_prefix_cache   sampling with Fast-dLLM's prefix KV cache (approximate).

Targets (CPU, issue 5): sampling >= 1.5x, training step >= 1.3x, lower peak memory.

Block diffusion (issue 11), the same models with config.block_size = 8:
  e2e_block_sampling   tokens/s = B * gen / median. Providers: eager = block_generate
          recomputing the whole block-causal window every step (what diffusers' LLaDA2Pipeline
          does, on our ops); ours_exact_cache = block_generate with the exact KV cache;
          llada1_generate = LLaDA 1's sampler (generate, no cache) on the same weights in
          bidirectional mode, with the same number of model calls. Two prompt lengths: 32
          (the window is short, so recomputing it costs little) and 480 (a chat-sized prompt:
          every step of the recompute runs all 512 positions, the cache only the block).
  e2e_block_train_step   the 2L step at L = 1024 on the small model: eager = dFactory's
          (reference/block_diffusion.py: a dense float [2L, 2L] mask, SDPA in every layer,
          full [B, 2L, V] logits); ours = training.block_diffusion_loss_from_noise (the 2L
          mask as O(L) integers, the fused loss on x_t's masked rows). The shape names the
          attention backend ours ran on. Target: >= 2x faster, <= 40% of eager's peak memory.
"""

import pytest
import torch

from llada_kernels import masks, training
from llada_kernels.block_generate import block_generate
from llada_kernels.model import attention_backend
from llada_kernels.reference.block_diffusion import dfactory_loss
from llada_kernels.constants import EOS_ID as EOS, MASK_ID as MASK  # where the vocabulary holds them
from llada_kernels.generate import generate
from llada_kernels.model import LLaDAConfig, LLaDAModel
from llada_kernels.reference.llada_official import official_generate, official_pretrain_loss

from _common import devices, measure

MODELS = {
    # name: (d_model, n_layers, n_heads, n_kv_heads, vocab)
    "tiny": (128, 3, 4, 2, 16),              # the demo's model: per-step overheads dominate
    "small-V126k": (256, 4, 8, 4, 126464),   # LLaDA's real vocabulary: the lm_head dominates
}
B, PROMPT, GEN, BLOCK, STEPS = 2, 32, 32, 8, 16
TRAIN_B, TRAIN_L = 4, 128


def build(name, device, dtype=torch.float32, block_size=None):
    D, n_layers, H, Hkv, V = MODELS[name]
    mask, eos = (MASK, EOS) if V > MASK else (V - 1, V - 2)
    torch.manual_seed(0)
    cfg = LLaDAConfig(d_model=D, n_heads=H, n_kv_heads=Hkv, n_layers=n_layers,
                      mlp_hidden_size=3 * D, vocab_size=V, embedding_size=V,
                      max_sequence_length=4096, mask_token_id=mask, eos_token_id=eos, pad_token_id=eos,
                      block_size=block_size)
    return LLaDAModel(cfg).to(device=device, dtype=dtype), mask


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("provider", ["eager", "ours", "ours_prefix_cache"])
def test_sampling(benchmark, provider, device, model_name):
    model, mask = build(model_name, device)
    model.eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, mask, (B, PROMPT), generator=g).to(device)
    am = torch.ones_like(prompt)
    am[1, :5] = 0
    kw = dict(steps=STEPS, gen_length=GEN, block_length=BLOCK, mask_id=mask)
    if provider == "eager":
        model.backend = "reference"

        def fn():
            return official_generate(model, prompt, am, **kw)
    else:
        def fn():
            return generate(model, prompt, am, prefix_cache=provider == "ours_prefix_cache", **kw)
    measure(benchmark, fn, op=f"e2e_sampling[{model_name}]", provider=provider,
            shape=f"B={B} prompt={PROMPT} gen={GEN} block={BLOCK} steps={STEPS}",
            dtype=torch.float32, device=device, rounds=10)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("provider", ["eager", "ours"])
def test_training_step(benchmark, provider, device, model_name):
    model, mask = build(model_name, device)
    model.train()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, mask, (TRAIN_B, TRAIN_L), generator=g).to(device)

    if provider == "eager":
        model.backend = "reference"

        def fn():
            t = torch.rand(TRAIN_B, device=device)
            p_mask = ((1 - 1e-3) * t + 1e-3)[:, None].expand(TRAIN_B, TRAIN_L)
            masked = torch.rand(TRAIN_B, TRAIN_L, device=device) < p_mask
            noisy = torch.where(masked, mask, ids)
            official_pretrain_loss(model(noisy).logits, ids, masked, p_mask).backward()
            model.zero_grad(set_to_none=True)
    else:
        def fn():
            training.pretrain_loss(model, ids, mask_id=mask).backward()
            model.zero_grad(set_to_none=True)
    measure(benchmark, fn, op=f"e2e_train_step[{model_name}]", provider=provider,
            shape=f"B={TRAIN_B} L={TRAIN_L}", dtype=torch.float32, device=device, rounds=10)


@pytest.mark.parametrize("prompt_len", [PROMPT, 480])
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("provider", ["eager", "ours_exact_cache", "llada1_generate"])
def test_block_sampling(benchmark, provider, device, model_name, prompt_len):
    model, mask = build(model_name, device, block_size=None if provider == "llada1_generate" else BLOCK)
    model.eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, mask, (B, prompt_len), generator=g).to(device)
    am = torch.ones_like(prompt)
    am[1, :5] = 0
    if provider == "llada1_generate":
        def fn():  # one token per step, as the block sampler's top-k with steps = BLOCK
            return generate(model, prompt, am, steps=GEN, gen_length=GEN, block_length=BLOCK,
                            mask_id=mask)
    else:
        cache = "exact" if provider == "ours_exact_cache" else None

        def fn():
            return block_generate(model, prompt, am, gen_length=GEN, steps=BLOCK, threshold=None,
                                  mask_id=mask, cache=cache)
    measure(benchmark, fn, op=f"e2e_block_sampling[{model_name}]", provider=provider,
            shape=f"B={B} prompt={prompt_len} gen={GEN} block={BLOCK} steps/block={BLOCK}",
            dtype=torch.float32, device=device, rounds=10)


BD_B, BD_L, BD_BLOCK = 1, 1024, 32


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("provider", ["eager", "ours"])
def test_block_train_step(benchmark, provider, device):
    model, mask = build("small-V126k", device, block_size=BD_BLOCK)
    model.train()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, mask, (BD_B, BD_L), generator=g).to(device)
    noisy, masked, t = training.block_diffusion_noise(ids.cpu(), mask_id=mask, generator=g)
    noisy, masked, t = noisy.to(device), masked.to(device), t.to(device)
    if provider == "eager":
        def fn():
            dfactory_loss(model, noisy, ids, masked, BD_BLOCK).backward()
            model.zero_grad(set_to_none=True)
        attn = "sdpa-dense"
    else:
        def fn():
            training.block_diffusion_loss_from_noise(model, noisy, ids, masked, t).backward()
            model.zero_grad(set_to_none=True)
        attn = attention_backend(None, masks.block_diffusion(BD_BLOCK, BD_L, device=device),
                                 device) or "default"
    measure(benchmark, fn, op="e2e_block_train_step[small-V126k]", provider=provider,
            shape=f"B={BD_B} L={BD_L} (2L={2 * BD_L}) block={BD_BLOCK}",
            dtype=torch.float32, device=device, rounds=5)
    benchmark.extra_info["provider"] = f"{provider} (attention: {attn})" if provider == "ours" else provider
