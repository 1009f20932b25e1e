"""Vocabulary-parallel remask_step.

First the pieces in one process, the shards simulated: each shard's statistics from the
single-device kernel in stats mode (llada::remask_step_stats), merged as the ranks merge them,
against the single-device step of the same backend: the choice x0 exactly (at T > 0 too: the
noise is keyed by the global id), the confidences to fp32 rounding, the step itself exactly on
inputs whose selection boundaries are well separated. Every backend, the CUDA kernel on the host
emulation included. Then the op over real gloo groups (tests/dist_pool.py).
"""

import pytest
import torch
import torch.distributed as dist

import test_remask_step as single
from dist_pool import _session_pool, pool  # noqa: F401  (the fixtures)
from llada_kernels import remask_step
from llada_kernels.distributed import remask as vp
from llada_kernels.reference import remask as ref

MASK = single.MASK
TRITON = pytest.param("triton", marks=pytest.mark.triton)
PAIR = [(0, 19), (19, 37)]
ODD = [(0, 7), (7, 20), (20, 37)]  # odd offsets: Philox pairs (2j, 2j + 1) straddle shards
SEED = 987654321


def shard_step(backend, logits, x, k, splits, *, seed=SEED, threshold=None, uncond_logits=None,
               cfg_scale=0.0, generator_seed=0, **kw):
    """The vocabulary-parallel step with the exchange replaced by a stack: (x_new, transfer),
    and the merged choice and confidence."""
    B, L, V = logits.shape
    end = torch.full((B,), L) if "block_end" not in kw else kw.pop("block_end")
    args = dict(mask_id=MASK, temperature=kw.pop("temperature", 0.0),
                remasking=kw.pop("remasking", "low_confidence"),
                suppress_ids=list(kw.pop("suppress_ids", ())),
                zero_confidence_ids=list(kw.pop("zero_confidence_ids", ())))
    assert not kw, kw
    stats, x0s = [], []
    for lo, hi in splits:
        un = None if uncond_logits is None else uncond_logits[..., lo:hi]
        if backend == "reference":
            g = torch.Generator().manual_seed(generator_seed)
            st, x0 = ref.shard_stats(logits[..., lo:hi], x, end, uncond_logits=un,
                                     cfg_scale=cfg_scale, generator=g, vocab_offset=lo,
                                     vocab_size=V, **args)
        else:
            op = torch.ops.llada.remask_step_stats_triton if backend == "triton" else torch.ops.llada.remask_step_stats
            st, x0 = op(logits[..., lo:hi].contiguous(), None if un is None else un.contiguous(),
                        cfg_scale, x, end, args["mask_id"], args["temperature"], args["remasking"],
                        args["suppress_ids"], args["zero_confidence_ids"], torch.tensor([seed]), lo)
        stats.append(st.reshape(B * L, 4))
        x0s.append(x0.reshape(B * L))
    choice, conf = vp.merge(torch.stack(stats), torch.stack(x0s), args["remasking"])
    cand = (x == MASK) & (torch.arange(L) < end[:, None])
    transfer = ref.select(conf.view(B, L), cand, k, threshold)
    return (torch.where(transfer, choice.view(B, L), x), transfer), choice.view(B, L), conf.view(B, L)


def single_step(backend, logits, x, k, *, seed=SEED, generator_seed=0, threshold=None,
                uncond_logits=None, cfg_scale=0.0, **kw):
    """The single-device step of the same backend with the same random numbers."""
    B, L, V = logits.shape
    end = kw.pop("block_end", torch.full((B,), L))
    T, mode = kw.pop("temperature", 0.0), kw.pop("remasking", "low_confidence")
    sup, zero = list(kw.pop("suppress_ids", ())), list(kw.pop("zero_confidence_ids", ()))
    if backend == "reference":
        g = torch.Generator().manual_seed(generator_seed)
        return ref.remask_step(logits, x, k, mask_id=MASK, block_end=end, temperature=T,
                               remasking=mode, threshold=threshold, uncond_logits=uncond_logits,
                               cfg_scale=cfg_scale, suppress_ids=sup, zero_confidence_ids=zero,
                               generator=g)
    op = torch.ops.llada.remask_step_triton if backend == "triton" else torch.ops.llada.remask_step
    return op(logits, uncond_logits, cfg_scale, x, k, end, MASK, T, mode, threshold, sup, zero,
              torch.tensor([seed]))


def check(backend, logits, x, k, splits, **kw):
    """The step equals the single-device one, and so does x0 at every candidate (k = all)."""
    got, choice, conf = shard_step(backend, logits, x, k, splits, **kw)
    want = single_step(backend, logits, x, k, **kw)
    assert torch.equal(got[1], want[1]), f"transfer differs:\n{got[1].int()}\n{want[1].int()}"
    assert torch.equal(got[0], want[0]), f"x_new differs:\n{got[0]}\n{want[0]}"
    everything = torch.full_like(k, x.shape[1])
    all_x0 = single_step(backend, logits, x, everything, **kw)[0]
    end = kw.get("block_end", torch.full((x.shape[0],), x.shape[1]))
    cand = (x == MASK) & (torch.arange(x.shape[1]) < end[:, None])
    assert torch.equal(choice[cand], all_x0[cand]), "x0 differs from the single-device choice"
    return conf


MODES = ["low_confidence", "margin", "entropy", "random"]


@pytest.mark.parametrize("backend", ["reference", "cpu", TRITON])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_modes_and_temperatures(backend, mode, temperature):
    B, L, V = 2, 13, 37
    k = torch.tensor([3, 5])
    logits, x, _ = single.tie_free(B, L, V, k, torch.full((B,), L), mode if mode != "random" else "low_confidence")
    splits = ODD if backend != "triton" else PAIR
    check(backend, logits, x, k, splits, temperature=temperature, remasking=mode)


@pytest.mark.parametrize("backend", ["reference", "cpu", TRITON])
def test_threshold_cfg_special_ids_block_end(backend):
    """Fast-dLLM's threshold, CFG, suppressed and zero-confidence ids in several shards (one on
    a shard's first id), and a block end, at T = 0 and T > 0."""
    B, L, V = 2, 13, 37
    k = torch.tensor([1, 2])
    kw = dict(cfg_scale=1.5, suppress_ids=(3, 19, 30), zero_confidence_ids=(7, 25),
              block_end=torch.tensor([9, 13]))
    logits, x, cfg = single.tie_free(B, L, V, k, kw["block_end"], "low_confidence", threshold=0.3,
                                     suppress_ids=kw["suppress_ids"], zero_ids=kw["zero_confidence_ids"],
                                     cfg_scale=1.5)
    kw["uncond_logits"] = cfg["uncond_logits"]
    for T in (0.0, 0.5):
        check(backend, logits, x, k, ODD, threshold=0.3, temperature=T, **kw)


NONFINITE_SPLITS = [(0, 3), (3, 7), (7, 12)]


def nonfinite_logits():
    """[1, 8, 12] logits over the shards [0, 3) (every id suppressed), [3, 7), [7, 12), one row
    per case of the contract."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 8, 12, generator=g) * 3
    nan, inf = float("nan"), float("inf")
    logits[0, 0, 9] = nan      # NaN in shard 2, +inf in shard 1: the NaN wins
    logits[0, 0, 4] = inf
    logits[0, 1, 5] = inf      # +inf in two shards: the first
    logits[0, 1, 8] = inf
    logits[0, 2, 3:7] = -inf   # shard 1 all -inf: shard 2 chooses, finite confidence
    logits[0, 3, :] = -inf     # every id -inf: the lowest id not suppressed, 3 (shard 1)
    logits[0, 4, 1] = nan      # NaN only at a suppressed id: as -inf
    logits[0, 5, 7] = nan      # NaN only at a zero-confidence id: chosen; low_confidence 0
    logits[0, 6, 10] = 60.0    # a clear winner, its confidence near 1
    x = torch.full((1, 8), MASK)
    return logits, x, dict(suppress_ids=(0, 1, 2), zero_confidence_ids=(7,))


@pytest.mark.parametrize("backend, mode", [
    (b, m) for b in ("reference", "cpu") for m in ("low_confidence", "margin", "entropy")
] + [pytest.param("triton", "margin", marks=pytest.mark.triton)])  # the interpreter is slow
def test_nonfinite_contract_across_shards(backend, mode):
    logits, x, kw = nonfinite_logits()
    k = torch.tensor([3])
    for T in (0.0, 0.9):
        conf = check(backend, logits, x, k, NONFINITE_SPLITS, remasking=mode, temperature=T, **kw)
        x0 = shard_step(backend, logits, x, k, NONFINITE_SPLITS, remasking=mode, temperature=T, **kw)[1]
        assert x0[0, :4].tolist() == [9, 5, x0[0, 2].item(), 3] and x0[0, 2] >= 7 and x0[0, 5] == 7
        l = ref._fill_ids(logits.float(), kw["suppress_ids"])
        want = ref.confidence(l, x0, mode, list(kw["suppress_ids"]) + [7])
        torch.testing.assert_close(conf, want, rtol=1e-5, atol=1e-6)
        assert conf[0, 0] == 0 and conf[0, 1] == 0 and conf[0, 3] == 0 and conf[0, 2] != 0
        assert (conf[0, 5] == 0) == (mode == "low_confidence")


def test_a_shard_with_every_id_suppressed():
    logits, x, _ = nonfinite_logits()
    logits = logits.nan_to_num(0.0, 0.0, 0.0)
    for T in (0.0, 2.0):
        check("cpu", logits, x, torch.tensor([2]), [(0, 5), (5, 12)], suppress_ids=range(5),
              temperature=T)


def test_cuda_kernel_on_the_host_emulation():
    """The CUDA kernel's stats mode (one block per position, global ids from the offset),
    run on the host emulation: every mode at T = 0 and T > 0, odd offsets, the non-finite
    cases, threshold, CFG and special ids."""
    from cuda_emu import EmulatedCuda
    with EmulatedCuda() as emu:
        for mode in MODES:
            test_modes_and_temperatures("cpu", mode, 0.8)
        test_modes_and_temperatures("cpu", "low_confidence", 0.0)
        test_threshold_cfg_special_ids_block_end("cpu")
        test_nonfinite_contract_across_shards("cpu", "margin")
    assert emu.calls["remask_step_stats"] > 10 and emu.calls["remask_step"] > 10


@pytest.mark.parametrize("backend", ["cpu", TRITON])
def test_noise_keyed_by_local_ids_fails_the_check(backend):
    """The checker on a planted bug: shards that key the noise by their local id (offset 0)
    draw other numbers, so at T > 0 the choice differs from the single-device kernel's."""
    B, L, V = 2, 13, 37
    k = torch.tensor([13, 13])
    logits, x = single.make_inputs(B, L, V, scale=0.3)  # flat: the noise decides
    real = torch.ops.llada.remask_step_stats_triton if backend == "triton" else torch.ops.llada.remask_step_stats

    class Local:
        def __call__(self, *args):
            return real(*args[:-1], 0)
    name = "remask_step_stats_triton" if backend == "triton" else "remask_step_stats"
    ops = torch.ops.llada
    saved = getattr(ops, name)
    try:
        setattr(ops, name, Local())
        with pytest.raises(AssertionError, match="differs"):
            check(backend, logits, x, k, PAIR, temperature=1.0)
    finally:
        setattr(ops, name, saved)


# ---- the op over gloo ----------------------------------------------------------------------------

def check_op(ctx, backend, splits, mode, temperature, threshold, edit=False):
    """One rank: the public op on its shard, against the single-device op on the whole
    vocabulary with the same generator state; returns its result to compare across ranks.
    edit: with token editing (edit_threshold, an editable mask), which must edit something."""
    group = ctx.pair if len(splits) == 2 else dist.group.WORLD
    if group is None:
        return None
    lo, hi = splits[ctx.rank]
    B, L, V = 2, 13, 37
    k = torch.tensor([2, 4])
    logits, x, cfg = single.tie_free(B, L, V, k, torch.full((B,), L), "low_confidence", cfg_scale=0.5,
                                     threshold=threshold)
    kw = dict(mask_id=MASK, temperature=temperature, remasking=mode, threshold=threshold, cfg_scale=0.5,
              suppress_ids=(4, 20), zero_confidence_ids=(30,), backend=backend)
    if edit:
        editable = torch.arange(L) % 4 != 1
        kw.update(edit_threshold=0.3, editable=editable.expand(B, L))
    g = torch.Generator().manual_seed(11)
    got = remask_step(logits[..., lo:hi], x, k, uncond_logits=cfg["uncond_logits"][..., lo:hi],
                      generator=g, group=group, vocab_offset=lo, **kw)
    g = torch.Generator().manual_seed(11)
    want = remask_step(logits, x, k, uncond_logits=cfg["uncond_logits"], generator=g, **kw)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert not edit or (got[1] & (x != MASK)).any()
    return got[0].tolist(), got[1].tolist()


@pytest.mark.parametrize("backend, splits, mode, temperature, threshold, edit", [
    ("cpu", PAIR, "low_confidence", 0.0, None, False),
    ("cpu", ODD, "low_confidence", 0.0, 0.3, True),
    ("cpu", PAIR, "low_confidence", 0.7, None, True),
    ("reference", ODD, "low_confidence", 0.7, None, True),
    ("cpu", PAIR, "entropy", 0.7, 0.2, False),
    ("cpu", ODD, "margin", 0.7, None, False),
    ("reference", ODD, "random", 0.7, None, False),
    ("reference", PAIR, "low_confidence", 1.0, 0.3, False),
], ids=lambda v: str(v) if not isinstance(v, list) else f"{len(v)}_ranks")
def test_op(pool, backend, splits, mode, temperature, threshold, edit):
    """With editing too: the editable positions are scored in the stats pass and edited by the
    merged choice and confidence, as the single-device step edits them."""
    results = [r for r in pool.run(check_op, backend, splits, mode, temperature, threshold, edit)
               if r is not None]
    assert len(results) == len(splits) and all(r == results[0] for r in results)


@pytest.mark.triton
def test_op_triton(pool):
    pool.run(check_op, "triton", PAIR, "low_confidence", 0.7, 0.3, True)


def check_bad_input(ctx):
    if ctx.pair is None:
        return
    logits, x = single.make_inputs(1, 4, 10)
    lo, hi = [(0, 5), (5, 10)][ctx.rank]
    kw = dict(mask_id=MASK, group=ctx.pair, backend="cpu")
    with pytest.raises(ValueError, match="tile the vocabulary"):
        remask_step(logits[..., lo:hi], x, 1, vocab_offset=lo + 1, **kw)
    with pytest.raises(ValueError, match=r"suppress_ids holds 10, outside the vocabulary \[0, 10\)"):
        remask_step(logits[..., lo:hi], x, 1, vocab_offset=lo, suppress_ids=(10,), **kw)
    with pytest.raises(ValueError, match="suppress_ids covers the whole vocabulary"):
        remask_step(logits[..., lo:hi], x, 1, vocab_offset=lo, suppress_ids=range(10), **kw)
    with pytest.raises(ValueError, match=r"mask_id must be in \[0, 9\]"):
        remask_step(logits[..., lo:hi], x, 1, vocab_offset=lo, **{**kw, "mask_id": 12})


def test_bad_input(pool):
    pool.run(check_bad_input)
