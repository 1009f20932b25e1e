"""The trainer's losses under DDP and FSDP2 (llada_kernels.distributed.wrap_ddp / wrap_fsdp2),
activation checkpointing on, over a gloo pair (tests/dist_pool.py): each rank's loss and every
parameter's gradient equal the single-process run that averages the two ranks' losses (same
weights, same micro-batches, same noise). A tiny LLaDAModel, one step: seconds.
"""

import pytest
import torch

from dist_pool import _session_pool, pool  # noqa: F401  (the fixtures)
from llada_kernels import training
from llada_kernels.distributed import TrainingLoss, data_parallel, wrap_ddp, wrap_fsdp2
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
        ids, kw, _ = bd_batch("dfactory", 0)
        with pytest.raises(RuntimeError, match="block_diffusion_loss: dp_group was given but "
                                               "torch.distributed is not initialised"):
            training.block_diffusion_loss(make_block_model(), ids, dp_group=object())


def check_bad_dp_group(ctx):
    ids, _, _ = bd_batch("dfactory", 0)
    with pytest.raises(TypeError, match="dp_group must be a torch.distributed.ProcessGroup"):
        training.block_diffusion_loss(make_block_model(), ids, dp_group="world")


def test_bad_dp_group(pool):
    pool.run(check_bad_dp_group)


def test_training_loss_is_the_trainer_loss():
    """TrainingLoss adds nothing: the same value as training.pretrain_loss."""
    model = make_model()
    args, kw = loss_args("pretrain", 0)
    want = training.pretrain_loss(model, *args, **kw)
    args, kw = loss_args("pretrain", 0)
    assert TrainingLoss(model, "pretrain")(*args, **kw).item() == want.item()


# ---- the block-diffusion loss (the 2L objective) ---------------------------------------------

BD_V, BD_MASK, BD_L = 48, 47, 16
BD_CASES = {  # name: (block_diffusion_loss's keyword arguments, documents packed?)
    "dfactory": (dict(), False),
    "complementary_packed": (dict(complementary=True), True),
    "bd3lm_maskable": (dict(noise_range=(1e-3, 1.0), loss_weight="elbo", normalize="maskable"),
                       False),
}


def make_block_model():
    torch.manual_seed(0)
    return LLaDAModel(LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2,
                                  mlp_hidden_size=48, vocab_size=BD_V, embedding_size=BD_V,
                                  max_sequence_length=64, rope_theta=10000.0, mask_token_id=BD_MASK,
                                  eos_token_id=46, pad_token_id=46, block_size=4)).train()


def bd_batch(case, rank):
    """Rank `rank`'s micro-batch and keyword arguments: rank 1 holds 3 rows, rank 0 two (the
    divisor is counted over both, so micro-batches need not match). Its own noise seed."""
    kwargs, packed = BD_CASES[case]
    g = torch.Generator().manual_seed(200 + rank)
    B = 2 + rank
    ids = torch.randint(0, BD_MASK, (B, BD_L), generator=g)
    kw = dict(kwargs)
    if packed:  # documents of lengths 5, 7, 4 (row 0: one document)
        docs = torch.tensor([0] * 5 + [1] * 7 + [2] * 4).expand(B, BD_L).clone()
        docs[0] = 0
        kw["document_ids"] = docs
    if kwargs.get("normalize") == "maskable":  # a prompt of 3 + rank tokens is never masked
        kw["maskable"] = (torch.arange(BD_L) >= 3 + torch.arange(B)[:, None])
    return ids, kw, 300 + rank


NOISE_ARGS = ("noise_range", "maskable", "document_ids", "complementary")


def bd_rank_noise(case, rank):
    """What rank `rank`'s block_diffusion_loss feeds block_diffusion_loss_from_noise: its noise
    (the same generator) and its tensors, doubled with complementary masking."""
    ids, kw, seed = bd_batch(case, rank)
    noisy, masked, t = training.block_diffusion_noise(
        ids, mask_id=BD_MASK, generator=torch.Generator().manual_seed(seed),
        **{k: v for k, v in kw.items() if k in NOISE_ARGS})
    k = 2 if kw.get("complementary") else 1
    rep = (lambda x: None if x is None else torch.cat([x] * k))  # noqa: E731
    return dict(noisy=noisy, input_ids=rep(ids), masked=masked, t=t,
                maskable=rep(kw.get("maskable")), document_ids=rep(kw.get("document_ids")))


def bd_single_process(case, world=2):
    """The single-process loss of the concatenated micro-batches (each rank's noise as that
    rank draws it) and its gradients: all ranks' sum of w * CE over the global Z."""
    model = make_block_model()
    parts = [bd_rank_noise(case, r) for r in range(world)]
    cat = {n: None if parts[0][n] is None else torch.cat([p[n] for p in parts]) for n in parts[0]}
    kw = {k: v for k, v in bd_batch(case, 0)[1].items() if k in ("loss_weight", "normalize")}
    loss = training.block_diffusion_loss_from_noise(
        model, cat["noisy"], cat["input_ids"], cat["masked"], cat["t"], maskable=cat["maskable"],
        document_ids=cat["document_ids"], **kw)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}, parts


def check_block_diffusion(ctx, wrapper, case, planted=None):
    """One rank's DDP or FSDP2 step of the block-diffusion loss (checkpointing on); returns its
    loss and whether every gradient equals the single-process one. planted: a bug to plant,
    "local_z" (every rank divides by its own count: the ranks' mean is a mean of means) or
    "rank1_no_w" (rank 1 forgets the factor W)."""
    if ctx.pair is None:
        return None
    model = make_block_model()
    calls = count_block_calls(model)
    if wrapper == "ddp":
        step = wrap_ddp(model, "block_diffusion", process_group=ctx.pair)
    else:
        step = wrap_fsdp2(model, "block_diffusion", group=ctx.pair)
    ids, kw, seed = bd_batch(case, ctx.rank)
    gen = torch.Generator().manual_seed(seed)
    real = data_parallel.global_count
    if planted == "local_z":
        data_parallel.global_count = lambda op, count, group: (count, 1)
    elif planted == "rank1_no_w" and ctx.rank == 1:
        data_parallel.global_count = lambda op, count, group: (real(op, count, group)[0], 1)
    try:
        loss = step(ids, generator=gen, **kw)
    finally:
        data_parallel.global_count = real
    loss.backward()
    want_loss, want_grads, parts = bd_single_process(case)
    assert len(calls) == 2 * len(model.model.transformer.blocks), len(calls)  # recomputed
    prefix = "module.model." if wrapper == "ddp" else "model."
    got = dict(step.named_parameters())
    assert len(got) == len(want_grads)
    same = True
    for name, want in want_grads.items():
        grad = got[prefix + name].grad
        if wrapper == "fsdp2":
            grad = grad.full_tensor()
        # fp32, the ranks' sums added in another order: a few ulps of the largest entry.
        same &= torch.allclose(grad, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    counts = [int(p["masked"].sum()) for p in parts]
    return loss.item(), want_loss, same, counts


@pytest.mark.parametrize("case", list(BD_CASES))
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_block_diffusion_gradients_equal_single_process(pool, wrapper, case):
    """Rank r returns W * S_r / Z: the ranks' mean is the single-process loss of the
    concatenated micro-batches (2 and 3 rows), and every gradient is its gradient."""
    r0, r1, r2 = pool.run(check_block_diffusion, wrapper, case)
    assert r2 is None
    (loss0, want, same0, counts), (loss1, _, same1, _) = r0, r1
    assert counts[0] != counts[1]  # a per-rank mean would weight the ranks unequally
    torch.testing.assert_close((loss0 + loss1) / 2, want, rtol=1e-6, atol=0)
    assert same0 and same1


@pytest.mark.parametrize("planted", ["local_z", "rank1_no_w"])
def test_block_diffusion_wrong_normalisation_fails(pool, planted):
    """The check on planted bugs: each rank dividing by its own count, or rank 1 dividing by
    the global count without the factor W. Both give other gradients (and another mean)."""
    (loss0, want, same0, _), (loss1, _, same1, _), _ = pool.run(
        check_block_diffusion, "ddp", "complementary_packed", planted)
    assert not (same0 and same1)
    assert abs((loss0 + loss1) / 2 - want) > 1e-4 * abs(want)
