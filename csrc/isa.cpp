// Which copy of the CPU kernels runs: the CPU's features, the build, LLADA_CPU_CAPABILITY.
// See isa.h. Compiled once, for the baseline instruction set.

#include "isa.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>

namespace llada::isa {
namespace {

// What the CPU (and its operating system: the AVX register state must be enabled) supports.
// The sets match ATen's: AVX2 = AVX2 + FMA (+ F16C, which every such CPU has), AVX512 = the
// F, BW, VL and DQ subsets.
bool cpu_has(Capability c) {
  if (c == DEFAULT) return true;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (c == AVX2) return avx2;
  return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool available(Capability c) { return (built_copies >> c & 1u) && cpu_has(c); }

Capability best() {
  for (int c = kNumCapabilities - 1; c > 0; --c)
    if (available(static_cast<Capability>(c))) return static_cast<Capability>(c);
  return DEFAULT;
}

Capability parse(const std::string& name, const char* what) {
  std::string upper(name);
  std::transform(upper.begin(), upper.end(), upper.begin(),
                 [](unsigned char ch) { return static_cast<char>(std::toupper(ch)); });
  for (int c = 0; c < kNumCapabilities; ++c)
    if (upper == kNames[c]) return static_cast<Capability>(c);
  TORCH_CHECK_VALUE(false, what, " must be one of DEFAULT, AVX2, AVX512; got '", name, "'");
  return DEFAULT;  // not reached
}

// The choice at the first call: the best available, or the lower one the variable names.
Capability initial() {
  Capability c = best();
  if (const char* env = std::getenv(kEnvVar); env != nullptr && *env != '\0') {
    const Capability asked = parse(env, kEnvVar);
    c = std::min(c, asked);  // a capability the CPU lacks is never used
  }
  return c;
}

std::atomic<int> chosen{-1};

}  // namespace

Capability current() {
  int c = chosen.load(std::memory_order_relaxed);
  if (c < 0) {
    int expected = -1;
    chosen.compare_exchange_strong(expected, initial());
    c = chosen.load();
  }
  return static_cast<Capability>(c);
}

std::vector<Capability> supported() {
  std::vector<Capability> out;
  for (int c = 0; c < kNumCapabilities; ++c)
    if (available(static_cast<Capability>(c))) out.push_back(static_cast<Capability>(c));
  return out;
}

void use(Capability c) {
  TORCH_CHECK_VALUE(available(c), "cpu_capability: ", kNames[c],
                    " is not supported by this CPU or this build");
  chosen.store(c);
}

bool cpu_has_bf16_dot() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

std::string capability_op(std::optional<std::string> force) {
  if (force) use(parse(*force, "cpu_capability: force"));
  return kNames[current()];
}

std::vector<std::string> capabilities_op() {
  std::vector<std::string> out;
  for (Capability c : supported()) out.emplace_back(kNames[c]);
  return out;
}

}  // namespace llada::isa
