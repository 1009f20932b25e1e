// The memory half of the host CUDA emulation's runtime (see threads.cpp): the per-block
// shared-memory arena (dynamic part first, then each static __shared__ variable after a red
// zone; everything filled with 0xff at block start), its bounds, and the race checkers, fed by
// the memory-access hooks that g++ -fsanitize=thread inserts into the kernel code (the
// ThreadSanitizer runtime is not linked: these hooks replace it). Compiled without
// instrumentation.
//
// The rule, per byte: accesses by two different threads conflict when one of them writes (an
// atomic counts as a write that does not conflict with other atomics), unless both are in one
// block and a block barrier completed between them, or both are in one warp and a full-warp
// __syncwarp completed between them. Barrier intervals are numbered by a global epoch, so the
// check does not depend on the order in which the scheduler ran the threads. Shared memory has
// a shadow byte per arena byte, and a read of a byte that no thread of the block has written is
// reported too; global memory has a hash table of the bytes the launch touches, in which two
// blocks of a launch are never ordered.
#include <cstdlib>
#include <cstring>

#include "runtime.h"

namespace llada_emu {
namespace rt {
namespace {

struct Shadow {  // one byte of shared memory
  uint32_t w_epoch, r_epoch;  // barrier epochs of the last write, of the reads
  uint32_t w_sync, r_sync;    // the warp-sync counter at the last write, at the last read
  uint16_t writer, reader;    // the last writer (kAtomicWriter: atomics), the first reader
  int8_t r_warp;              // the warp of every reader in r_epoch, or -1
  uint8_t multi;              // more than one thread read it in r_epoch
  const void* w_pc;
  const void* r_pc;
};

Shadow* g_shadow = nullptr;
unsigned char* g_arena_ptr = nullptr;
size_t g_poisoned = 0;  // the most shared memory any block has used: poisoned at block start

enum GlobalFlags : uint8_t { kAtomic = 1, kAtomicBlocks = 2, kReadBlocks = 4, kReadThreads = 8 };
enum class Access { kRead, kWrite, kAtomicRmw };

struct GlobalByte {
  uintptr_t key;
  uint32_t gen;
  uint32_t w_block, r_block;  // block index + 1, 0 for none
  uint32_t w_epoch, r_epoch, w_sync, r_sync;
  uint16_t w_thread, r_thread;
  uint8_t flags;
  int8_t r_warp;
  const void* w_pc;
  const void* r_pc;
};

std::vector<GlobalByte> g_global;
int g_global_bits = 0;  // g_global has 2^g_global_bits slots
size_t g_global_used = 0;
uint32_t g_global_gen = 0;

}  // namespace

void init_arena() {
  g_arena_ptr = static_cast<unsigned char*>(aligned_alloc(4096, kArenaBytes));
  g.arena = reinterpret_cast<uintptr_t>(g_arena_ptr);
  std::memset(g_arena_ptr, 0xff, kArenaBytes);
  g_shadow = static_cast<Shadow*>(calloc(kArenaBytes, sizeof(Shadow)));
}

void start_block_memory() {
  g_poisoned = std::max(g_poisoned, std::min(g_launch.dyn_bytes, kArenaBytes));
  std::memset(g_arena_ptr, 0xff, g_poisoned);  // NaN in every float type, -1 in every int
  g_block.statics.clear();
  g_block.static_bytes = 0;
  g_block.arena_end = 0;
}

void start_launch_memory() {
  ++g_global_gen;  // every entry of the table is now free
  g_global_used = 0;
  if (g_global.empty()) {
    g_global_bits = 16;
    g_global.resize(size_t{1} << g_global_bits);
  }
}

void check_shared_limits() {
  if (g_block.static_bytes > kSharedDefaultMax || g_block.used() > kSharedOptinMax) {
    fail(format("the block uses %zu bytes of shared memory (%zu static); the limits are 48 KiB "
                "static and %zu in all", g_block.used(), g_block.static_bytes, kSharedOptinMax));
  }
}

std::string shared_text(size_t off) {
  if (off < g_launch.dyn_bytes) return format("dynamic shared memory + %zu", off);
  for (size_t i = 0; i < g_block.statics.size(); ++i) {
    const auto& s = g_block.statics[i];
    if (s.offset <= off && off < s.offset + s.bytes)
      return format("static __shared__ variable #%zu (%zu bytes) + %zu", i, s.bytes, off - s.offset);
  }
  return format("shared memory + %zu", off);
}

// [off, off + n) lies within the dynamic shared memory or within one static variable.
bool in_bounds(size_t off, size_t n) {
  if (off + n <= g_launch.dyn_bytes) return true;
  for (const auto& s : g_block.statics)
    if (s.offset <= off && off + n <= s.offset + s.bytes) return true;
  return false;
}

namespace {

// ---- shared memory: hazards within a block ------------------------------------------------

bool warp_ordered(int other, int t, uint32_t sync_at_access) {
  return other != kAtomicWriter && other / kWarp == t / kWarp &&
         g_warp_synced[t / kWarp] > sync_at_access;
}

// `byte` is the first byte of the access [off, off + n) that conflicts.
[[noreturn]] void hazard(const char* kind, size_t off, size_t n, size_t byte, bool write,
                         const void* pc, int other, bool other_wrote, const void* other_pc) {
  const int t = g.cur->linear;
  std::string msg = format("shared-memory hazard (%s): %s %s %zu byte(s) at %s (%s) at %s", kind,
                           thread_text(t).c_str(), write ? "writes" : "reads", n,
                           shared_text(off).c_str(), byte == off ? "the first conflicts"
                           : format("byte %zu conflicts", byte - off).c_str(), pc_text(pc).c_str());
  if (other >= 0) {
    msg += format(", which %s %s at %s with no barrier between them", thread_text(other).c_str(),
                  other_wrote ? "wrote" : "read", pc_text(other_pc).c_str());
  } else if (other == -2) {
    msg += format(", which other threads read (the first at %s) with no barrier between them",
                  pc_text(other_pc).c_str());
  } else {
    msg += ", which no thread of the block has written";
  }
  fail(msg);
}

void shared_access(size_t off, size_t n, bool write, const void* pc) {
  ++g_stats.shared_accesses;
  if (!in_bounds(off, n)) {
    fail(format("out-of-bounds shared-memory access: %s %s %zu byte(s) at offset %zu at %s, outside "
                "the %zu bytes of dynamic shared memory and every static __shared__ variable",
                thread_text(g.cur->linear).c_str(), write ? "writes" : "reads", n, off,
                pc_text(pc).c_str(), g_launch.dyn_bytes));
  }
  maybe_preempt();
  if (!g_sched.hazards) return;
  const int t = g.cur->linear, w = t / kWarp;
  const uint32_t E = g.epoch;
  for (size_t i = off; i < off + n; ++i) {
    Shadow& s = g_shadow[i];
    if (write) {
      if (s.w_epoch == E && s.writer != t && !warp_ordered(s.writer, t, s.w_sync))
        hazard("write after write", off, n, i, true, pc, s.writer, true, s.w_pc);
      if (s.r_epoch == E && (s.multi || s.reader != t) &&
          !(s.r_warp == w && g_warp_synced[w] > s.r_sync))
        hazard("write after read", off, n, i, true, pc, s.reader != t ? s.reader : -2, false, s.r_pc);
      s.w_epoch = E;
      s.writer = static_cast<uint16_t>(t);
      s.w_sync = g.wsync;
      s.w_pc = pc;
    } else {
      if (s.w_epoch < g_block.start_epoch) hazard("uninitialised read", off, n, i, false, pc, -1, false, nullptr);
      if (s.w_epoch == E && s.writer != t && !warp_ordered(s.writer, t, s.w_sync))
        hazard("read after write", off, n, i, false, pc, s.writer, true, s.w_pc);
      if (s.r_epoch != E) {
        s.r_epoch = E;
        s.reader = static_cast<uint16_t>(t);
        s.multi = 0;
        s.r_warp = static_cast<int8_t>(w);
        s.r_pc = pc;
      } else if (s.reader != t) {
        s.multi = 1;
        if (s.r_warp != w) s.r_warp = -1;
      }
      s.r_sync = g.wsync;
    }
  }
}

// ---- global memory: races within a launch --------------------------------------------------
// Per byte the launch touches (an open-addressing table, emptied at each launch by a generation
// number): the last plain write (block, thread, barrier epoch), whether atomics wrote it and from
// more than one block, and its readers (the first block, whether other blocks read it too, and
// within that block the readers of the latest epoch, as for shared memory). Threads of one block
// are ordered by the barriers between them; two blocks are never ordered within a launch.

size_t slot_of(uintptr_t key) { return (key * 0x9E3779B97F4A7C15ULL) >> (64 - g_global_bits); }

GlobalByte& global_byte(uintptr_t key) {
  if (2 * (g_global_used + 1) > g_global.size()) {  // grow, keeping this launch's entries
    std::vector<GlobalByte> old(size_t{1} << (g_global_bits + 1));
    old.swap(g_global);
    ++g_global_bits;
    const size_t mask = g_global.size() - 1;
    for (const GlobalByte& e : old) {
      if (e.gen != g_global_gen) continue;
      size_t i = slot_of(e.key);
      while (g_global[i].gen == g_global_gen) i = (i + 1) & mask;
      g_global[i] = e;
    }
  }
  const size_t mask = g_global.size() - 1;
  for (size_t i = slot_of(key);; i = (i + 1) & mask) {
    GlobalByte& e = g_global[i];
    if (e.gen != g_global_gen) {  // empty, or left from an earlier launch
      e = GlobalByte{};
      e.key = key;
      e.gen = g_global_gen;
      ++g_global_used;
      return e;
    }
    if (e.key == key) return e;
  }
}

std::string block_text(uint32_t block1) {
  const uint32_t id = block1 - 1;
  return format("block (%u,%u,%u)", id % gridDim.x, (id / gridDim.x) % gridDim.y,
                id / (gridDim.x * gridDim.y));
}

[[noreturn]] void race(const char* kind, uintptr_t a, size_t n, uintptr_t byte, Access access,
                       const void* pc, const std::string& other, const void* other_pc, bool same_block) {
  fail(format("global-memory race (%s): %s of %s %s %zu byte(s) at %p (%s) at %s, which %s at %s "
              "%s", kind, thread_text(g.cur->linear).c_str(), block_text(g_block.id + 1).c_str(),
              access == Access::kRead ? "reads" : access == Access::kWrite ? "writes" : "atomically updates",
              n, reinterpret_cast<void*>(a), byte == a ? "the first conflicts"
              : format("byte %zu conflicts", size_t(byte - a)).c_str(), pc_text(pc).c_str(),
              other.c_str(), pc_text(other_pc).c_str(),
              same_block ? "with no barrier between them" : "(blocks of a launch are not ordered)"));
}

void global_access(uintptr_t a, size_t n, Access access, const void* pc) {
  const uint32_t B = g_block.id + 1, E = g.epoch;
  const int t = g.cur->linear, w = t / kWarp;
  const auto synced = [&](uint32_t at) { return g_warp_synced[w] > at; };
  for (uintptr_t p = a; p < a + n; ++p) {
    GlobalByte& e = global_byte(p);
    if (e.w_block != 0 && (e.flags & kAtomic)) {  // atomics wrote it
      if (access != Access::kAtomicRmw &&
          ((e.flags & kAtomicBlocks) || e.w_block != B || e.w_epoch == E)) {
        race(access == Access::kRead ? "read after atomics" : "write after atomics", a, n, p, access,
             pc, (e.flags & kAtomicBlocks) ? "atomics of several blocks updated"
             : format("atomics of %s updated", block_text(e.w_block).c_str()), e.w_pc,
             e.w_block == B && !(e.flags & kAtomicBlocks));
      }
    } else if (e.w_block != 0) {  // a plain write
      const bool other_thread = e.w_thread != t && !(e.w_thread / kWarp == w && synced(e.w_sync));
      if (e.w_block != B || (e.w_epoch == E && other_thread)) {
        race(access == Access::kRead ? "read after write" : "write after write", a, n, p, access, pc,
             format("%s of %s wrote", thread_text(e.w_thread).c_str(), block_text(e.w_block).c_str()),
             e.w_pc, e.w_block == B);
      }
    }
    if (access != Access::kRead && e.r_block != 0) {
      const bool others = (e.flags & kReadThreads) || e.r_thread != t;
      if ((e.flags & kReadBlocks) || e.r_block != B ||
          (e.r_epoch == E && others && !(e.r_warp == w && synced(e.r_sync)))) {
        race("write after read", a, n, p, access, pc,
             (e.flags & kReadBlocks) ? std::string("threads of several blocks read")
             : format("%s of %s read", e.r_thread != t ? thread_text(e.r_thread).c_str() : "other threads",
                      block_text(e.r_block).c_str()), e.r_pc,
             e.r_block == B && !(e.flags & kReadBlocks));
      }
    }
    switch (access) {
      case Access::kRead:
        if (e.r_block == 0 || (e.r_block == B && e.r_epoch != E)) {
          e.r_block = B;
          e.r_epoch = E;
          e.r_thread = static_cast<uint16_t>(t);
          e.r_warp = static_cast<int8_t>(w);
          e.r_pc = pc;
          e.flags &= ~kReadThreads;
        } else if (e.r_block != B) {
          e.flags |= kReadBlocks;
        } else if (e.r_thread != t) {
          e.flags |= kReadThreads;
          if (e.r_warp != w) e.r_warp = -1;
        }
        e.r_sync = g.wsync;
        break;
      case Access::kWrite:
        e.w_block = B;
        e.w_thread = static_cast<uint16_t>(t);
        e.w_epoch = E;
        e.w_sync = g.wsync;
        e.w_pc = pc;
        e.flags &= ~(kAtomic | kAtomicBlocks);
        break;
      case Access::kAtomicRmw:
        if ((e.flags & kAtomic) && e.w_block != B) e.flags |= kAtomicBlocks;
        e.flags |= kAtomic;
        e.w_block = B;
        e.w_epoch = E;
        e.w_pc = pc;
        break;
    }
  }
}

inline void on_access(const void* p, size_t n, bool write, const void* pc) {
  if (!g.in_kernel || g.cur == nullptr) return;  // host code, or the scheduler
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a - g.arena < kArenaBytes) return shared_access(a - g.arena, n, write, pc);
  if (a - g.stacks < g.stacks_bytes) return;  // a thread's own stack
  if (write) maybe_preempt();
  if (g_sched.hazards) global_access(a, n, write ? Access::kWrite : Access::kRead, pc);
}

}  // namespace
}  // namespace rt

using namespace rt;

void* dynamic_shared() { return g_arena_ptr; }

void* static_shared_slot(const void* key, size_t bytes, size_t align) {
  for (const auto& s : g_block.statics)
    if (s.key == key) return g_arena_ptr + s.offset;
  // A red zone of kRedZone bytes before each variable: an overflow of the dynamic part or of
  // another variable lands outside every region and is reported.
  const size_t off = (std::max(g_block.arena_end, g_launch.dyn_bytes) + kRedZone + align - 1) / align * align;
  if (off + bytes > kArenaBytes) fail("static __shared__ variables exceed the arena");
  g_block.statics.push_back({key, off, bytes});
  g_block.static_bytes = (g_block.static_bytes + align - 1) / align * align + bytes;
  g_block.arena_end = off + bytes;
  g_poisoned = std::max(g_poisoned, g_block.arena_end);
  return g_arena_ptr + off;
}

void atomic_access(const void* p, size_t n, void* pc) {
  if (!g.in_kernel || g.cur == nullptr) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a - g.arena >= kArenaBytes) {
    maybe_preempt();
    if (g_sched.hazards) global_access(a, n, Access::kAtomicRmw, pc);
    return;
  }
  const size_t off = a - g.arena;
  if (!in_bounds(off, n)) fail(format("out-of-bounds atomic on shared memory at offset %zu", off));
  maybe_preempt();
  if (!g_sched.hazards) return;
  const int t = g.cur->linear, w = t / kWarp;
  const uint32_t E = g.epoch;
  for (size_t i = off; i < off + n; ++i) {
    Shadow& s = g_shadow[i];
    if (s.w_epoch < g_block.start_epoch) hazard("uninitialised read", off, n, i, false, pc, -1, false, nullptr);
    if (s.w_epoch == E && s.writer != kAtomicWriter && s.writer != t && !warp_ordered(s.writer, t, s.w_sync))
      hazard("atomic after a plain write", off, n, i, true, pc, s.writer, true, s.w_pc);
    if (s.r_epoch == E && (s.multi || s.reader != t) && !(s.r_warp == w && g_warp_synced[w] > s.r_sync))
      hazard("atomic after a plain read", off, n, i, true, pc, s.reader != t ? s.reader : -2, false, s.r_pc);
    s.w_epoch = E;
    s.writer = kAtomicWriter;
    s.w_pc = pc;
  }
}

}  // namespace llada_emu

// ---- the memory-access hooks of g++ -fsanitize=thread --------------------------------------------
// (with --param=tsan-instrument-func-entry-exit=0). Atomics in the host code (reference counts
// in ATen's headers) go through __tsan_atomic*: they are done here, sequentially consistent.
#define LLADA_EMU_HOOK extern "C" __attribute__((visibility("hidden")))
#define LLADA_EMU_ACCESS(N)                                                                       \
  LLADA_EMU_HOOK void __tsan_read##N(void* p) { llada_emu::rt::on_access(p, N, false, __builtin_return_address(0)); } \
  LLADA_EMU_HOOK void __tsan_write##N(void* p) { llada_emu::rt::on_access(p, N, true, __builtin_return_address(0)); } \
  LLADA_EMU_HOOK void __tsan_unaligned_read##N(void* p) { llada_emu::rt::on_access(p, N, false, __builtin_return_address(0)); } \
  LLADA_EMU_HOOK void __tsan_unaligned_write##N(void* p) { llada_emu::rt::on_access(p, N, true, __builtin_return_address(0)); } \
  LLADA_EMU_HOOK void __tsan_volatile_read##N(void* p) { llada_emu::rt::on_access(p, N, false, __builtin_return_address(0)); } \
  LLADA_EMU_HOOK void __tsan_volatile_write##N(void* p) { llada_emu::rt::on_access(p, N, true, __builtin_return_address(0)); }
LLADA_EMU_ACCESS(1)
LLADA_EMU_ACCESS(2)
LLADA_EMU_ACCESS(4)
LLADA_EMU_ACCESS(8)
LLADA_EMU_ACCESS(16)
LLADA_EMU_HOOK void __tsan_read_range(void* p, unsigned long n) { llada_emu::rt::on_access(p, n, false, __builtin_return_address(0)); }
LLADA_EMU_HOOK void __tsan_write_range(void* p, unsigned long n) { llada_emu::rt::on_access(p, n, true, __builtin_return_address(0)); }
LLADA_EMU_HOOK void __tsan_init() {}
LLADA_EMU_HOOK void __tsan_func_entry(void*) {}
LLADA_EMU_HOOK void __tsan_func_exit() {}
LLADA_EMU_HOOK void __tsan_vptr_read(void**) {}
LLADA_EMU_HOOK void __tsan_vptr_update(void**, void*) {}
LLADA_EMU_HOOK void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
LLADA_EMU_HOOK void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

#define LLADA_EMU_ATOMIC(BITS, T)                                                                  \
  LLADA_EMU_HOOK T __tsan_atomic##BITS##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
  LLADA_EMU_HOOK void __tsan_atomic##BITS##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
  LLADA_EMU_HOOK T __tsan_atomic##BITS##_exchange(volatile T* a, T v, int) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
  LLADA_EMU_HOOK T __tsan_atomic##BITS##_fetch_add(volatile T* a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); } \
  LLADA_EMU_HOOK T __tsan_atomic##BITS##_fetch_sub(volatile T* a, T v, int) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); } \
  LLADA_EMU_HOOK T __tsan_atomic##BITS##_fetch_and(volatile T* a, T v, int) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); } \
  LLADA_EMU_HOOK T __tsan_atomic##BITS##_fetch_or(volatile T* a, T v, int) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); } \
  LLADA_EMU_HOOK T __tsan_atomic##BITS##_fetch_xor(volatile T* a, T v, int) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); } \
  LLADA_EMU_HOOK T __tsan_atomic##BITS##_fetch_nand(volatile T* a, T v, int) { return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST); } \
  LLADA_EMU_HOOK int __tsan_atomic##BITS##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) { \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }     \
  LLADA_EMU_HOOK int __tsan_atomic##BITS##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) { \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }     \
  LLADA_EMU_HOOK T __tsan_atomic##BITS##_compare_exchange_val(volatile T* a, T c, T v, int, int) { \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);             \
    return c; }
LLADA_EMU_ATOMIC(8, char)
LLADA_EMU_ATOMIC(16, short)
LLADA_EMU_ATOMIC(32, int)
LLADA_EMU_ATOMIC(64, long)
