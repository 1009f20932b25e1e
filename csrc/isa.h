#pragma once
// Runtime instruction-set dispatch of the CPU kernels, the way ATen's DispatchStub does it.
//
// Every file under csrc/cpu/ is compiled once per CPU capability into the one library (setup.py
// and CMakeLists.txt read the list from csrc/SOURCES):
//
//   DEFAULT  the portable build (x86-64 baseline: SSE2; any CPU torch runs on)
//   AVX2     -mavx2 -mfma -mf16c                           (x86-64 only)
//   AVX512   -mavx512f -mavx512bw -mavx512vl -mavx512dq, with the AVX2 flags   (x86-64 only)
//
// each copy with -DCPU_CAPABILITY=<name> -DCPU_CAPABILITY_<name>, as ATen's own kernels: ATen's
// Vectorized<T> lives in at::vec::<name>, and our kernels live in a namespace of the same name,
// so the copies never collide. The DEFAULT copy's objects are linked first: an inline function
// that several copies emit (a std::vector method, say) resolves to the DEFAULT copy, so no
// instruction past the baseline runs on the DEFAULT path (tests/test_cpu_isa.py checks the
// linked library for it).
//
// At load time each copy writes its kernels into a Stub (one per kernel, shared by the copies);
// the op registered with the dispatcher (once, by the DEFAULT copy) calls the kernel of the
// capability in use: the best one the CPU supports, or a lower one named by the environment
// variable LLADA_CPU_CAPABILITY (read at the first call). Python reports it as
// llada_kernels.cpu_capability().
//
// A kernel file uses it like this:
//
//   namespace llada::foo {
//   namespace CPU_CAPABILITY {
//   at::Tensor foo_cpu(const at::Tensor& x) { ... }      // the kernels, in the copy's namespace
//   }
//   LLADA_ISA_KERNEL(foo_stub, CPU_CAPABILITY::foo_cpu);  // this copy fills its slot
//   #ifdef CPU_CAPABILITY_DEFAULT                          // registered once
//   TORCH_LIBRARY_IMPL(llada, CPU, m) { m.impl("foo", LLADA_ISA_DISPATCH(foo_stub)); }
//   #endif
//   }

#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace llada::isa {

enum Capability : int { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };
constexpr int kNumCapabilities = 3;
constexpr const char* kNames[kNumCapabilities] = {"DEFAULT", "AVX2", "AVX512"};
constexpr const char* kEnvVar = "LLADA_CPU_CAPABILITY";

// The capability the kernels use. Chosen at the first call: the best that both this CPU and
// this build support, lowered to $LLADA_CPU_CAPABILITY when that names a lower one (a name that
// is not a capability is an error).
Capability current();
// The capabilities this CPU and this build both support, lowest first.
std::vector<Capability> supported();
// Switches every kernel to `c` (a test hook; c must be supported).
void use(Capability c);
// Whether the CPU has bf16 dot products (AVX512-BF16; every AMX CPU has them too).
bool cpu_has_bf16_dot();

// The ops behind llada_kernels.cpu_capability() and cpu_capabilities() (schemas: csrc/ops.cpp).
std::string capability_op(std::optional<std::string> force);
std::vector<std::string> capabilities_op();

// Which copy this translation unit is.
#if defined(CPU_CAPABILITY_AVX512)
inline constexpr Capability kThisCopy = AVX512;
#elif defined(CPU_CAPABILITY_AVX2)
inline constexpr Capability kThisCopy = AVX2;
#else
inline constexpr Capability kThisCopy = DEFAULT;
#endif

// The copies built into this library, one bit per capability (filled at load time).
inline unsigned built_copies = 0;

// One kernel's copies, indexed by capability: zero-initialised before any load-time code runs,
// then filled by each copy's static initialiser.
template <typename Fn>
struct Stub {
  using Function = Fn;
  Fn fns[kNumCapabilities];
};

template <typename Fn>
bool add_copy(Stub<Fn>& stub, Fn fn) {
  stub.fns[kThisCopy] = fn;
  built_copies |= 1u << kThisCopy;
  return true;
}

// The function registered with the dispatcher: forwards to the copy in use.
template <auto& S, typename Fn>
struct Dispatch;
template <auto& S, typename R, typename... Args>
struct Dispatch<S, R (*)(Args...)> {
  static R call(Args... args) { return S.fns[current()](std::forward<Args>(args)...); }
};

}  // namespace llada::isa

// At namespace scope, outside the copy's namespace: declares the stub (one object shared by the
// copies) and fills this copy's slot.
#define LLADA_ISA_KERNEL(stub, fn)                                                          \
  inline ::llada::isa::Stub<decltype(&fn)> stub{};                                          \
  [[maybe_unused]] static const bool stub##_added_ = ::llada::isa::add_copy(stub, &fn)

// The kernel to register for an op (in the DEFAULT copy only).
#define LLADA_ISA_DISPATCH(stub) \
  (&::llada::isa::Dispatch<stub, std::remove_cv_t<decltype(stub)>::Function>::call)
