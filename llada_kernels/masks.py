"""Structured attention masks for `llada_kernels.attention`, described by O(L) integers.

Every mask the masked-diffusion family needs is one rule over five small int32 vectors:

    query i sees key j  <=>  qdoc(i) == kdoc(j)  and  lo(j) <= level(i) <= hi(j)

    AttentionMask.q_mask  [B, 2, Lq] int32: (qdoc, level) per query
    AttentionMask.k_mask  [B, 3, Lk] int32: (kdoc, lo, hi) per key

so no backend ever receives an Lq x Lk tensor, and each can classify a (query tile, key tile)
pair from the tiles' minima and maxima: skipped (never computed, forward or backward), full
(no per-element mask) or partial. A model builds its mask once per forward and passes it to
every layer, as with FlexAttention's BlockMask:

    from llada_kernels import attention, masks
    mask = masks.block_causal(32, seq_len=L, document_ids=doc_ids)    # once per forward
    out = attention(q, k, v, mask)                                    # in every layer

The builders:
    key_padding(key_padding_mask)             HF attention_mask semantics: True = attend
    documents(cu_seqlens= | document_ids=)    packed sequences, each attending only itself
    block_causal(block_size, ...)             block j visible to block i iff j <= i; with
                                              queries shorter than keys (a KV cache), queries
                                              carry their absolute positions (q_offset)
    block_diffusion(block_size, seq_len)      the 2L training mask over [x_t ; x_0]
Each takes `key_padding_mask=`, and the last three take documents, so every combination is
one call. `mask.to_dense()` is the [B, Lq, Lk] bool mask it stands for (tests, SDPA).

Documents come in the two conventions trainers use:
  * cu_seqlens: flash-attn varlen's cumulative lengths over the flattened batch, int32 or
    int64, shape [N + 1]: 0 = cu[0] <= cu[1] <= ... <= cu[N] = B * L, and no document crosses
    a row (every multiple of L is in cu_seqlens). Zero-length documents are allowed (padded
    cu_seqlens). Use it when the data loader already produces it (flash-attn, Megatron,
    dFactory's rmpad path).
  * document_ids: [B, L] or [L] integer ids per token, as FlexAttention's document masking
    and HF's packed `seq_idx` use. Tokens attend tokens with the same id. With a block size
    the ids must be non-decreasing along each row (a document is a run of equal ids, and its
    blocks are counted from its first token); without one, any ids work (unsorted ids only
    make fewer tiles skippable).
With a block size, blocks restart at every document start: token t of a document is in block
t // block_size of that document. LLaDA2's packing pads every document to a multiple of the
block size, so its blocks line up with the global grid and this is exactly its mask. A
document whose length is not a multiple of the block size simply ends with a short block,
and the next document's first block starts at its first token: each document is masked
exactly as if it were alone in its row. (BD3-LM's and dFactory's masks over an unpacked row
count blocks from position 0 instead; the two agree when documents are block-aligned.)
Left padding in a batch can be written the same way: give the padding its own leading
document id (and a key_padding_mask), and each row's blocks start at its first real token.

A query that sees no key gets zeros (and zero gradients), never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _checks

INF = 2**31 - 1          # hi of a key that every later level sees
_NEVER = (INF, -2**31)   # (lo, hi) of a padded key: lo > hi, no level is in between


@dataclass(frozen=True, eq=False)
class AttentionMask:
    """The (q_mask, k_mask) description of a mask; build it with the functions of this module.

    q_mask: [B, 2, Lq] int32, (qdoc, level) per query.
    k_mask: [B, 3, Lk] int32, (kdoc, lo, hi) per key.
    kind: which builder made it ("key_padding", "documents", "block_causal",
        "block_diffusion", or "custom").
    key_padding_mask: the [B, Lk] bool mask this one was built from when it is key padding
        and nothing else, else None.
    A mask with B = 1 applies to every row of a batch.
    """

    q_mask: torch.Tensor
    k_mask: torch.Tensor
    kind: str = "custom"
    key_padding_mask: torch.Tensor | None = None

    def __post_init__(self):
        op = "AttentionMask"
        _checks.check_tensor(op, "q_mask", self.q_mask, dtypes=(torch.int32,), ndim=3)
        _checks.check_tensor(op, "k_mask", self.k_mask, dtypes=(torch.int32,), ndim=3)
        _checks.check_shape(op, "q_mask", self.q_mask, ("B", 2, "Lq"))
        _checks.check_shape(op, "k_mask", self.k_mask, (self.q_mask.shape[0], 3, "Lk"))
        _checks.check_device(op, "k_mask", self.k_mask, self.q_mask.device, "q_mask")

    @property
    def batch_size(self) -> int:
        return self.q_mask.shape[0]

    @property
    def q_len(self) -> int:
        return self.q_mask.shape[2]

    @property
    def k_len(self) -> int:
        return self.k_mask.shape[2]

    @property
    def device(self) -> torch.device:
        return self.q_mask.device

    def __repr__(self):
        return (f"AttentionMask(kind={self.kind!r}, batch_size={self.batch_size}, "
                f"q_len={self.q_len}, k_len={self.k_len}, device={self.device})")

    def to(self, device) -> AttentionMask:
        kpm = None if self.key_padding_mask is None else self.key_padding_mask.to(device)
        return AttentionMask(self.q_mask.to(device), self.k_mask.to(device), self.kind, kpm)

    def to_dense(self) -> torch.Tensor:
        """[B, Lq, Lk] bool, True where query i sees key j (O(Lq Lk): for tests and SDPA)."""
        from .reference.attention import dense_mask

        return dense_mask(self.q_mask, self.k_mask)

    def with_key_padding(self, key_padding_mask: torch.Tensor) -> AttentionMask:
        """This mask, and also never a key where key_padding_mask [B, Lk] bool is False."""
        op = "AttentionMask.with_key_padding"
        _check_key_padding(op, key_padding_mask, None, self.k_len, self.device)
        B = max(self.batch_size, key_padding_mask.shape[0])
        q_mask = self.q_mask.expand(B, -1, -1)
        doc, lo, hi = self.k_mask.expand(B, -1, -1).unbind(1)
        k_mask = _k_mask(doc, lo, hi, key_padding_mask)
        kpm = None
        if self.kind == "key_padding":
            kpm = self.key_padding_mask.expand(B, -1) & key_padding_mask
        return AttentionMask(q_mask.contiguous(), k_mask,
                             "key_padding" if kpm is not None else self.kind, kpm)

    def keys(self, start: int, stop: int) -> AttentionMask:
        """The same mask restricted to keys [start, stop) (the queries unchanged): what one
        rank runs over its chunk of the keys under context parallelism, before
        llada_kernels.merge_attention combines the chunks' outputs."""
        if not 0 <= start <= stop <= self.k_len:
            _checks.fail("AttentionMask.keys", f"need 0 <= start <= stop <= k_len = {self.k_len}; "
                         f"got start={start}, stop={stop}")
        kpm = None if self.key_padding_mask is None else self.key_padding_mask[:, start:stop]
        k_mask = self.k_mask[:, :, start:stop].contiguous()
        return AttentionMask(self.q_mask, k_mask, self.kind, kpm)

    def tensors(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_mask, k_mask) for a batch of batch_size rows, contiguous, as the kernels take them."""
        if self.batch_size not in (1, batch_size):
            _checks.fail("attention", f"mask has batch size {self.batch_size}; expected 1 or "
                         f"the batch size of q ({batch_size})")
        return (self.q_mask.expand(batch_size, -1, -1).contiguous(),
                self.k_mask.expand(batch_size, -1, -1).contiguous())

    def tile_counts(self, block_m: int = 64, block_n: int = 64) -> dict[str, int]:
        """How a kernel with block_m x block_n tiles classifies the (query tile, key tile)
        pairs of this mask, summed over the batch (per head): {"skip", "full", "partial",
        "total"} by the tiles' minima and maxima (ATTN_MASK_SPEC.md), and "empty": the partial
        tiles in which no query sees any key (kernels that test the elements first skip those
        too)."""
        return tile_counts(self.q_mask, self.k_mask, block_m, block_n)


# ---- builders ----------------------------------------------------------------------------

def key_padding(key_padding_mask: torch.Tensor, q_len: int | None = None) -> AttentionMask:
    """Key padding alone: query i sees key j iff key_padding_mask[b, j] (True = attend, HF's
    attention_mask semantics).

    Args:
        key_padding_mask: [B, Lk] bool.
        q_len: Lq, the number of queries (default Lk).
    Returns an AttentionMask with q_mask [B, 2, Lq], k_mask [B, 3, Lk].
    """
    op = "masks.key_padding"
    _check_key_padding(op, key_padding_mask, None, None, None)
    Lk = key_padding_mask.shape[1]
    Lq = Lk if q_len is None else _check_len(op, "q_len", q_len)
    q_mask, k_mask = key_padding_tensors(key_padding_mask, Lq)
    return AttentionMask(q_mask, k_mask, "key_padding", key_padding_mask)


def key_padding_tensors(key_padding_mask: torch.Tensor, q_len: int):
    """(q_mask [B, 2, Lq], k_mask [B, 3, Lk]) of key padding alone, unchecked: what
    key_padding() holds, in a few kernel launches (attention's key_padding_mask= path)."""
    B, Lk = key_padding_mask.shape
    device = key_padding_mask.device
    q_mask = torch.zeros(B, 2, q_len, dtype=torch.int32, device=device)
    k_mask = torch.zeros(B, 3, Lk, dtype=torch.int32, device=device)
    pad = ~key_padding_mask
    k_mask[:, 1].masked_fill_(pad, _NEVER[0])
    k_mask[:, 2].fill_(INF).masked_fill_(pad, _NEVER[1])
    return q_mask, k_mask


def documents(*, cu_seqlens: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
              seq_len: int | None = None, batch_size: int | None = None, q_len: int | None = None,
              q_offset: int | torch.Tensor | None = None, q_positions: torch.Tensor | None = None,
              key_padding_mask: torch.Tensor | None = None) -> AttentionMask:
    """Packed documents (flash-attn varlen): every token attends, bidirectionally, the tokens
    of its own document only. Give exactly one of cu_seqlens and document_ids (see the module
    docstring for the two conventions).

    Args:
        cu_seqlens: [N + 1] int32/int64 over the flattened batch, as flash-attn's varlen API.
        document_ids: [B, L] or [L] integer document id per token.
        seq_len: L, the keys per row. With cu_seqlens, L defaults to cu[-1] (one row) and B to
            cu[-1] / L: reading cu[-1] is a host sync, so give both under torch.compile.
        batch_size: B, when nothing else says it (a [L] document_ids applies to every row).
        q_len, q_offset, q_positions: queries shorter than keys, as in block_causal.
        key_padding_mask: [B, L] bool, True = attend; padded keys are seen by no query.
    Returns an AttentionMask with q_mask [B, 2, Lq], k_mask [B, 3, L].
    """
    if cu_seqlens is None and document_ids is None:
        _checks.fail("masks.documents", "give cu_seqlens or document_ids")
    return _build("masks.documents", "documents", None, seq_len, batch_size, q_len, q_offset,
                  q_positions, cu_seqlens, document_ids, key_padding_mask, None)


def block_causal(block_size: int, *, seq_len: int | None = None, batch_size: int | None = None,
                 q_len: int | None = None, q_offset: int | torch.Tensor | None = None,
                 q_positions: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                 document_ids: torch.Tensor | None = None,
                 key_padding_mask: torch.Tensor | None = None,
                 device: torch.device | str | None = None) -> AttentionMask:
    """Block-causal attention (LLaDA2, SDAR, Fast-dLLM v2 sampling and training): with block
    size b, the query at position i sees the key at position j iff j // b <= i // b:
    bidirectional inside a block, causal across blocks.

    Queries are keys: the query i stands at key index q_offset + i (default q_offset =
    Lk - Lq: the queries are the last Lq keys, the KV-cache layout [cached prefix ; current
    block], and flash-attn's bottom-right alignment; 0 when Lq == Lk), or at
    q_positions[b, i] when given. A query therefore needs its own key: q_offset + Lq <= Lk.
    Positions (and so blocks) are counted from each document's first token.

    Args:
        block_size: b >= 1.
        seq_len: Lk, the keys per row, when no tensor argument says it.
        batch_size: B, when no tensor argument says it (default 1: one mask for every row).
        q_len: Lq <= Lk (default Lk).
        q_offset: int, or [B] integer tensor (a different cache length per row).
        q_positions: [B, Lq] or [Lq] integer key indices, in [0, Lk).
        cu_seqlens, document_ids: packed documents, as in `documents`.
        key_padding_mask: [B, Lk] bool, True = attend.
        device: where to build it, when no tensor argument says it.
    Returns an AttentionMask with q_mask [B, 2, Lq], k_mask [B, 3, Lk].
    """
    op = "masks.block_causal"
    block_size = _check_block_size(op, block_size)
    return _build(op, "block_causal", block_size, seq_len, batch_size, q_len, q_offset,
                  q_positions, cu_seqlens, document_ids, key_padding_mask, device)


def block_diffusion(block_size: int, seq_len: int | None = None, *, batch_size: int | None = None,
                    cu_seqlens: torch.Tensor | None = None,
                    document_ids: torch.Tensor | None = None,
                    key_padding_mask: torch.Tensor | None = None,
                    device: torch.device | str | None = None) -> AttentionMask:
    """The block-diffusion training mask over the concatenation [x_t ; x_0] of length 2L
    (BD3-LM's block_diff_mask, LLaDA2.0's eq. 3, dFactory's block_diffusion_mask). With
    block n of x_t ("noisy") and block n of x_0 ("clean"):
        noisy block n sees noisy block n (bidirectionally) and clean blocks m < n;
        clean block n sees clean blocks m <= n;
        clean never sees noisy.
    Encoded as levels: noisy query of block n has level 2n, clean query 2n + 1; a noisy key of
    block m has [lo, hi] = [2m, 2m], a clean key [2m + 1, INF].

    Args:
        block_size: b >= 1.
        seq_len: L, the tokens of x_t (and of x_0); q and k then have 2L positions, x_t first.
        batch_size, device: when no tensor argument says them.
        cu_seqlens, document_ids: packed documents over one half (cu_seqlens ends at B * L,
            document_ids is [B, L] or [L]); x_t and x_0 share them, and blocks restart at
            every document start.
        key_padding_mask: [B, L] bool (applied to both halves) or [B, 2L], True = attend.
    Returns an AttentionMask with q_mask [B, 2, 2L], k_mask [B, 3, 2L].
    """
    op = "masks.block_diffusion"
    block_size = _check_block_size(op, block_size)
    if batch_size is None and isinstance(key_padding_mask, torch.Tensor) and key_padding_mask.dim() == 2:
        batch_size = key_padding_mask.shape[0]
    if seq_len is None and cu_seqlens is None and document_ids is None:
        _checks.fail(op, "seq_len (L, the length of x_t) is needed when no documents are given")
    L, B, device = _sizes(op, seq_len, batch_size, cu_seqlens, document_ids, None, device)
    doc, pos = _doc_and_pos(op, L, B, cu_seqlens, document_ids, True, device)
    if key_padding_mask is not None:
        if key_padding_mask.dim() == 2 and key_padding_mask.shape[-1] == L:
            key_padding_mask = torch.cat([key_padding_mask, key_padding_mask], dim=-1)
        _check_key_padding(op, key_padding_mask, B, 2 * L, device, "[B, L] or [B, 2L]")
    block = (pos // block_size).to(torch.int32)
    noisy, clean = 2 * block, 2 * block + 1
    doc2 = torch.cat([doc, doc], dim=-1)
    q_mask = torch.stack([doc2, torch.cat([noisy, clean], dim=-1)], dim=1)
    k_mask = _k_mask(doc2, torch.cat([noisy, clean], dim=-1),
                     torch.cat([noisy, torch.full_like(clean, INF)], dim=-1), key_padding_mask)
    Bm = max(k_mask.shape[0], B)
    return AttentionMask(q_mask.expand(Bm, -1, -1).contiguous(),
                         k_mask.expand(Bm, -1, -1).contiguous(), "block_diffusion")


# ---- tile classification (what the kernels do, for benchmarks and tests) ----------------

def tile_counts(q_mask: torch.Tensor, k_mask: torch.Tensor, block_m: int, block_n: int) -> dict:
    """See AttentionMask.tile_counts."""
    B, _, Lq = q_mask.shape
    Lk = k_mask.shape[2]
    big, small = INF, -2**31

    def stats(x, block, fill_min, fill_max):  # [B, C, L] -> min, max per tile [B, C, T]
        T = -(-x.shape[-1] // block)
        pad = T * block - x.shape[-1]
        lo = torch.nn.functional.pad(x.long(), (0, pad), value=fill_min).view(B, -1, T, block)
        hi = torch.nn.functional.pad(x.long(), (0, pad), value=fill_max).view(B, -1, T, block)
        return lo.amin(-1), hi.amax(-1)

    qmin, qmax = stats(q_mask, block_m, big, small)        # [B, 2, Tm]
    kmin, kmax = stats(k_mask, block_n, big, small)        # [B, 3, Tn]
    # Keys past Lk are never visible: (lo, hi) = (INF, MIN) as the kernels load them.
    tail = Lk % block_n != 0
    if tail:
        kmax[:, 1, -1] = big
        kmin[:, 2, -1] = small
    qd_min, qd_max, lv_min, lv_max = (t[:, :, None] for t in
                                      (qmin[:, 0], qmax[:, 0], qmin[:, 1], qmax[:, 1]))
    kd_min, kd_max, lo_min, lo_max, hi_min, hi_max = (t[:, None, :] for t in (
        kmin[:, 0], kmax[:, 0], kmin[:, 1], kmax[:, 1], kmin[:, 2], kmax[:, 2]))
    skip = (qd_max < kd_min) | (kd_max < qd_min) | (lv_max < lo_min) | (lv_min > hi_max)
    full = ((qd_min == qd_max) & (kd_min == kd_max) & (qd_min == kd_min) & (lo_max <= lv_min)
            & (lv_max <= hi_min))
    full &= ~skip
    partial = ~skip & ~full
    out = {"skip": int(skip.sum()), "full": int(full.sum()), "partial": int(partial.sum()),
           "total": skip.numel(), "empty": None}
    if B * Lq * Lk <= 2**28:
        from .reference.attention import dense_mask

        dense = dense_mask(q_mask, k_mask)
        Tm, Tn = skip.shape[1], skip.shape[2]
        dense = torch.nn.functional.pad(dense, (0, Tn * block_n - Lk, 0, Tm * block_m - Lq))
        any_ = dense.view(B, Tm, block_m, Tn, block_n).any(4).any(2)
        out["empty"] = int((partial & ~any_).sum())
    return out


# ---- helpers -----------------------------------------------------------------------------

def _k_mask(doc, lo, hi, key_padding_mask):
    """[B, 3, Lk] int32 from (doc, lo, hi) [B, Lk], with padded keys made invisible."""
    if key_padding_mask is not None:
        lo = torch.where(key_padding_mask, lo, _NEVER[0])
        hi = torch.where(key_padding_mask, hi, _NEVER[1])
    B = max(doc.shape[0], lo.shape[0], hi.shape[0])
    return torch.stack([t.expand(B, -1).to(torch.int32) for t in (doc, lo, hi)], dim=1).contiguous()


def _build(op, kind, block_size, seq_len, batch_size, q_len, q_offset, q_positions,
           cu_seqlens, document_ids, key_padding_mask, device):
    for name, t in (("q_offset", q_offset), ("q_positions", q_positions)):
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] > 1 and t.dim() == (
                1 if name == "q_offset" else 2):  # a tensor per row says the batch size
            if batch_size not in (None, t.shape[0]):
                _checks.fail(op, f"{name} has batch size {t.shape[0]}; expected {batch_size}")
            batch_size = t.shape[0]
    Lk, B, device = _sizes(op, seq_len, batch_size, cu_seqlens, document_ids, key_padding_mask,
                           device, q_positions)
    if key_padding_mask is not None:
        _check_key_padding(op, key_padding_mask, B, Lk, device)
    doc, pos = _doc_and_pos(op, Lk, B, cu_seqlens, document_ids, block_size is not None, device)
    qidx = _query_index(op, Lk, B, q_len, q_offset, q_positions, device)   # [B or 1, Lq]
    Bq = max(doc.shape[0], qidx.shape[0])
    qidx = qidx.expand(Bq, -1)
    qdoc = doc.expand(Bq, -1).gather(1, qidx)
    if block_size is None:
        level = torch.zeros_like(qdoc)
        lo = torch.zeros_like(doc)
    else:
        level = (pos.expand(Bq, -1).gather(1, qidx) // block_size).to(torch.int32)
        lo = (pos // block_size).to(torch.int32)
    q_mask = torch.stack([qdoc, level], dim=1)
    k_mask = _k_mask(doc, lo, torch.full_like(lo, INF), key_padding_mask)
    Bm = max(q_mask.shape[0], k_mask.shape[0], B)
    return AttentionMask(q_mask.expand(Bm, -1, -1).contiguous(),
                         k_mask.expand(Bm, -1, -1).contiguous(), kind)


def _sizes(op, seq_len, batch_size, cu_seqlens, document_ids, key_padding_mask, device,
           q_positions=None):
    """(L, B, device) from the arguments that say them, checked against each other."""
    if cu_seqlens is not None and document_ids is not None:
        _checks.fail(op, "give cu_seqlens or document_ids, not both")
    L = None if seq_len is None else _check_len(op, "seq_len", seq_len)
    B = None if batch_size is None else _check_len(op, "batch_size", batch_size, minimum=1)
    devices = []
    for name, t, dims in (("document_ids", document_ids, (1, 2)),
                          ("key_padding_mask", key_padding_mask, (2,))):
        if t is None:
            continue
        _checks.check_tensor(op, name, t)
        if t.dim() not in dims:
            _checks.fail(op, f"{name} must have {' or '.join(map(str, dims))} dimensions; got "
                         f"{t.dim()} (shape {list(t.shape)})")
        if L is not None and t.shape[-1] != L:
            _checks.fail(op, f"{name} has {t.shape[-1]} positions but seq_len is {L}")
        L = t.shape[-1]
        if t.dim() == 2:
            if B is not None and t.shape[0] != B and not (name == "key_padding_mask" and B == 1):
                _checks.fail(op, f"{name} has batch size {t.shape[0]}; expected {B}")
            B = t.shape[0] if B in (None, 1) else B
        devices.append((name, t.device))
    if cu_seqlens is not None:
        _checks.check_tensor(op, "cu_seqlens", cu_seqlens, ndim=1)
        devices.append(("cu_seqlens", cu_seqlens.device))
        if L is None and B not in (None, 1):
            _checks.fail(op, "seq_len is needed with cu_seqlens when batch_size > 1")
    if q_positions is not None:
        _checks.check_tensor(op, "q_positions", q_positions)
        devices.append(("q_positions", q_positions.device))
    if device is not None:
        devices.append(("device", torch.device(device)))
    if devices:
        for name, d in devices[1:]:
            if d != devices[0][1]:
                _checks.fail(op, f"{name} is on {d} but {devices[0][0]} is on {devices[0][1]}; "
                             "they must share a device")
        device = devices[0][1]
    else:
        device = torch.device("cpu")
    if cu_seqlens is not None and (L is None or B is None):
        # The total length is a value: one host read (give seq_len and batch_size to avoid it,
        # e.g. under torch.compile).
        if cu_seqlens.numel() == 0:
            _checks.fail(op, "cu_seqlens must have at least one element (0)")
        total = int(cu_seqlens[-1])
        if L is None:
            L = total
        elif total % L != 0 if L else total != 0:
            _checks.fail(op, f"cu_seqlens must end at a multiple of seq_len ({L}), the number "
                         f"of tokens B * L; got {total}")
        else:
            B = total // L if L else 1
    if L is None:
        _checks.fail(op, "seq_len is needed when no tensor argument gives the sequence length")
    return L, (1 if B is None else B), device


def _doc_and_pos(op, L, B, cu_seqlens, document_ids, need_pos, device):
    """kdoc [B or 1, L] int32 and the position of each token in its document [B or 1, L]."""
    arange = torch.arange(L, device=device)
    if cu_seqlens is not None:
        _check_cu_seqlens(op, cu_seqlens, B, L)
        cu = cu_seqlens.long()
        idx = torch.arange(B * L, device=device)
        doc = torch.searchsorted(cu, idx, right=True) - 1         # the last document starting <= idx
        pos = idx - cu[doc]
        return doc.view(B, L).to(torch.int32), pos.view(B, L)
    if document_ids is not None:
        if document_ids.dtype.is_floating_point or document_ids.dtype == torch.bool \
                or document_ids.is_complex():
            _checks.fail(op, f"document_ids must have an integer dtype; got "
                         f"{str(document_ids.dtype).removeprefix('torch.')}", TypeError)
        ids = document_ids if document_ids.dim() == 2 else document_ids[None]
        if _checks.values_checked() and ids.numel():
            if bool((ids < -2**31).any() | (ids > INF).any()):
                _checks.fail(op, "document_ids must fit in int32")
            if need_pos and L > 1:
                bad = ids[:, 1:] < ids[:, :-1]
                if bool(bad.any()):
                    b, i = (int(x) for x in bad.nonzero()[0])
                    _checks.fail(op, "document_ids must be non-decreasing along each row with a "
                                 f"block size (blocks restart at each document start); row {b} "
                                 f"has {int(ids[b, i])} at position {i} and "
                                 f"{int(ids[b, i + 1])} at {i + 1}")
        pos = None
        if need_pos:
            start = torch.ones_like(ids, dtype=torch.bool)
            start[:, 1:] = ids[:, 1:] != ids[:, :-1]
            first = torch.where(start, arange, 0).cummax(dim=1).values
            pos = arange - first
        return ids.to(torch.int32), pos
    return torch.zeros(1, L, dtype=torch.int32, device=device), arange[None]


def _query_index(op, Lk, B, q_len, q_offset, q_positions, device):
    """[B or 1, Lq] int64: the key index each query stands at."""
    if q_positions is not None:
        if q_offset is not None or q_len is not None:
            _checks.fail(op, "give q_positions alone, or q_len / q_offset, not both")
        if q_positions.dtype.is_floating_point or q_positions.dtype == torch.bool:
            _checks.fail(op, "q_positions must have an integer dtype; got "
                         f"{str(q_positions.dtype).removeprefix('torch.')}", TypeError)
        if q_positions.dim() not in (1, 2) or (q_positions.dim() == 2
                                               and q_positions.shape[0] not in (1, B)):
            _checks.fail(op, f"q_positions must have shape [Lq] or [{B}, Lq]; got "
                         f"{list(q_positions.shape)}")
        pos = q_positions.long()
        if _checks.values_checked() and pos.numel():
            bad = (pos < 0) | (pos >= Lk)
            if bool(bad.any()):
                _checks.fail(op, f"q_positions holds {int(pos[bad][0])}, outside the keys "
                             f"[0, {Lk}): every query must stand at one of the keys")
        return pos if pos.dim() == 2 else pos[None]
    Lq = Lk if q_len is None else _check_len(op, "q_len", q_len)
    if Lq > Lk:
        _checks.fail(op, f"q_len ({Lq}) must be <= the keys ({Lk}): every query stands at a key")
    arange = torch.arange(Lq, device=device)
    if q_offset is None:
        return (Lk - Lq + arange)[None]
    if isinstance(q_offset, torch.Tensor):
        if q_offset.dtype.is_floating_point or q_offset.dtype == torch.bool or q_offset.dim() > 1 \
                or q_offset.numel() not in (1, B):
            _checks.fail(op, f"q_offset must be an int or an integer tensor of shape [{B}]; got "
                         f"{q_offset.dtype} {list(q_offset.shape)}")
        _checks.check_device(op, "q_offset", q_offset, device, "the mask")
        off = q_offset.long().reshape(-1, 1)
        if _checks.values_checked():
            bad = (off < 0) | (off + Lq > Lk)
            if bool(bad.any()):
                _checks.fail(op, f"q_offset + q_len must be in [q_len, {Lk}] (the keys); got "
                             f"q_offset {int(off[bad][0])} with q_len {Lq}")
        return off + arange
    if isinstance(q_offset, bool) or not isinstance(q_offset, int):
        _checks.fail(op, f"q_offset must be an int or a tensor; got {type(q_offset).__name__}",
                     TypeError)
    if q_offset < 0 or q_offset + Lq > Lk:
        _checks.fail(op, f"q_offset ({q_offset}) + q_len ({Lq}) is past the keys ({Lk}); "
                     f"q_offset must be in [0, {Lk - Lq}]")
    return (q_offset + arange)[None]


def _check_block_size(op, block_size):
    if isinstance(block_size, torch.Tensor) and block_size.numel() == 1 \
            and not block_size.dtype.is_floating_point:
        block_size = int(block_size)
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        _checks.fail(op, f"block_size must be an int; got {type(block_size).__name__}", TypeError)
    if block_size < 1:
        _checks.fail(op, f"block_size must be >= 1; got {block_size}")
    return block_size


def _check_len(op, name, value, minimum=0):
    if isinstance(value, bool) or not isinstance(value, int):
        _checks.fail(op, f"{name} must be an int; got {type(value).__name__}", TypeError)
    if not minimum <= value < 2**31:
        _checks.fail(op, f"{name} must be in [{minimum}, 2^31); got {value}")
    return value


def _check_key_padding(op, kpm, B, L, device, shape=None):
    _checks.check_tensor(op, "key_padding_mask", kpm, dtypes=(torch.bool,), ndim=2)
    if L is not None and kpm.shape[1] != L or B is not None and kpm.shape[0] not in (1, B):
        _checks.fail(op, f"key_padding_mask must have shape {shape or f'[{B}, {L}]'}; got "
                     f"{list(kpm.shape)}")
    if device is not None:
        _checks.check_device(op, "key_padding_mask", kpm, torch.device(device), "the mask")


def _check_cu_seqlens(op, cu, B, L):
    if cu.dtype not in (torch.int32, torch.int64):
        _checks.fail(op, f"cu_seqlens must have dtype int32 or int64; got "
                     f"{str(cu.dtype).removeprefix('torch.')}", TypeError)
    if cu.numel() < 2:
        _checks.fail(op, f"cu_seqlens must hold at least [0, total]; got {cu.tolist()}")
    if not _checks.values_checked():
        return
    if int(cu[0]) != 0:
        _checks.fail(op, f"cu_seqlens must start at 0; got {int(cu[0])}")
    step = cu[1:] - cu[:-1]
    if bool((step < 0).any()):
        i = int((step < 0).nonzero()[0])
        _checks.fail(op, f"cu_seqlens must be non-decreasing; got {int(cu[i])} then "
                     f"{int(cu[i + 1])} at index {i + 1}")
    if int(cu[-1]) != B * L:
        _checks.fail(op, f"cu_seqlens must end at B * L = {B} * {L} = {B * L} (every token in a "
                     f"document); got {int(cu[-1])}")
    if B > 1:
        rows = torch.arange(0, B * L + 1, L, device=cu.device)
        missing = ~torch.isin(rows, cu.long())
        if bool(missing.any()):
            _checks.fail(op, f"cu_seqlens must contain every row boundary (multiples of L = {L}): "
                         f"a document may not cross rows; {int(rows[missing][0])} is missing")
