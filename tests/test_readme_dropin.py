"""README's "Drop into your trainer" blocks, run as written (issue 12): the released model's
block against the unpatched model's logits, and the dllm MDLMTrainer block against dllm's own
compute_loss formula (dllm/core/trainers/mdlm.py, transcribed: that file imports dllm's base
classes, so it is read, not run)."""

import functools
import re
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import llada_kernels
from llada_kernels import training
from llada_kernels.patch import patch_llada, patch_stats
from oracles import released_llada
from test_trainer import MASK, V, tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks():
    text = README.read_text()
    section = text[text.index("## Drop into your trainer"):]
    section = section[:section.index("\n## ", 10)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def namespace(**extra):
    """The README's imports (forward_process with the tiny model's mask id: the real one's
    default is LLaDA's 126336)."""
    return dict(torch=torch, patch_llada=patch_llada, pretrain_loss=training.pretrain_loss,
                forward_process=functools.partial(training.forward_process, mask_id=MASK),
                hidden_and_head=training.hidden_and_head,
                fused_linear_masked_diffusion_loss=llada_kernels.fused_linear_masked_diffusion_loss,
                **extra)


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V - 2, (3, 12), generator=g)
    am = torch.ones(3, 12, dtype=torch.long)
    am[1, -4:] = 0
    return ids, am


def test_released_model_block():
    code = blocks()[0]
    ours = tiny_model(seed=2)
    loaded = []

    class AutoModelForCausalLM:  # from_pretrained(path, trust_remote_code=True, ...) stand-in
        @staticmethod
        def from_pretrained(path, trust_remote_code, torch_dtype):
            assert trust_remote_code and path == "ckpt"
            loaded.append(released_llada(ours))
            return loaded[-1]

    ids, am = batch()
    ns = namespace(AutoModelForCausalLM=AutoModelForCausalLM, path="ckpt", input_ids=ids,
                   prompt_lengths=torch.tensor([2, 3, 4]), attention_mask=am)
    torch.manual_seed(0)
    exec(code, ns)
    model = loaded[0]
    assert patch_stats(model) == {"op": 2 * 2, "original": 0}  # two forwards, two blocks each
    noisy, masked, p_mask = ns["noisy"], ns["masked"], ns["p_mask"]
    assert masked.any() and not masked[:, :2].any()
    plain = released_llada(ours)
    logits = plain(noisy, attention_mask=am).logits
    want = (F.cross_entropy(logits[masked], ids[masked], reduction="none") / p_mask[masked]).sum() / ids.numel()
    torch.testing.assert_close(ns["loss"], want, rtol=1e-5, atol=1e-6)


class LinearAlphaScheduler:
    """dllm's linear schedule: alpha(t) = 1 - t, weight(t) = -alpha'(t) / (1 - alpha(t)) = 1 / t."""

    def __call__(self, t):
        return 1 - t

    def weight(self, t):
        return 1 / t


class MDLMTrainer:  # the attributes dllm's MDLMTrainer.__init__ sets, and nothing else
    def __init__(self):
        self.time_epsilon = 1e-3
        self.scheduler = LinearAlphaScheduler()
        self.processing_class = types.SimpleNamespace(mask_token_id=MASK)


def dllm_compute_loss(trainer, model, inputs):
    """dllm's MDLMTrainer.compute_loss, loss_weight_type="scheduler", loss_norm_type="token"."""
    input_ids, labels, attention_mask = inputs["input_ids"], inputs["labels"], inputs.get("attention_mask")
    b, l = input_ids.shape
    maskable_mask = labels != -100
    t = trainer.time_epsilon + (1 - trainer.time_epsilon) * torch.rand(b, device=input_ids.device)
    p_mask = 1.0 - trainer.scheduler(t).unsqueeze(1).expand(b, l)
    masked_mask = (torch.rand((b, l), device=input_ids.device) < p_mask) & maskable_mask
    noised = torch.where(masked_mask, trainer.processing_class.mask_token_id, input_ids)
    logits = model(input_ids=noised, attention_mask=attention_mask).logits
    loss_weights = trainer.scheduler.weight(t).unsqueeze(1).repeat(1, l)
    token_nll = F.cross_entropy(logits.transpose(1, 2), input_ids, reduction="none")
    token_nll = token_nll * loss_weights * masked_mask.to(token_nll.dtype)
    return (token_nll / maskable_mask.sum().clamp_min(1)).sum()


@pytest.mark.parametrize("patched", [False, True])
def test_dllm_block_is_dllms_loss(patched):
    ns = namespace(MDLMTrainer=MDLMTrainer)
    exec(blocks()[1], ns)
    trainer = ns["FusedMDLMTrainer"]()
    ours = tiny_model(seed=3)
    model = released_llada(ours).train()
    if patched:
        patch_llada(model)
    ids, am = batch()
    labels = ids.masked_fill(torch.arange(12) < 3, -100).masked_fill(am == 0, -100)  # prompt, padding
    inputs = {"input_ids": ids, "labels": labels, "attention_mask": am}
    torch.manual_seed(5)
    got = trainer.compute_loss(model, inputs)
    got.backward()
    g = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    plain = released_llada(ours).train() if patched else model
    torch.manual_seed(5)
    want = dllm_compute_loss(trainer, plain, inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if not patched:
        want.backward()
        for a, b in zip(g, [p.grad for p in model.parameters()]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
