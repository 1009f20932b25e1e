// The threads half of the host CUDA emulation's runtime (the other is memory.cpp; runtime.h
// holds what they share): each thread of a block is a fiber with a stack of its own, and the
// scheduler runs a block's fibers on one OS thread, in the order the schedule asks, switching at
// barriers, warp collectives and (preemption) memory accesses. Barriers wait for every live
// thread; warp collectives for every live lane of their mask, and compute their results (PTX
// semantics) when the last one arrives. Errors (divergence, deadlock, a trap, a hazard found by
// memory.cpp) abandon the block and throw from the launch. Compiled without instrumentation.
#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/library.h>

#include "runtime.h"

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace llada_emu {
namespace rt {

Hot g;
Schedule g_sched;
Plant g_plant;
Stats g_stats{};
Launch g_launch{};
Block g_block;
std::vector<Fiber> g_fibers(kMaxThreads);
uint32_t g_warp_synced[kMaxThreads / kWarp];

namespace {

// ---- context switch ----------------------------------------------------------------------------
// make_context(f, top) prepares fiber f to start fiber_main on the stack that ends at `top`;
// enter(f) runs it until it calls leave(f). On x86-64 a dozen instructions of our own switch
// stacks (callee-saved registers and the FP control words); elsewhere, or with
// -DLLADA_EMU_UCONTEXT, POSIX ucontext does (slower: it saves the signal mask with a system call).
[[noreturn]] void fiber_main();

#if defined(__x86_64__) && !defined(LLADA_EMU_UCONTEXT)
// llada_emu_switch_stack(save, load): pushes the callee-saved registers and the FP control
// words, stores the stack pointer in *save, and resumes the context saved at `load`.
extern "C" void llada_emu_switch_stack(void** save, void* load);
asm(R"(
  .pushsection .text
  .p2align 4
  .globl llada_emu_switch_stack
  .hidden llada_emu_switch_stack
  .type llada_emu_switch_stack,@function
llada_emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size llada_emu_switch_stack,.-llada_emu_switch_stack
  .popsection
)");

void* g_sched_sp = nullptr;  // the scheduler's context, while a thread runs

void make_context(Fiber& f, uintptr_t* top) {
  // The frame llada_emu_switch_stack pops: FP control words, r15..r12, rbx, rbp, and the return
  // address (fiber_main, entered with rsp = 8 mod 16 as after a call).
  uintptr_t* sp = top - 9;
  uint32_t fp_words[2];
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(fp_words[0]), "=m"(fp_words[1]));
  std::memcpy(sp, fp_words, 8);
  for (int i = 1; i <= 6; ++i) sp[i] = 0;
  sp[7] = reinterpret_cast<uintptr_t>(&fiber_main);
  f.sp = sp;
}

void enter(Fiber& f) { llada_emu_switch_stack(&g_sched_sp, f.sp); }
void leave(Fiber& f) { llada_emu_switch_stack(&f.sp, g_sched_sp); }
#else
std::vector<ucontext_t> g_contexts(kMaxThreads);
ucontext_t g_sched_context;

void make_context(Fiber& f, uintptr_t* top) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  ucontext_t& c = g_contexts[f.linear];
  getcontext(&c);
  c.uc_stack.ss_sp = reinterpret_cast<char*>(top) - (kStackBytes - page);
  c.uc_stack.ss_size = kStackBytes - page;
  c.uc_link = nullptr;
  makecontext(&c, reinterpret_cast<void (*)()>(&fiber_main), 0);
}

void enter(Fiber& f) { swapcontext(&g_sched_context, &g_contexts[f.linear]); }
void leave(Fiber& f) { swapcontext(&g_contexts[f.linear], &g_sched_context); }
#endif

std::string g_error;         // set by fail() in a thread; the scheduler throws it
cudaError_t g_last_error = cudaSuccess;
std::vector<std::pair<const void*, int>> g_func_smem;  // cudaFuncSetAttribute values
// Per warp: the lanes waiting at a warp collective, and the lanes that exited (or that a block
// of fewer threads does not have).
uint32_t g_waiting[kMaxThreads / kWarp], g_gone[kMaxThreads / kWarp];

bool try_complete(int base, Fiber& me);

uint64_t next_random() {  // xorshift64*
  g.rng ^= g.rng >> 12;
  g.rng ^= g.rng << 25;
  g.rng ^= g.rng >> 27;
  return g.rng * 0x2545F4914F6CDD1DULL;
}

uintptr_t library_base() {
  static uintptr_t base = [] {
    Dl_info info{};
    dladdr(reinterpret_cast<void*>(&library_base), &info);
    return reinterpret_cast<uintptr_t>(info.dli_fbase);
  }();
  return base;
}

std::string where() {
  if (g_launch.cfg == nullptr) return "no launch";
  const LaunchConfig& c = *g_launch.cfg;
  return format("kernel %s ({fn:0x%lx}) launched at %s:%d, block (%u,%u,%u)", c.kernel,
                static_cast<unsigned long>(reinterpret_cast<uintptr_t>(g_launch.kernel_id) - library_base()),
                c.file, c.line, blockIdx.x, blockIdx.y, blockIdx.z);
}

}  // namespace

size_t Block::used() const { return g_launch.dyn_bytes + static_bytes; }

// ---- messages and errors ---------------------------------------------------------------------

std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

// "{pc:0x...}": a return address in this library, which tests/cuda_emu.py turns into the
// file:line of the call before it ("{fn:0x...}": a function, which it turns into its name).
std::string pc_text(const void* pc) {
  return format("{pc:0x%lx}", static_cast<unsigned long>(reinterpret_cast<uintptr_t>(pc) - library_base()));
}

std::string thread_text(int linear) {
  if (linear == kAtomicWriter) return "atomics";
  const Fiber& f = g_fibers[linear];
  return format("thread %d (threadIdx (%u,%u,%u), warp %d lane %d)", linear, f.tid.x, f.tid.y,
                f.tid.z, linear / kWarp, linear % kWarp);
}

// An error in the kernel: inside a thread, abandon it and let the scheduler throw.
[[noreturn]] void fail(const std::string& what) {
  g_error = "llada_emu: " + what + "\n  in " + where();
  if (g.cur != nullptr) {
    g.cur->state = State::kExited;
    switch_to_scheduler();
  }
  throw std::runtime_error(g_error);
}

// ---- fibers ------------------------------------------------------------------------------------

void switch_to_scheduler() { leave(*g.cur); }

void maybe_preempt() {
  if (g_sched.preempt == 0 || g.cur == nullptr) return;
  if ((next_random() >> 48) < g_sched.preempt) {
    ++g_stats.preemptions;
    switch_to_scheduler();  // stays ready: the scheduler resumes it in a later pass
  }
}

namespace {

void init_stacks() {
  if (g.stacks) return;
  g.stacks_bytes = kStackBytes * kMaxThreads;
  void* p = mmap(nullptr, g.stacks_bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("llada_emu: cannot map the thread stacks");
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  for (int i = 0; i < kMaxThreads; ++i)  // a stack overflow faults instead of corrupting
    mprotect(static_cast<char*>(p) + i * kStackBytes, page, PROT_NONE);
  g.stacks = reinterpret_cast<uintptr_t>(p);
  init_arena();
}

void init_fiber(Fiber& f, int linear) {
  const dim3 bd = blockDim;
  f.linear = linear;
  f.tid = uint3{linear % bd.x, (linear / bd.x) % bd.y, linear / (bd.x * bd.y)};
  f.state = State::kReady;
  make_context(f, reinterpret_cast<uintptr_t*>(g.stacks + (linear + 1) * kStackBytes));
}

void resume(Fiber& f) {
  g.cur = &f;
  threadIdx = f.tid;
  enter(f);
  g.cur = nullptr;
}

[[noreturn]] void fiber_main() {
  Fiber& f = *g.cur;
  g_launch.entry(g_launch.ctx);
  f.state = State::kExited;
  // Exited lanes no longer take part in warp collectives: some may now be complete.
  const int w = f.linear / kWarp, base = w * kWarp;
  g_gone[w] |= 1u << (f.linear % kWarp);
  for (unsigned m = g_waiting[w]; m; m &= m - 1) {
    if ((g_waiting[w] >> __builtin_ctz(m)) & 1) try_complete(base, g_fibers[base + __builtin_ctz(m)]);
  }
  switch_to_scheduler();
  __builtin_unreachable();
}

// ---- barriers and warp collectives -----------------------------------------------------------

const char* const kBarrierNames[] = {"__syncthreads", "__syncthreads_count", "__syncthreads_and",
                                     "__syncthreads_or"};

void complete_barrier() {
  const Fiber* first = nullptr;
  int count = 0, live = 0;
  for (int i = 0; i < g_block.nthreads; ++i) {
    Fiber& f = g_fibers[i];
    if (f.state == State::kExited) continue;
    ++live;
    if (f.state != State::kBarrier) {
      // Somebody waits at a warp collective that cannot complete.
      std::string msg = format("deadlock: %s waits at %s (mask 0x%08x) for a lane that is "
                               "elsewhere;", thread_text(i).c_str(), kWarpOpNames[int(f.op)], f.mask);
      const int base = i - i % kWarp;
      for (int l = 0; l < kWarp && base + l < g_block.nthreads; ++l) {
        const Fiber& o = g_fibers[base + l];
        if (!((f.mask >> l) & 1) || o.state == State::kWarp) continue;
        msg += format(" lane %d is %s", l, o.state == State::kBarrier
                          ? format("at %s (%s:%d)", kBarrierNames[o.bar_kind], o.bar_file, o.bar_line).c_str()
                          : "exited");
        break;
      }
      fail(msg);
    }
    if (first == nullptr) first = &f;
    if (f.bar_kind != first->bar_kind || f.bar_line != first->bar_line ||
        std::strcmp(f.bar_file, first->bar_file) != 0) {
      fail(format("divergent barriers: %s waits at %s (%s:%d) while %s waits at %s (%s:%d)",
                  thread_text(first->linear).c_str(), kBarrierNames[first->bar_kind],
                  first->bar_file, first->bar_line, thread_text(i).c_str(),
                  kBarrierNames[f.bar_kind], f.bar_file, f.bar_line));
    }
    count += f.bar_pred;
  }
  const int kind = first->bar_kind;
  const int result = kind == 1 ? count : kind == 2 ? (count == live) : kind == 3 ? (count > 0) : 0;
  for (int i = 0; i < g_block.nthreads; ++i) {
    Fiber& f = g_fibers[i];
    if (f.state != State::kBarrier) continue;
    f.bar_result = result;
    f.state = State::kReady;
  }
  ++g.epoch;
  ++g_stats.barriers;
}

void compute_mma(int base) {
  // The fragments of the PTX ISA for mma.m16n8k16 with .f16/.bf16 A and B and .f32 C/D
  // (groupID = lane >> 2, threadID_in_group = lane % 4; element i of a register pair is its
  // low (i even) or high half):
  //   A a0..a7: row = groupID for i < 2 or 4 <= i < 6, else groupID + 8;
  //             col = 2 threadID_in_group + (i & 1), + 8 for i >= 4
  //   B b0..b3: row = 2 threadID_in_group + (i & 1), + 8 for i >= 2;  col = groupID
  //   C c0..c3: row = groupID for i < 2, else groupID + 8;  col = 2 threadID_in_group + (i & 1)
  static const std::vector<float> fp16_table = [] {  // every binary16 value, exactly
    std::vector<float> t(65536);
    for (uint32_t h = 0; h < 65536; ++h) t[h] = static_cast<float>(decode(static_cast<uint16_t>(h), 10, -14));
    return t;
  }();
  double A[16][16], B[16][8], C[16][8];
  const bool fp16 = g_fibers[base].mma_fp16;
  auto half_value = [fp16](uint32_t reg, int i) {
    const uint16_t h = static_cast<uint16_t>(reg >> (16 * (i & 1)));
    return double(fp16 ? fp16_table[h] : std::bit_cast<float>(uint32_t(h) << 16));
  };
  for (int lane = 0; lane < kWarp; ++lane) {
    const Fiber& f = g_fibers[base + lane];
    if (f.mma_fp16 != fp16) fail("mma.sync: lanes disagree on the input type");
    const int group = lane >> 2, tig = lane & 3;
    for (int i = 0; i < 8; ++i) {
      int reg = i / 2;
      if (g_plant.mma_swap_a12 && (reg == 1 || reg == 2)) reg = 3 - reg;
      const int row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
      const int col = 2 * tig + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = half_value(f.mma_a[reg], i);
    }
    for (int i = 0; i < 4; ++i) {
      const int row = 2 * tig + (i & 1) + (i >= 2 ? 8 : 0);
      B[row][group] = half_value(f.mma_b[i / 2], i);
    }
    for (int i = 0; i < 4; ++i) C[i < 2 ? group : group + 8][2 * tig + (i & 1)] = f.mma_c[i];
  }
  for (int lane = 0; lane < kWarp; ++lane) {
    Fiber& f = g_fibers[base + lane];
    const int group = lane >> 2, tig = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = i < 2 ? group : group + 8, col = 2 * tig + (i & 1);
      double acc = C[row][col];
      for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];  // exact products
      f.mma_c[i] = static_cast<float>(acc);
    }
  }
  ++g_stats.mmas;
}

void compute(int base, unsigned mask, WarpOp op) {
  unsigned live = 0;  // the lanes of mask that take part (exited lanes do not)
  for (int l = 0; l < kWarp; ++l)
    if (((mask >> l) & 1) && base + l < g_block.nthreads && g_fibers[base + l].state == State::kWarp)
      live |= 1u << l;
  auto lanes = [&](auto&& f) {
    for (int l = 0; l < kWarp; ++l)
      if ((live >> l) & 1) f(l, g_fibers[base + l]);
  };
  switch (op) {
    case WarpOp::kShfl:
      lanes([&](int i, Fiber& f) {  // PTX shfl.sync, with c = ((32 - width) << 8) | clamp
        const int width = f.width;
        if (width <= 0 || width > kWarp || (width & (width - 1)))
          fail(format("__shfl*_sync: width %d is not a power of two in [1, 32]", width));
        const auto mode = static_cast<ShflMode>(f.sub);
        const int seg = (kWarp - width) & 31, clamp = mode == ShflMode::kUp ? 0 : 31;
        const int max_lane = (i & seg) | (clamp & ~seg), min_lane = i & seg, b = f.b & 31;
        int j = i;
        bool ok;
        switch (mode) {
          case ShflMode::kUp: j = i - b; ok = j >= max_lane; break;
          case ShflMode::kDown: j = i + b; ok = j <= max_lane; break;
          case ShflMode::kXor: j = i ^ b; ok = j <= max_lane; break;
          default: j = min_lane | (b & ~seg); ok = j <= max_lane; break;
        }
        if (!ok) j = i;
        if (!((live >> j) & 1))
          fail(format("__shfl*_sync: %s reads lane %d, which does not take part (mask 0x%08x)",
                      thread_text(base + i).c_str(), j, mask));
        f.out = g_fibers[base + j].in;
      });
      break;
    case WarpOp::kVote: {
      unsigned ballot = 0;
      lanes([&](int i, Fiber& f) { ballot |= (f.in != 0 ? 1u : 0u) << i; });
      lanes([&](int, Fiber& f) {
        switch (static_cast<Vote>(f.sub)) {
          case Vote::kBallot: f.out = ballot; break;
          case Vote::kAny: f.out = ballot != 0; break;
          case Vote::kAll: f.out = ballot == live; break;
          case Vote::kUni: f.out = ballot == 0 || ballot == live; break;
        }
      });
      break;
    }
    case WarpOp::kMatchAny:
      lanes([&](int, Fiber& f) {
        unsigned m = 0;
        lanes([&](int j, Fiber& o) { m |= (o.in == f.in ? 1u : 0u) << j; });
        f.out = m;
      });
      break;
    case WarpOp::kMatchAll: {
      bool same = true;
      const uint64_t v0 = g_fibers[base + __builtin_ctz(live)].in;
      lanes([&](int, Fiber& f) { same &= f.in == v0; });
      lanes([&](int, Fiber& f) { f.out = same ? live : 0, f.out_pred = same; });
      break;
    }
    case WarpOp::kReduce: {
      const auto kind = static_cast<Reduce>(g_fibers[base + __builtin_ctz(live)].sub);
      uint32_t acc = 0;
      bool first = true;
      lanes([&](int, Fiber& f) {
        const uint32_t v = static_cast<uint32_t>(f.in);
        if (first) { acc = v; first = false; return; }
        switch (kind) {
          case Reduce::kAdd: acc += v; break;
          case Reduce::kMinS: acc = std::min<int32_t>(int32_t(acc), int32_t(v)); break;
          case Reduce::kMaxS: acc = std::max<int32_t>(int32_t(acc), int32_t(v)); break;
          case Reduce::kMinU: acc = std::min(acc, v); break;
          case Reduce::kMaxU: acc = std::max(acc, v); break;
          case Reduce::kAnd: acc &= v; break;
          case Reduce::kOr: acc |= v; break;
          case Reduce::kXor: acc ^= v; break;
        }
      });
      lanes([&](int, Fiber& f) { f.out = acc; });
      break;
    }
    case WarpOp::kSync:
      if (mask == 0xffffffffu) g_warp_synced[base / kWarp] = ++g.wsync;
      break;
    case WarpOp::kMma:
      compute_mma(base);
      break;
  }
  lanes([&](int, Fiber& f) { f.state = State::kReady; });
  ++g_stats.warp_ops;
}

// Completes the collective `me` waits at when every live lane of its mask has arrived.
// Completes the collective `me` waits at once every live lane of its mask has arrived.
bool try_complete(int base, Fiber& me) {
  const int w = base / kWarp;
  const unsigned mask = me.mask;
  if (mask & ~(g_waiting[w] | g_gone[w])) return false;  // a lane of the mask is elsewhere
  const unsigned live = mask & g_waiting[w];
  if (me.op == WarpOp::kMma && live != 0xffffffffu)
    fail("mma.sync needs all 32 lanes of the warp; some have exited or do not exist");
  for (unsigned m = live; m; m &= m - 1) {
    const Fiber& o = g_fibers[base + __builtin_ctz(m)];
    if (o.op != me.op || o.mask != mask) {
      fail(format("divergent warp collective: %s is at %s with mask 0x%08x, %s at %s with mask 0x%08x",
                  thread_text(me.linear).c_str(), kWarpOpNames[int(me.op)], mask,
                  thread_text(o.linear).c_str(), kWarpOpNames[int(o.op)], o.mask));
    }
  }
  compute(base, mask, me.op);
  g_waiting[w] &= ~live;
  return true;
}

Fiber& arrive(WarpOp op, unsigned mask) {
  if (g.cur == nullptr) throw std::runtime_error("llada_emu: a warp collective outside a kernel");
  Fiber& f = *g.cur;
  const int lane = f.linear % kWarp;
  if (!((mask >> lane) & 1))
    fail(format("%s: %s calls it with mask 0x%08x, which does not name the lane itself",
                kWarpOpNames[int(op)], thread_text(f.linear).c_str(), mask));
  f.op = op;
  f.mask = mask;
  f.state = State::kWarp;
  g_waiting[f.linear / kWarp] |= 1u << lane;
  if (!try_complete(f.linear - lane, f)) switch_to_scheduler();
  return f;
}

// ---- launches ---------------------------------------------------------------------------------

bool valid(const LaunchConfig& c) {
  const uint64_t threads = uint64_t(c.block.x) * c.block.y * c.block.z;
  return threads >= 1 && threads <= kMaxThreads && c.block.x <= 1024 && c.block.y <= 1024 &&
         c.block.z <= 64 && c.grid.x >= 1 && c.grid.x <= 0x7fffffffu && c.grid.y >= 1 &&
         c.grid.y <= 65535 && c.grid.z >= 1 && c.grid.z <= 65535;
}

void run_block(uint32_t id, std::vector<int>& order) {
  blockIdx = uint3{id % gridDim.x, (id / gridDim.x) % gridDim.y, id / (gridDim.x * gridDim.y)};
  g_block.id = id;
  const int n = g_block.nthreads;
  ++g.epoch;
  g_block.start_epoch = g.epoch;
  start_block_memory();
  for (int i = 0; i < n; ++i) init_fiber(g_fibers[i], i);
  for (int w = 0; w < kMaxThreads / kWarp; ++w) {
    g_warp_synced[w] = 0;
    g_waiting[w] = 0;
    const int lanes = std::clamp(n - w * kWarp, 0, kWarp);
    g_gone[w] = lanes == kWarp ? 0u : ~((1u << lanes) - 1);
  }
  int live = n;
  for (;;) {
    if (g_sched.order == Schedule::kRandom) {
      for (int i = n - 1; i > 0; --i) std::swap(order[i], order[next_random() % (i + 1)]);
    }
    bool ran = false;
    for (int i : order) {
      Fiber& f = g_fibers[i];
      if (f.state != State::kReady) continue;
      resume(f);
      ran = true;
      if (!g_error.empty()) throw std::runtime_error(g_error);
      if (f.state == State::kExited) --live;
    }
    if (ran) continue;
    if (live == 0) break;
    complete_barrier();  // everyone left waits: at one barrier, or a deadlock
  }

  check_shared_limits();
}

}  // namespace
}  // namespace rt

using namespace rt;

// ---- the interface of cuda_emu.h -----------------------------------------------------------------

int syncthreads(int kind, int pred, const char* file, int line) {
  if (g.cur == nullptr) throw std::runtime_error("llada_emu: __syncthreads outside a kernel");
  if (kind == 0 && g_plant.drop_line == line && !g_plant.drop_file.empty()) {
    const size_t n = std::strlen(file), m = g_plant.drop_file.size();
    if (n >= m && std::strcmp(file + n - m, g_plant.drop_file.c_str()) == 0) return 0;
  }
  Fiber& f = *g.cur;
  f.bar_kind = kind;
  f.bar_pred = pred;
  f.bar_file = file;
  f.bar_line = line;
  f.state = State::kBarrier;
  switch_to_scheduler();
  return f.bar_result;
}

void syncwarp(unsigned mask, const char*, int) { arrive(WarpOp::kSync, mask); }

uint64_t shfl(ShflMode mode, unsigned mask, uint64_t value, int b, int width) {
  Fiber& f = *g.cur;
  f.sub = static_cast<int>(mode);
  f.in = value;
  f.b = b;
  f.width = width;
  return arrive(WarpOp::kShfl, mask).out;
}

unsigned vote(Vote op, unsigned mask, int pred) {
  g.cur->sub = static_cast<int>(op);
  g.cur->in = pred != 0;
  return static_cast<unsigned>(arrive(WarpOp::kVote, mask).out);
}

unsigned match_any(unsigned mask, uint64_t value) {
  g.cur->in = value;
  return static_cast<unsigned>(arrive(WarpOp::kMatchAny, mask).out);
}

unsigned match_all(unsigned mask, uint64_t value, int* pred) {
  g.cur->in = value;
  Fiber& f = arrive(WarpOp::kMatchAll, mask);
  *pred = f.out_pred;
  return static_cast<unsigned>(f.out);
}

unsigned reduce(Reduce op, unsigned mask, unsigned value) {
  g.cur->sub = static_cast<int>(op);
  g.cur->in = value;
  return static_cast<unsigned>(arrive(WarpOp::kReduce, mask).out);
}

unsigned activemask() {
  const int base = g.cur->linear - g.cur->linear % kWarp;
  unsigned m = 0;
  for (int l = 0; l < kWarp && base + l < g_block.nthreads; ++l)
    if (g_fibers[base + l].state != State::kExited) m |= 1u << l;
  return m;
}

void mma_m16n8k16(float c[4], const uint32_t a[4], const uint32_t b[2], bool fp16) {
  Fiber& f = *g.cur;
  std::memcpy(f.mma_a, a, sizeof f.mma_a);
  std::memcpy(f.mma_b, b, sizeof f.mma_b);
  std::memcpy(f.mma_c, c, sizeof f.mma_c);
  f.mma_fp16 = fp16;
  arrive(WarpOp::kMma, 0xffffffffu);
  std::memcpy(c, f.mma_c, sizeof f.mma_c);
}

void trap(const char* what) { fail(what); }

void set_func_max_dynamic_smem(const void* kernel_id, int bytes) {
  for (auto& [k, v] : g_func_smem)
    if (k == kernel_id) { v = bytes; return; }
  g_func_smem.emplace_back(kernel_id, bytes);
}

cudaError_t take_last_error() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}

cudaError_t peek_last_error() { return g_last_error; }

// One launch at a time in the process: the threads' stacks, the arena and the checkers' state
// are global, and the memory-access hooks see every instrumented access of the process while a
// launch runs (only the launching OS thread runs instrumented code meanwhile: kernels, and the
// host code of the .cu files, which calls no parallel ATen functions).
void run_kernel(const LaunchConfig& cfg, const void* kernel_id, void (*entry)(void*), void* ctx) {
  if (g.cur != nullptr) throw std::runtime_error("llada_emu: a kernel launch inside a kernel");
  static std::mutex one_launch;
  const std::lock_guard<std::mutex> lock(one_launch);
  size_t max_dyn = kSharedDefaultMax;
  for (const auto& [k, v] : g_func_smem)
    if (k == kernel_id) max_dyn = static_cast<size_t>(v);
  if (!valid(cfg)) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (cfg.smem > max_dyn) {
    g_last_error = cudaErrorInvalidValue;
    return;
  }
  init_stacks();
  g_launch = Launch{&cfg, kernel_id, entry, ctx, cfg.smem, max_dyn};
  gridDim = cfg.grid;
  blockDim = cfg.block;
  g_block.nthreads = static_cast<int>(cfg.block.x * cfg.block.y * cfg.block.z);
  g.rng = g_sched.seed * 0x9E3779B97F4A7C15ULL + 0x632BE59BD9B4E019ULL + g_stats.launches;
  ++g_stats.launches;
  std::vector<int> order(g_block.nthreads);
  for (int i = 0; i < g_block.nthreads; ++i)
    order[i] = g_sched.order == Schedule::kReverse ? g_block.nthreads - 1 - i : i;
  const uint64_t nblocks = uint64_t(cfg.grid.x) * cfg.grid.y * cfg.grid.z;
  if (nblocks > (uint64_t{1} << 24)) throw std::runtime_error("llada_emu: grid too large to emulate");
  std::vector<uint32_t> blocks(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i)
    blocks[i] = static_cast<uint32_t>(g_sched.order == Schedule::kReverse ? nblocks - 1 - i : i);
  if (g_sched.order == Schedule::kRandom)
    for (uint64_t i = nblocks - 1; i > 0; --i) std::swap(blocks[i], blocks[next_random() % (i + 1)]);
  start_launch_memory();
  g.in_kernel = true;
  g_error.clear();
  try {
    for (const uint32_t id : blocks) {
      run_block(id, order);
      ++g_stats.blocks;
      g_stats.threads += g_block.nthreads;
    }
  } catch (...) {
    g.in_kernel = false;
    g.cur = nullptr;
    g_error.clear();
    throw;
  }
  g.in_kernel = false;
}

// ---- control, for the tests (tests/cuda_emu.py) ----------------------------------------------------

namespace {

void set_schedule(c10::string_view order, int64_t seed, double preempt, bool hazards) {
  if (order == "forward") g_sched.order = Schedule::kForward;
  else if (order == "reverse") g_sched.order = Schedule::kReverse;
  else if (order == "random") g_sched.order = Schedule::kRandom;
  else TORCH_CHECK(false, "llada_emu::_set_schedule: order must be forward, reverse or random; got ", order);
  TORCH_CHECK(preempt >= 0 && preempt <= 1, "llada_emu::_set_schedule: preempt must be in [0, 1]");
  g_sched.seed = static_cast<uint64_t>(seed);
  g_sched.preempt = static_cast<uint32_t>(preempt * 65536);
  g_sched.hazards = hazards;
}

void plant(c10::string_view what, c10::string_view file, int64_t line) {
  g_plant = Plant{};
  if (what == "none") return;
  if (what == "drop_barrier") {
    g_plant.drop_file = std::string(file);
    g_plant.drop_line = static_cast<int>(line);
  } else if (what == "mma_swap_a12") {
    g_plant.mma_swap_a12 = true;
  } else {
    TORCH_CHECK(false, "llada_emu::_plant: unknown bug '", what, "'");
  }
}

std::vector<int64_t> stats() {
  return {g_stats.launches, g_stats.blocks, g_stats.threads, g_stats.barriers,
          g_stats.warp_ops, g_stats.mmas, g_stats.shared_accesses, g_stats.preemptions};
}

}  // namespace
}  // namespace llada_emu

TORCH_LIBRARY_FRAGMENT(llada_emu, m) {
  // How the emulated kernels run: the thread order ("forward", "reverse" or "random", seeded),
  // the probability of a thread switch before each memory access, and hazard checking.
  m.def("_set_schedule(str order, int seed, float preempt, bool hazards) -> ()",
        &llada_emu::set_schedule);
  // A bug planted at run time: "none", "drop_barrier" (the __syncthreads() at file:line, file
  // matched as a suffix, does nothing) or "mma_swap_a12" (mma reads A's registers 1 and 2
  // swapped).
  m.def("_plant(str what, str file, int line) -> ()", &llada_emu::plant);
  // Counters since the library was loaded: launches, blocks, threads, barriers, warp
  // collectives, mma.sync, shared-memory accesses, preemptions.
  m.def("_stats() -> int[]", &llada_emu::stats);
}

