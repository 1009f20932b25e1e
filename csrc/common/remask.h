#pragma once
// What every remask_step kernel agrees on, besides the random numbers (common/random.h).
//
// Per position (b, l), a kernel reads the logits row once and produces
//   x0[b, l]   the chosen id, and
//   key[b, l]  an int64 selection key: -1 for a non-candidate (x != mask_id, or
//              l >= block_end[b]), otherwise
//                  key = (ordered(confidence) << 31) | (2^31 - 1 - l),
//              where ordered() maps fp32 to uint32 monotonically. Keys are unique within a
//              row, so "the k largest keys" is a set with no ties: equal confidences are
//              broken by position, lower l first. Every backend therefore commits the same
//              set, whatever its selection algorithm (nth_element, bisection, sort).
// Per row b, with k = num_transfer[b] and c = the number of candidates:
//   bound = -1                   if k >= c       (commit every candidate, never more)
//         = INT64_MAX            if k == 0
//         = the k-th largest key otherwise
//   with a threshold t: bound = min(bound, ordered(fp32(t)) << 31), i.e. every candidate
//   with confidence >= t is committed as well.
//   transfer[b, l] = key >= 0 && key >= bound;  x_new = transfer ? x0 : x.
// Token editing (edit_threshold): an editable position holding a committed token (x !=
// mask_id) is scored like a candidate (x0, confidence, noise keyed by its r) and gets
//   key = kEdited  if x0 != x and confidence > fp32(edit_threshold)   (strictly)
//       = kNoCandidate otherwise;
// it takes no part in the bound, and transfer = key >= 0 && key >= bound || key == kEdited.
// A confidence of -0 is keyed as +0 (ordered() would put it below a threshold of 0, where the
// reference's >= commits it), and a NaN confidence scores 0.
//
// Non-finite logits (README, "Non-finite and extreme inputs"), with l the fp32 logits after
// guidance and suppress_ids (-inf), and z = l with zero_confidence_ids at -inf as well:
//   x0          the first id whose l is NaN, else the first +inf, at every temperature (noise
//               cannot move them: a finite l's noisy value is clamped to FLT_MAX); else the
//               (noisy) argmax of the finite l, ties to the lowest id; a row whose l are all
//               -inf takes the lowest id that is not suppressed. -inf is never chosen over
//               a finite logit.
//   confidence  the softmax formulas of z, in fp32. They are NaN when z holds a NaN or +inf, or
//               no finite value; a NaN confidence scores 0 (ranked with 0: below every
//               positive confidence, ties by position).
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <cstring>

#include "common/macros.h"

namespace llada {

enum class Remasking : int { LowConfidence = 0, Random = 1, Margin = 2, Entropy = 3 };

LLADA_HD uint32_t ordered_bits(float f) {
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(f);
#else
  std::memcpy(&u, &f, sizeof(u));
#endif
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

LLADA_HD int64_t selection_key(float confidence, int64_t l) {
  return (static_cast<int64_t>(ordered_bits(confidence)) << 31) | (0x7FFFFFFF - l);
}

LLADA_HD int64_t threshold_key(float threshold) {
  return static_cast<int64_t>(ordered_bits(threshold)) << 31;
}

// The schema's `remasking` argument, parsed on the host once per call.
inline Remasking parse_remasking(c10::string_view name) {
  if (name == "low_confidence") return Remasking::LowConfidence;
  if (name == "random") return Remasking::Random;
  if (name == "margin") return Remasking::Margin;
  TORCH_CHECK(name == "entropy", "remask_step: unknown remasking '", name, "'");
  return Remasking::Entropy;
}

constexpr int64_t kNoCandidate = -1;
constexpr int64_t kEdited = -2;
constexpr int64_t kCommitNone = INT64_MAX;

}  // namespace llada
