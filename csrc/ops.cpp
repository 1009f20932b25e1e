// The schemas of every llada-kernels operator, in one place.
//
// Implementations live one file per backend: csrc/cpu/<op>.cpp registers the CPU kernel,
// csrc/cuda/<op>.cu the CUDA kernel. Each op has a `<op>_triton` twin with the same schema,
// whose kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) are registered from
// Python by llada_kernels/triton/<op>.py. Argument checks that the user can get wrong are
// done once, in Python (llada_kernels/_checks.py); the C++ entry points only re-check what
// Python cannot see.
//
// Shapes: B batch, L sequence length, V vocabulary, H heads, D head dimension.

#include <torch/library.h>

#include "isa.h"

TORCH_LIBRARY(llada, m) {
  // One LLaDA sampling step: choose x0 per masked position (argmax, or Gumbel-max at
  // temperature > 0), score it, and commit the top num_transfer[b] candidates of each row.
  //   logits         [B, L, V] fp32/bf16/fp16, unit stride along V
  //   uncond_logits  [B, L, V] same dtype, or None; with it the kernel reads
  //                  un + (cfg_scale + 1) * (logits - un) on the fly (classifier-free guidance)
  //   x              [B, L] int64, the current tokens
  //   num_transfer   [B] int64 >= 0, k per row
  //   block_end      [B] int64, positions >= block_end[b] are never chosen
  //   remasking      "low_confidence" | "random" | "margin" | "entropy"
  //   threshold      commit every candidate with confidence >= threshold as well (Fast-dLLM)
  //   suppress_ids   ids whose logits count as -inf everywhere
  //   zero_confidence_ids  ids whose logits count as -inf in the confidence softmax only
  //   seed           [1] int64 on the logits' device, or None; required when
  //                  temperature > 0 or remasking == "random"
  //   edit_threshold LLaDA2.1's token editing, or None (off): an editable position holding a
  //                  committed token (x != mask_id, any l) is scored in the same pass as the
  //                  candidates (x0 and confidence by the same rules, its own noise) and takes
  //                  x0 iff x0 != x and confidence > fp32(edit_threshold); it takes no part in
  //                  the selection
  //   editable       [B, L] bool, the positions that may be edited, or None: every committed
  //                  position (read only with edit_threshold)
  // Returns x_new [B, L] int64 and transfer [B, L] bool (the positions written: committed
  // candidates, and edited positions, told apart by x != mask_id).
  // remask_step_triton has the same schema; its kernel is registered from Python.
#define REMASK_STEP_SCHEMA                                                                    \
  "(Tensor logits, Tensor? uncond_logits, float cfg_scale, Tensor x, Tensor num_transfer, "   \
  "Tensor block_end, int mask_id, float temperature, str remasking, float? threshold, "       \
  "int[] suppress_ids, int[] zero_confidence_ids, Tensor? seed, float? edit_threshold=None, " \
  "Tensor? editable=None) -> (Tensor x_new, Tensor transfer)"
  m.def("remask_step" REMASK_STEP_SCHEMA);
  m.def("remask_step_triton" REMASK_STEP_SCHEMA);
#undef REMASK_STEP_SCHEMA

  // remask_step's pass over a vocabulary shard, stopped before the selection: the statistics
  // that ranks holding the shards of one vocabulary exchange and merge into the step
  // (llada_kernels/distributed/remask.py). logits (and uncond_logits) [B, L, V_r] hold ids
  // [vocab_offset, vocab_offset + V_r); ids are global everywhere: suppress_ids and
  // zero_confidence_ids (those of other shards are ignored), x0, and the Gumbel noise of id v,
  // keyed by v (common/random.h), so that a draw does not depend on the split. Other
  // arguments as remask_step. Returns, at candidate positions (0 elsewhere):
  //   x0     [B, L] int64: the shard's choice by remask_step's rule over its ids, or -1 when
  //          every id of the shard is suppressed
  //   stats  [B, L, 4] fp32: (y, m, s, aux)
  //          y    x0's value: NaN when x0 is the shard's first NaN, +inf its first +inf, else
  //               the (noisy, clamped) max, or -inf when every choice logit is -inf (then x0
  //               is the shard's lowest id that is not suppressed)
  //          m, s the max of the confidence logits z and sum exp(z - m); the shard holds a NaN
  //               or +inf z when m is NaN or +inf or s is NaN; m = -inf, s = 0 when no z is
  //               finite
  //          aux  low_confidence: z[x0] (-inf for a zero-confidence x0); margin: the second
  //               largest z (duplicates counted); entropy: sum exp(z - m) (z - m);
  //               random: the position's uniform
  // remask_step's confidence on one device is: low_confidence exp(aux - m) / s; margin
  // (1 - exp(aux - m)) / s; entropy aux / s - log s; random aux; 0 where m is not finite or
  // the formula is NaN.
#define REMASK_STATS_SCHEMA                                                                   \
  "(Tensor logits, Tensor? uncond_logits, float cfg_scale, Tensor x, Tensor block_end, "      \
  "int mask_id, float temperature, str remasking, int[] suppress_ids, "                       \
  "int[] zero_confidence_ids, Tensor? seed, int vocab_offset) -> (Tensor stats, Tensor x0)"
  m.def("remask_step_stats" REMASK_STATS_SCHEMA);
  m.def("remask_step_stats_triton" REMASK_STATS_SCHEMA);
#undef REMASK_STATS_SCHEMA

  // Masked diffusion loss, row form: the kernels behind llada_kernels.masked_diffusion_loss and
  // the chunks of llada_kernels.fused_linear_masked_diffusion_loss. Rows are (batch, position)
  // pairs flattened to N = B * L; a row's weight is 1 / p_mask where masked, 0 elsewhere. The
  // kernels compute each row's cross-entropy; the caller multiplies by the weights (so that
  // autograd differentiates p_mask too).
  //   logits   [N, V] fp32/bf16/fp16/fp64, unit stride along V (any row stride)
  //   targets  [N] int64, the clean tokens; read only where weights != 0
  //   weights  [N] fp32 (fp64 for fp64 logits); rows with weight 0 are skipped
  //   ce       [N] logsumexp(logits) - logits[target] = log_sum + (max - logits[target]),
  //            exactly 0 where weight == 0
  //   stats    [N, 2] fp32 (fp64): the row max and log sum_j exp(logits_j - max), apart (their
  //            sum, the log-sum-exp, would round away the log-sum at large logits); (0, 0)
  //            where weight == 0, (NaN, NaN) where a logit is NaN or +inf, (-inf, -inf) where
  //            every logit is -inf (a vocabulary-parallel shard's row may; ce is NaN either way)
  //   grad_ce  [N], the upstream gradient of ce
  //   grad_logits [N, V] logits' dtype: grad_ce * (softmax(logits) - onehot(target)), 0 where
  //            weight == 0
  // masked_diffusion_loss returns (ce, stats); masked_diffusion_loss_backward returns
  // grad_logits. masked_diffusion_loss_fwd_bwd computes ce and overwrites logits with the
  // gradient of sum(weights * ce), weights * (softmax - onehot), in one visit per row: the
  // fused-linear form runs it chunk by chunk. Each has a _triton twin with the same schema,
  // registered from Python. Non-finite logits: README, "Non-finite and extreme inputs".
#define MDL_FWD_SCHEMA "(Tensor logits, Tensor targets, Tensor weights) -> (Tensor ce, Tensor stats)"
#define MDL_BWD_SCHEMA                                                                        \
  "(Tensor grad_ce, Tensor logits, Tensor targets, Tensor weights, Tensor stats) -> Tensor"
#define MDL_FWD_BWD_SCHEMA "(Tensor(a!) logits, Tensor targets, Tensor weights) -> Tensor ce"
  m.def("masked_diffusion_loss" MDL_FWD_SCHEMA);
  m.def("masked_diffusion_loss_triton" MDL_FWD_SCHEMA);
  m.def("masked_diffusion_loss_backward" MDL_BWD_SCHEMA);
  m.def("masked_diffusion_loss_backward_triton" MDL_BWD_SCHEMA);
  m.def("masked_diffusion_loss_fwd_bwd" MDL_FWD_BWD_SCHEMA);
  m.def("masked_diffusion_loss_fwd_bwd_triton" MDL_FWD_BWD_SCHEMA);
#undef MDL_FWD_SCHEMA
#undef MDL_BWD_SCHEMA
#undef MDL_FWD_BWD_SCHEMA

  // Masked diffusion loss from hidden states and the lm_head, without materialising [B, L, V].
  // A composite implemented in Python (llada_kernels/ops/loss.py) for CPU and CUDA tensors: it
  // gathers the masked rows (one host sync for their count) and runs them through
  // masked_diffusion_loss_fwd_bwd (or its _triton twin, by `backend`) chunk by chunk.
  //   hidden   [N, D], weight [V, D], bias [V] or None, targets [N] int64, weights [N] as above
  //   chunk_size  rows per chunk (> 0); backend "cpu" | "triton" | "cuda"
  //   compute_grad  when false, the gradients come back empty ([0])
  // Returns loss [] fp32 (fp64) = sum(weights * ce), ce [N] as above (the gradient of loss in
  // weights), and d loss / d (hidden [N, D], weight [V, D], bias [V] or [0]).
  m.def("fused_linear_masked_diffusion_loss(Tensor hidden, Tensor weight, Tensor? bias, "
        "Tensor targets, Tensor weights, int chunk_size, str backend, bool compute_grad) -> "
        "(Tensor loss, Tensor ce, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");

  // Attention with a structured mask (bidirectional, key padding, block-causal, packed
  // documents, the 2L block-diffusion mask), described by O(L) int32 vectors:
  //   q                 [B, Hq, Lq, D]  fp32 (CPU only) / bf16 / fp16, unit stride along D
  //   k, v              [B, Hkv, Lk, D] same dtype, unit stride along D; Hq % Hkv == 0, and
  //                     query head h reads KV head h / (Hq / Hkv)
  //   q_mask            [B, 2, Lq] int32 contiguous (doc, level) per query, or None
  //   k_mask            [B, 3, Lk] int32 contiguous (doc, lo, hi) per key, or None
  //                     query i sees key j iff doc_q(i) == doc_k(j) and lo(j) <= level(i) <= hi(j);
  //                     both None: every key is seen. Built by llada_kernels/masks.py.
  //   scale             the softmax scale
  // Returns out [B, Hq, Lq, D] (q's dtype, contiguous) and lse [B, Hq, Lq] fp32, the natural
  // log-sum-exp of each row's scaled, visible scores. A row that sees no key has out = 0 and
  // lse = +inf, so that the backward's exp(s - lse) is 0 there.
#define ATTENTION_FWD_SCHEMA                                                                  \
  "(Tensor q, Tensor k, Tensor v, Tensor? q_mask, Tensor? k_mask, float scale) "              \
  "-> (Tensor out, Tensor lse)"
  m.def("attention_fwd" ATTENTION_FWD_SCHEMA);
  m.def("attention_fwd_triton" ATTENTION_FWD_SCHEMA);
#undef ATTENTION_FWD_SCHEMA

  // Its backward, recomputing the probabilities from lse (the forward's outputs).
  //   grad_out  [B, Hq, Lq, D], unit stride along D; out [B, Hq, Lq, D]; lse [B, Hq, Lq] fp32
  //   grad_lse  [B, Hq, Lq] fp32 contiguous, the gradient of lse (a row's lse is a function of
  //             its scores: d lse_i / d s_ij = p_ij), or None when lse was not used
  //   q, k, v, q_mask, k_mask, scale as in the forward
  // Returns dq [B, Hq, Lq, D] and dk, dv [B, Hkv, Lk, D] (summed over each group's query
  // heads), contiguous, in q's dtype. Tiles the mask removes are never computed.
#define ATTENTION_BWD_SCHEMA                                                                  \
  "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? q_mask, Tensor? k_mask, "          \
  "Tensor out, Tensor lse, float scale, Tensor? grad_lse=None) "                              \
  "-> (Tensor dq, Tensor dk, Tensor dv)"
  m.def("attention_bwd" ATTENTION_BWD_SCHEMA);
  m.def("attention_bwd_triton" ATTENTION_BWD_SCHEMA);
#undef ATTENTION_BWD_SCHEMA

  // The instruction set of the CPU kernels (csrc/isa.h). Every CPU kernel is compiled for
  // DEFAULT, AVX2 and AVX512 (x86-64; DEFAULT elsewhere), and the best that this CPU supports is
  // used, or a lower one named by the environment variable LLADA_CPU_CAPABILITY.
  //   cpu_capabilities()  the capabilities this CPU and this build support, lowest first
  //   cpu_capability(force)  the one in use; with force, switches every CPU kernel to it first
  //                       (a test hook: it must be one of cpu_capabilities())
  // No tensor arguments: the kernels are registered with the schemas (catch-all).
  m.def("cpu_capabilities() -> str[]", &llada::isa::capabilities_op);
  m.def("cpu_capability(str? force=None) -> str", &llada::isa::capability_op);

  // Test hook for the noise contract shared by every backend (csrc/common/random.h):
  // maps raw 64-bit Philox words [N] int64 to standard Gumbel noise [N] fp32.
  m.def("gumbel_from_bits(Tensor bits) -> Tensor");
}

#ifdef LLADA_BUILD_PYTHON_MODULE
// `import llada_kernels._C` loads this library, and with it the registrations above.
// The module itself is empty; it uses only the stable ABI (py_limited_api).
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
