"""The trainer's losses under DDP and FSDP2 (llada_kernels.distributed.wrap_ddp / wrap_fsdp2),
activation checkpointing on, over a gloo pair (tests/dist_pool.py): each rank's loss and every
parameter's gradient equal the single-process run that averages the two ranks' losses (same
weights, same micro-batches, same noise). A tiny LLaDAModel, one step: seconds.
"""

import pytest
import torch

from dist_pool import _session_pool, pool  # noqa: F401  (the fixtures)
from llada_kernels import training
from llada_kernels.distributed import TrainingLoss, wrap_ddp, wrap_fsdp2
from llada_kernels.model import LLaDAConfig, LLaDAModel

V, MASK = 40, 39
B, L = 2, 12


def make_model():
    torch.manual_seed(0)
    return LLaDAModel(LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2,
                                  mlp_hidden_size=48, vocab_size=V, embedding_size=V,
                                  max_sequence_length=64, rope_theta=10000.0, mask_token_id=MASK,
                                  eos_token_id=38, pad_token_id=38)).train()


def batch(rank):
    """Rank `rank`'s micro-batch: its ids, extra loss arguments and the noise's seed."""
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, MASK, (B, L), generator=g)
    return ids, torch.tensor([3, 5 + rank]), 7 + rank


def logits_loss(model, input_ids, *, generator):
    """A loss of the caller's own (any callable taking the model first): the pre-training loss
    from the model's full logits (model.forward), as a block-diffusion loss would be passed."""
    noisy, masked, p_mask = training.forward_process(input_ids, mask_id=MASK, generator=generator)
    return training.llada_pretrain_loss(model(noisy).logits, input_ids, masked, p_mask)


LOSS = {"pretrain": "pretrain", "sft": "sft", "callable": logits_loss}


def loss_args(kind, rank):
    ids, prompt_lengths, seed = batch(rank)
    args = (ids, prompt_lengths) if kind == "sft" else (ids,)
    return args, dict(generator=torch.Generator().manual_seed(seed))


def single_process(kind, world=2):
    """The losses of each rank's micro-batch and the gradients of their mean, in one process."""
    model = make_model()
    losses = [TrainingLoss(model, LOSS[kind])(*a, **k) for a, k in (loss_args(kind, r) for r in range(world))]
    (sum(losses) / world).backward()
    return [x.item() for x in losses], {n: p.grad for n, p in model.named_parameters()}


def count_block_calls(model):
    """Forward calls of the transformer blocks (recomputation included)."""
    calls = []
    for block in model.model.transformer.blocks:
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def check_step(ctx, wrapper, kind):
    if ctx.pair is None:
        return None
    model = make_model()
    calls = count_block_calls(model)
    if wrapper == "ddp":
        step = wrap_ddp(model, LOSS[kind], process_group=ctx.pair)
    else:
        step = wrap_fsdp2(model, LOSS[kind], group=ctx.pair)
    args, kw = loss_args(kind, ctx.rank)
    loss = step(*args, **kw)
    loss.backward()
    want_losses, want_grads = single_process(kind)
    # Every block ran twice: in the forward and again in the backward (checkpointing).
    assert len(calls) == 2 * len(model.model.transformer.blocks), len(calls)
    torch.testing.assert_close(loss.item(), want_losses[ctx.rank], rtol=1e-6, atol=0)
    prefix = "module.model." if wrapper == "ddp" else "model."
    got = dict(step.named_parameters())
    assert len(got) == len(want_grads)
    for name, want in want_grads.items():
        grad = got[prefix + name].grad
        if wrapper == "fsdp2":
            grad = grad.full_tensor()  # a DTensor sharded over the pair
        # fp32, the ranks' gradients summed in another order: a few ulps of the largest entry.
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(),
                                   msg=lambda m, name=name: f"{wrapper} {kind} {name}: {m}")
    return loss.item()


@pytest.mark.parametrize("wrapper, kind", [("ddp", "pretrain"), ("ddp", "sft"), ("ddp", "callable"),
                                           ("fsdp2", "pretrain"), ("fsdp2", "sft"),
                                           ("fsdp2", "callable")])
def test_gradients_equal_single_process(pool, wrapper, kind):
    results = pool.run(check_step, wrapper, kind)
    assert results[2] is None and results[0] != results[1]  # two different micro-batches


def check_wrong_gradients_fail(ctx):
    """The checker on a planted bug: a rank that skips the gradient averaging (DDP's
    no_sync) keeps its own micro-batch's gradient, which the comparison rejects."""
    if ctx.pair is None:
        return
    model = make_model()
    step = wrap_ddp(model, "pretrain", process_group=ctx.pair)
    args, kw = loss_args("pretrain", ctx.rank)
    with step.no_sync():
        (step(*args, **kw) / 2).backward()
    _, want = single_process("pretrain")
    w = model.model.transformer.wte.weight
    with pytest.raises(AssertionError):
        torch.testing.assert_close(w.grad, want["model.transformer.wte.weight"], rtol=1e-5,
                                   atol=1e-5 * want["model.transformer.wte.weight"].abs().max().item())


def test_unsynchronised_gradients_fail_the_check(pool):
    pool.run(check_wrong_gradients_fail)


def test_bad_arguments():
    model = make_model()
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainingLoss(model, "pretrian")
    with pytest.raises(TypeError, match="loss must be a str or a callable"):
        TrainingLoss(model, 3)
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            wrap_ddp(model)


def test_training_loss_is_the_trainer_loss():
    """TrainingLoss adds nothing: the same value as training.pretrain_loss."""
    model = make_model()
    args, kw = loss_args("pretrain", 0)
    want = training.pretrain_loss(model, *args, **kw)
    args, kw = loss_args("pretrain", 0)
    assert TrainingLoss(model, "pretrain")(*args, **kw).item() == want.item()
