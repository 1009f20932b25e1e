#pragma once
// The internals shared by the two halves of the emulation's runtime: threads.cpp (fibers, the
// scheduler, barriers, warp collectives, mma.sync, launches) and memory.cpp (the shared-memory
// arena, the hazard checker and the memory-access hooks). Not part of the interface of
// cuda_emu.h: only the runtime includes it.
#include <string>
#include <vector>

#include "llada_emu/cuda_emu.h"

namespace llada_emu::rt {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kArenaBytes = size_t{256} << 10;      // more than any GPU's block maximum
constexpr size_t kSharedDefaultMax = size_t{48} << 10;  // without cudaFuncSetAttribute
constexpr size_t kSharedOptinMax = 166912;              // sm_80 (163 KiB); sm_90 has 227 KiB
constexpr size_t kStackBytes = size_t{128} << 10;       // per thread, the lowest page a guard
constexpr uint16_t kAtomicWriter = 0xffff;
constexpr size_t kRedZone = 256;  // unused shared memory before each static variable

enum class State : uint8_t { kReady, kBarrier, kWarp, kExited };
enum class WarpOp : uint8_t { kShfl, kVote, kMatchAny, kMatchAll, kReduce, kSync, kMma };
inline const char* const kWarpOpNames[] = {"__shfl*_sync", "a vote (__ballot/__any/__all/__uni_sync)",
                                    "__match_any_sync", "__match_all_sync", "__reduce_*_sync",
                                    "__syncwarp", "mma.sync"};

struct Fiber {
  void* sp;
  uint3 tid;
  int linear;
  State state;
  // at a block barrier
  int bar_kind, bar_pred, bar_result, bar_line;
  const char* bar_file;
  // at a warp collective: the arguments, then the result
  WarpOp op;
  int sub, b, width;
  unsigned mask;
  uint64_t in, out;
  int out_pred;
  uint32_t mma_a[4], mma_b[2];
  float mma_c[4];
  bool mma_fp16;
};

struct Schedule {
  enum Order { kForward, kReverse, kRandom } order = kForward;
  uint64_t seed = 1;
  uint32_t preempt = 0;  // per 65536 memory accesses: switch threads before the access
  bool hazards = true;
};

struct Plant {  // bugs planted at run time, for the tests of the checkers
  std::string drop_file;  // a __syncthreads() at drop_file:drop_line does nothing
  int drop_line = 0;
  bool mma_swap_a12 = false;  // mma reads A's registers 1 and 2 swapped (a wrong fragment index)
};

struct Stats {
  int64_t launches, blocks, threads, barriers, warp_ops, mmas, shared_accesses, preemptions;
};

struct Launch {
  const LaunchConfig* cfg;
  const void* kernel_id;
  void (*entry)(void*);
  void* ctx;
  size_t dyn_bytes;
  size_t max_dyn;
};

struct Block {
  int nthreads = 0;
  uint32_t id = 0;  // linear index in the grid
  uint32_t start_epoch = 0;
  size_t static_bytes = 0;  // of static __shared__ variables, as a GPU would lay them out
  size_t arena_end = 0;     // here they follow the dynamic part, each after a red zone
  struct Slot {
    const void* key;
    size_t offset, bytes;
  };
  std::vector<Slot> statics;  // in offset order
  size_t used() const;
};

// The hot state, read by every memory-access hook.
struct Hot {
  bool in_kernel = false;
  uintptr_t arena = 0;
  uintptr_t stacks = 0;
  size_t stacks_bytes = 0;
  Fiber* cur = nullptr;
  uint32_t epoch = 0;      // incremented at every block start and every completed barrier
  uint32_t wsync = 0;      // incremented at every completed full-warp __syncwarp
  uint64_t rng = 0;
};


extern Hot g;
extern Schedule g_sched;
extern Plant g_plant;
extern Stats g_stats;
extern Launch g_launch;
extern Block g_block;
extern std::vector<Fiber> g_fibers;
extern uint32_t g_warp_synced[kMaxThreads / kWarp];  // g.wsync at each warp's last full __syncwarp

// threads.cpp
std::string format(const char* fmt, ...);
std::string pc_text(const void* pc);
std::string thread_text(int linear);
[[noreturn]] void fail(const std::string& what);
void switch_to_scheduler();
void maybe_preempt();

// memory.cpp
void init_arena();
void start_launch_memory();        // forgets the global-memory accesses of the last launch
void start_block_memory();         // poisons the arena, forgets the static variables
std::string shared_text(size_t off);
void check_shared_limits();        // after a block: its shared memory within the GPU's limits

}  // namespace llada_emu::rt
