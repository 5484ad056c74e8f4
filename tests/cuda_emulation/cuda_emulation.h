// CPU emulation of the CUDA features the kernels of csrc/ use, so that g++ compiles and runs the
// real kernels on a machine without a GPU. Include it first: it defines LK_CUDA_EMULATION and
// provides the primitives of csrc/attention_ptx.cuh (attention_launch.cuh) and of
// csrc/cuda_launch.cuh (the row-wise kernels of cuda_utils.cuh, whose .cu files g++ compiles with
// -include cuda_emulation.h).
//
// Emulated:
// - Thread blocks: one fiber (ucontext) per CUDA thread, all on one OS thread, switched at every
//   __syncthreads, __syncwarp and warp collective; the blocks of a launch run on several OS
//   threads. Blocks of up to 3 dims with x-major thread ids; a warp is 32 consecutive thread
//   ids; collectives need all 32 lanes (full masks). Static __shared__ variables are thread_local
//   (one per OS thread, shared by the fibers of its block).
// - Runtime calls of the row kernels: launch_kernel(_smem), a device of sm_count() SMs (settable)
//   whose occupancy is 2048 threads, 32 blocks or 164 KB of shared memory per SM (registers not
//   modelled), allow_dynamic_smem (up to the launch limit), cudaGetLastError (always success).
// - __shfl_xor_sync (float); ldmatrix.x4 (.trans) and mma.sync.m16n8k16 (fp16/bf16 inputs, fp32
//   accumulators) with the fragment layouts of the PTX ISA; cp.async.cg 16 bytes (zero fill when
//   !valid) in commit groups, landing at cp.async.wait_group 0 (the latest legal time) and reading
//   as NaN bytes until then; __half / __nv_bfloat16 with round-to-nearest-even conversions.
// Faults (counted, the first messages kept; see faults()):
// - Races that cp.async and ldmatrix see, per 16-byte chunk of shared memory: a read of a chunk
//   with a copy in flight or landed by another thread since the last __syncthreads, a copy into
//   a chunk another warp read since then, two copies in flight into one chunk, a copy never waited.
// - cp.async / ldmatrix outside the launch's shared memory or misaligned, and cp.async sources
//   outside every device_alloc buffer.
// Fatal (message, abort): deadlocks (a thread exits or waits at another barrier while others
// wait), divergent warp collectives, launch configurations the GPU would reject (an empty grid
// included).
// Amplified, not checked: races and overruns of plain loads and stores. Dynamic shared memory
// and device_alloc buffers start as NaN bytes, the threads __syncthreads releases run in a
// shuffled order, and buffers end at an inaccessible page (an overrun past it crashes).
// Not emulated: timing, bank conflicts, the memory model beyond barriers, nvcc's FMA contraction,
// the accuracy of the GPU's exp2f/expf/erff/rsqrtf (the host libm here), the tensor cores'
// internal summation order (fp32 sums in k order here), streams, anything the kernels do not use.
#pragma once

#define LK_CUDA_EMULATION 1

#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

// ================================ CUDA C++ language ==========================================

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

struct alignas(8) float2 {
  float x, y;
};

struct alignas(16) float4 {
  float x, y, z, w;
};

inline float2 make_float2(float x, float y) { return {x, y}; }

// Of the running CUDA thread: the scheduler sets threadIdx at every switch.
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

inline int min(int a, int b) { return a < b ? a : b; }

namespace cuda_emu {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float -> IEEE binary16, round to nearest even.
inline uint16_t half_from_float(float f) {
  const uint32_t u = float_bits(f), sign = (u >> 16) & 0x8000u, mag = u & 0x7fffffffu;
  if (mag > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
  if (mag >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (mag < 0x38800000u) {  // below 2^-14: a multiple of 2^-24 (exact scaling, rint is RNE)
    const float units = std::rint(bits_float(mag) * 0x1p24f);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(units));
  }
  const uint32_t rounded = mag + 0xfffu + ((mag >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) return (sign ? -1.0f : 1.0f) * std::ldexp(float(mant), -24);  // subnormal
  if (exp == 31) return bits_float(sign | 0x7f800000u | (mant << 13));
  return bits_float(sign | ((exp + 112) << 23) | (mant << 13));
}

// float -> bfloat16, round to nearest even.
inline uint16_t bf16_from_float(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_to_float(uint16_t b) { return bits_float(uint32_t{b} << 16); }

}  // namespace cuda_emu

struct __half {
  uint16_t bits;
  __half() = default;
  __half(float f) : bits(cuda_emu::half_from_float(f)) {}
  operator float() const { return cuda_emu::half_to_float(bits); }
};

struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : bits(cuda_emu::bf16_from_float(f)) {}
  operator float() const { return cuda_emu::bf16_to_float(bits); }
};

inline float __half2float(__half h) { return float(h); }
inline float __bfloat162float(__nv_bfloat16 b) { return float(b); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

// ================================ runtime ====================================================

namespace cuda_emu {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
constexpr unsigned kMaxBlockZ = 64, kMaxGridX = 2147483647u, kMaxGridY = 65535;
constexpr int kMaxThreadsPerSm = 2048, kMaxBlocksPerSm = 32;
// sharedMemPerBlockOptin of sm_80, the smaller of the built archs (8.0, 9.0).
constexpr size_t kMaxSmem = 166912;
// Shared memory per SM (sm_80's 164 KB, the smaller of the built archs) and reserved per block.
constexpr size_t kSmemPerSm = 167936, kSmemReservedPerBlock = 1024;
constexpr size_t kStackBytes = 128 * 1024;
constexpr int kKeptMessages = 20;

// ---- faults ----

class FaultLog {
 public:
  void report(const std::string& what) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (count_++ < kKeptMessages) messages_.push_back(what);
  }
  long count() const { return count_; }
  const std::vector<std::string>& messages() const { return messages_; }

 private:
  std::mutex mutex_;
  long count_ = 0;
  std::vector<std::string> messages_;
};

inline FaultLog& faults() {
  static FaultLog log;
  return log;
}

[[noreturn]] inline void fatal(const std::string& what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

// Fault injection for the emulator's self-test: every thread skips its n-th __syncthreads
// (counted from 1 per block; 0 skips none).
inline int& skipped_syncthreads() {
  static int n = 0;
  return n;
}

// Streaming multiprocessors of the emulated device (cudaDevAttrMultiProcessorCount): the
// kernels' launch plans depend on it. 132 as on an H100 SXM.
inline int& sm_count() {
  static int n = 132;
  return n;
}

// ---- memory ----

// Pages of read-write memory with an inaccessible page below or above them; unmapped with the
// object.
class GuardedPages {
 public:
  GuardedPages(size_t size, bool guard_below) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    length_ = ((size + page - 1) / page + 1) * page;
    base_ = static_cast<unsigned char*>(
        mmap(nullptr, length_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (base_ == MAP_FAILED) fatal("mmap failed");
    unsigned char* guard = guard_below ? base_ : base_ + length_ - page;
    if (mprotect(guard, page, PROT_NONE) != 0) fatal("mprotect failed");
    begin_ = guard_below ? base_ + page : base_;
    end_ = guard_below ? base_ + length_ : guard;
  }
  GuardedPages(const GuardedPages&) = delete;
  GuardedPages& operator=(const GuardedPages&) = delete;
  ~GuardedPages() { munmap(base_, length_); }

  unsigned char* begin() const { return begin_; }
  unsigned char* end() const { return end_; }  // the guard page when it is above

 private:
  unsigned char* base_;
  size_t length_;
  unsigned char* begin_;
  unsigned char* end_;
};

struct Allocation {
  const unsigned char* begin;
  const unsigned char* end;
};

inline std::vector<Allocation>& allocations() {
  static std::vector<Allocation> list;
  return list;
}

// A 16-byte aligned buffer of `bytes` NaN bytes, ending (up to alignment) at an inaccessible
// page; the only memory cp.async may read. Allocate before launching; never freed.
inline void* device_alloc(size_t bytes) {
  const size_t padded = std::max<size_t>(16, (bytes + 15) / 16 * 16);
  unsigned char* p = (new GuardedPages(padded, false))->end() - padded;
  std::memset(p, 0xff, padded);
  allocations().push_back({p, p + bytes});
  return p;
}

inline bool in_allocation(const void* ptr, size_t bytes) {
  const auto* p = static_cast<const unsigned char*>(ptr);
  for (const Allocation& a : allocations()) {
    if (p >= a.begin && p + bytes <= a.end) return true;
  }
  return false;
}

// ---- blocks of fibers ----

// What a thread waits at.
enum class Sync : int { kNone, kSyncThreads, kSyncWarp, kShfl, kLdmatrix, kLdmatrixTrans, kMma };
constexpr int kSyncKinds = static_cast<int>(Sync::kMma) + 1;

inline const char* sync_name(Sync s) {
  switch (s) {
    case Sync::kSyncThreads: return "__syncthreads";
    case Sync::kSyncWarp: return "__syncwarp";
    case Sync::kShfl: return "__shfl_xor_sync";
    case Sync::kLdmatrix: return "ldmatrix";
    case Sync::kLdmatrixTrans: return "ldmatrix.trans";
    case Sync::kMma: return "mma.sync";
    default: return "nothing";
  }
}

struct Copy {  // a cp.async in flight
  unsigned char* dst;
  const unsigned char* src;  // nullptr: zero fill
  bool committed;
};

struct Fiber {
  ucontext_t context;
  int tid;
  Sync waiting;
  int syncthreads_calls;
  std::vector<Copy> copies;
};

// The inputs of a warp collective (filled by each lane as it arrives) and its results (filled
// by the last lane to arrive, read by each lane as it leaves).
struct WarpSync {
  Sync op = Sync::kNone;
  int arrived = 0;
  int waiting[kWarpSize];
  float value[kWarpSize];
  int source[kWarpSize];
  const unsigned char* row[kWarpSize];
  uint32_t a[kWarpSize][4], b[kWarpSize][2];
  float c[kWarpSize][4];
  float shfl[kWarpSize];
  uint32_t fragment[kWarpSize][4];
  float acc[kWarpSize][4];
};

// Who last wrote (cp.async) and read (ldmatrix) a 16-byte chunk of shared memory, and in which
// barrier interval (the number of __syncthreads completed before).
struct Chunk {
  int copy_tid;  // thread with a cp.async in flight into the chunk, or -1
  int landed_tid;
  int landed_epoch;
  int read_epoch;
  uint32_t read_warps;  // bit w: warp w read the chunk in read_epoch
};

// What an OS thread keeps between blocks: fibers, their stacks (overflowing into a guard page)
// and the shared memory window (ending at one).
struct Worker {
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<GuardedPages>> stacks;
  GuardedPages smem{kMaxSmem, false};

  void reserve(int threads) {
    while (static_cast<int>(stacks.size()) < threads) {
      stacks.push_back(std::make_unique<GuardedPages>(kStackBytes, true));
    }
    fibers.resize(threads);
  }
};

// The block an OS thread runs.
struct Block {
  Worker* worker;
  const std::function<void()>* body;  // the kernel call of every thread
  int threads;
  std::string name;  // kernel and block index, for messages
  ucontext_t host;   // the OS thread outside the fibers
  std::vector<int> ready;  // a FIFO ring of the fibers ready to run
  size_t ready_head = 0, ready_count = 0;
  int alive;
  int arrived = 0;  // at __syncthreads
  std::vector<int> at_barrier;
  int epoch = 0;  // __syncthreads completed
  std::vector<WarpSync> warps;
  unsigned char* smem;
  size_t smem_bytes;
  std::vector<Chunk> chunks;
  uint64_t rng;  // for the order __syncthreads releases the threads in
};

inline thread_local Block* current_block = nullptr;
inline thread_local Fiber* current_fiber = nullptr;

inline Block& block() { return *current_block; }
inline Fiber& fiber() { return *current_fiber; }
inline int lane() { return fiber().tid % kWarpSize; }
inline WarpSync& warp() { return block().warps[fiber().tid / kWarpSize]; }

inline void push_ready(Block& b, int tid) {
  b.ready[(b.ready_head + b.ready_count++) % b.ready.size()] = tid;
}

// No fiber is ready: some wait at a barrier the others never reach.
[[noreturn]] inline void deadlock(Block& b) {
  int waiting[kSyncKinds] = {};
  for (int t = 0; t < b.threads; ++t) ++waiting[static_cast<int>(b.worker->fibers[t].waiting)];
  std::string what = b.name + ": deadlock:";
  for (int s = 1; s < kSyncKinds; ++s) {
    if (waiting[s] > 0) {
      what += " " + std::to_string(waiting[s]) + " at " + sync_name(Sync(s)) + ",";
    }
  }
  fatal(what + " " + std::to_string(waiting[0]) + " exited or running");
}

// The next ready fiber, made current.
inline Fiber& take_ready(Block& b) {
  if (b.ready_count == 0) deadlock(b);
  Fiber& next = b.worker->fibers[b.ready[b.ready_head]];
  b.ready_head = (b.ready_head + 1) % b.ready.size();
  --b.ready_count;
  current_fiber = &next;
  const unsigned tid = static_cast<unsigned>(next.tid), plane = blockDim.x * blockDim.y;
  threadIdx = dim3(tid % blockDim.x, tid % plane / blockDim.x, tid / plane);
  return next;
}

// Runs other fibers until this one is ready again.
inline void switch_away() {
  Fiber& self = fiber();
  Fiber& next = take_ready(block());
  if (&next != &self) swapcontext(&self.context, &next.context);
}

inline uint64_t next_random(uint64_t& state) {
  state ^= state << 13;
  state ^= state >> 7;
  state ^= state << 17;
  return state;
}

// __syncthreads: the last thread to arrive releases the others in a shuffled order.
inline void syncthreads() {
  Block& b = block();
  Fiber& self = fiber();
  if (++self.syncthreads_calls == skipped_syncthreads()) return;
  self.waiting = Sync::kSyncThreads;
  if (++b.arrived < b.threads) {
    b.at_barrier.push_back(self.tid);
    switch_away();
  } else {
    for (size_t i = b.at_barrier.size(); i > 1; --i) {
      std::swap(b.at_barrier[i - 1], b.at_barrier[next_random(b.rng) % i]);
    }
    for (int t : b.at_barrier) push_ready(b, t);
    b.at_barrier.clear();
    b.arrived = 0;
    ++b.epoch;
  }
  self.waiting = Sync::kNone;
}

// A warp collective: the calling lane has filled its inputs of warp(); the last lane to arrive
// runs complete(warp()) and releases the others.
template <typename Complete>
void warp_collective(Sync op, Complete&& complete) {
  Block& b = block();
  Fiber& self = fiber();
  WarpSync& w = warp();
  if (w.arrived == 0) {
    w.op = op;
  } else if (w.op != op) {
    fatal(b.name + ": divergent warp: lane " + std::to_string(lane()) + " at " + sync_name(op) +
          ", others at " + sync_name(w.op));
  }
  self.waiting = op;
  if (++w.arrived < kWarpSize) {
    w.waiting[w.arrived - 1] = self.tid;
    switch_away();
  } else {
    complete(w);
    for (int i = 0; i < kWarpSize - 1; ++i) push_ready(b, w.waiting[i]);
    w.arrived = 0;
  }
  self.waiting = Sync::kNone;
}

inline void require_full_mask(unsigned mask) {
  if (mask != 0xffffffffu) fatal(block().name + ": partial warp masks are not emulated");
}

// ---- shared memory checks ----

// Names a thread of the running block, and the barrier interval, for a fault message.
inline std::string where(int tid) {
  return block().name + " thread " + std::to_string(tid) + " (interval " +
         std::to_string(block().epoch) + ")";
}

// The chunk of a 16-byte access at p, or nullptr (a fault) when it is misaligned or outside the
// launch's shared memory.
inline Chunk* chunk_of(const void* p, const char* what, int tid) {
  Block& b = block();
  const auto* byte = static_cast<const unsigned char*>(p);
  const auto offset = byte - b.smem;
  if (offset < 0 || static_cast<size_t>(offset) + 16 > b.smem_bytes) {
    faults().report(where(tid) + ": " + what + " outside shared memory (offset " +
                    std::to_string(offset) + " of " + std::to_string(b.smem_bytes) + ")");
    return nullptr;
  }
  if (offset % 16 != 0) {
    faults().report(where(tid) + ": " + what + " misaligned (offset " + std::to_string(offset) +
                    ")");
    return nullptr;
  }
  return &b.chunks[offset / 16];
}

inline void cp_async(void* dst, const void* src, bool valid) {
  Block& b = block();
  Fiber& self = fiber();
  const int warp_id = self.tid / kWarpSize;
  Chunk* c = chunk_of(dst, "cp.async destination", self.tid);
  if (c == nullptr) return;
  if (valid && (reinterpret_cast<uintptr_t>(src) % 16 != 0 || !in_allocation(src, 16))) {
    faults().report(where(self.tid) + ": cp.async source outside every buffer or misaligned");
    valid = false;
  }
  if (c->copy_tid >= 0) {
    faults().report(where(self.tid) + ": cp.async into a chunk thread " +
                    std::to_string(c->copy_tid) + " copies into");
  }
  if (c->read_epoch == b.epoch && (c->read_warps & ~(1u << warp_id)) != 0) {
    faults().report(where(self.tid) + ": cp.async into a chunk another warp read since the "
                    "last __syncthreads");
  }
  c->copy_tid = self.tid;
  auto* d = static_cast<unsigned char*>(dst);
  std::memset(d, 0xff, 16);  // undefined until the wait
  self.copies.push_back({d, valid ? static_cast<const unsigned char*>(src) : nullptr, false});
}

inline void cp_async_commit() {
  for (Copy& c : fiber().copies) c.committed = true;
}

// cp.async.wait_group 0: the committed copies land; uncommitted ones stay in flight.
inline void cp_async_wait() {
  Block& b = block();
  Fiber& self = fiber();
  size_t kept = 0;
  for (const Copy& c : self.copies) {
    if (!c.committed) {
      self.copies[kept++] = c;
      continue;
    }
    if (c.src != nullptr) std::memcpy(c.dst, c.src, 16); else std::memset(c.dst, 0, 16);
    Chunk& chunk = b.chunks[(c.dst - b.smem) / 16];
    chunk.copy_tid = -1;
    chunk.landed_tid = self.tid;
    chunk.landed_epoch = b.epoch;
  }
  self.copies.resize(kept);
}

// ---- ldmatrix.x4 and mma.m16n8k16 ----

inline uint16_t load_b16(const unsigned char* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// Lane l (l / 8 = matrix m) gave the address of row l % 8 of matrix m (8 x 16-bit values). Lane
// (g, t) = (l / 4, l % 4) gets in register m row g, columns 2t and 2t + 1 of matrix m, or with
// .trans column g, rows 2t and 2t + 1.
inline void complete_ldmatrix(WarpSync& w) {
  const bool trans = w.op == Sync::kLdmatrixTrans;
  Block& b = block();
  const int first_tid = fiber().tid / kWarpSize * kWarpSize;
  const uint32_t warp_bit = 1u << (first_tid / kWarpSize);
  static const unsigned char zeros[16] = {};
  const unsigned char* rows[kWarpSize];
  for (int l = 0; l < kWarpSize; ++l) {
    Chunk* c = chunk_of(w.row[l], "ldmatrix row", first_tid + l);
    rows[l] = c == nullptr ? zeros : w.row[l];
    if (c == nullptr) continue;
    if (c->copy_tid >= 0) {
      faults().report(where(first_tid + l) + ": ldmatrix reads a chunk thread " +
                      std::to_string(c->copy_tid) + " still copies into");
    } else if (c->landed_epoch == b.epoch && c->landed_tid != first_tid + l) {
      faults().report(where(first_tid + l) + ": ldmatrix reads a chunk thread " +
                      std::to_string(c->landed_tid) + " copied since the last __syncthreads");
    }
    if (c->read_epoch != b.epoch) {
      c->read_epoch = b.epoch;
      c->read_warps = 0;
    }
    c->read_warps |= warp_bit;
  }
  for (int l = 0; l < kWarpSize; ++l) {
    const int g = l / 4, t = l % 4;
    for (int m = 0; m < 4; ++m) {
      uint16_t lo, hi;
      if (trans) {
        lo = load_b16(rows[8 * m + 2 * t] + 2 * g);
        hi = load_b16(rows[8 * m + 2 * t + 1] + 2 * g);
      } else {
        lo = load_b16(rows[8 * m + g] + 4 * t);
        hi = load_b16(rows[8 * m + g] + 4 * t + 2);
      }
      w.fragment[l][m] = uint32_t{lo} | uint32_t{hi} << 16;
    }
  }
}

inline void ldmatrix(uint32_t (&r)[4], const void* smem, bool trans) {
  WarpSync& w = warp();
  const int l = lane();
  w.row[l] = static_cast<const unsigned char*>(smem);
  warp_collective(trans ? Sync::kLdmatrixTrans : Sync::kLdmatrix, complete_ldmatrix);
  for (int m = 0; m < 4; ++m) r[m] = w.fragment[l][m];
}

template <typename T>
float from_bits(uint32_t bits) {
  T v;
  v.bits = static_cast<uint16_t>(bits);
  return float(v);
}

// D = A B + C for the whole warp. Lane (g, t) = (l / 4, l % 4) holds A rows g and g + 8 at
// columns 2t, 2t + 1 (registers 0, 1) and 2t + 8, 2t + 9 (registers 2, 3); B column g at rows
// 2t, 2t + 1 and 2t + 8, 2t + 9; C/D rows g and g + 8 at columns 2t, 2t + 1.
template <typename T>
void complete_mma(WarpSync& w) {
  float a[16][16], b[16][8], d[16][8];
  for (int l = 0; l < kWarpSize; ++l) {
    const int g = l / 4, t = l % 4;
    for (int r = 0; r < 4; ++r) {
      const int row = g + 8 * (r % 2), col = 2 * t + 8 * (r / 2);
      a[row][col] = from_bits<T>(w.a[l][r]);
      a[row][col + 1] = from_bits<T>(w.a[l][r] >> 16);
    }
    for (int r = 0; r < 2; ++r) {
      b[2 * t + 8 * r][g] = from_bits<T>(w.b[l][r]);
      b[2 * t + 8 * r + 1][g] = from_bits<T>(w.b[l][r] >> 16);
    }
    for (int e = 0; e < 4; ++e) d[g + 8 * (e / 2)][2 * t + e % 2] = w.c[l][e];
  }
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 8; ++j) {
      for (int k = 0; k < 16; ++k) d[i][j] += a[i][k] * b[k][j];
    }
  }
  for (int l = 0; l < kWarpSize; ++l) {
    for (int e = 0; e < 4; ++e) w.acc[l][e] = d[l / 4 + 8 * (e / 2)][2 * (l % 4) + e % 2];
  }
}

template <typename T>
void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  WarpSync& w = warp();
  const int l = lane();
  for (int r = 0; r < 4; ++r) {
    w.a[l][r] = a[r];
    w.c[l][r] = c[r];
  }
  w.b[l][0] = b0;
  w.b[l][1] = b1;
  warp_collective(Sync::kMma, complete_mma<T>);
  for (int e = 0; e < 4; ++e) c[e] = w.acc[l][e];
}

// ---- launches ----

inline void fiber_main() {
  Block& b = block();
  (*b.body)();
  Fiber& self = fiber();
  if (!self.copies.empty()) {
    faults().report(where(self.tid) + ": exits with " + std::to_string(self.copies.size()) +
                    " cp.async never waited for");
  }
  if (--b.alive == 0) setcontext(&b.host);
  setcontext(&take_ready(b).context);
}

inline void run_block(Worker& worker, Block& b, dim3 index) {
  current_block = &b;
  blockIdx = index;
  b.worker = &worker;
  b.name += " block (" + std::to_string(index.x) + ", " + std::to_string(index.y) + ")";
  b.alive = b.threads;
  b.ready.assign(b.threads, 0);
  b.warps.resize(b.threads / kWarpSize);
  b.chunks.assign(b.smem_bytes / 16 + 1, Chunk{-1, -1, -1, -1, 0});
  std::memset(b.smem, 0xff, b.smem_bytes);
  worker.reserve(b.threads);
  for (int t = 0; t < b.threads; ++t) {
    Fiber& f = worker.fibers[t];
    f.tid = t;
    f.waiting = Sync::kNone;
    f.syncthreads_calls = 0;
    f.copies.clear();
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = worker.stacks[t]->begin();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
    push_ready(b, t);
  }
  swapcontext(&b.host, &take_ready(b).context);
  current_block = nullptr;
}

inline std::atomic<uint64_t>& launch_counter() {
  static std::atomic<uint64_t> n{0};
  return n;
}

// Runs body() as every thread of every block of the grid, the blocks spread over OS threads.
inline void run_grid(const std::string& kernel, dim3 grid, dim3 block_dim, size_t smem,
                     const std::function<void()>& body) {
  const long total = long{block_dim.x} * block_dim.y * block_dim.z;
  if (total <= 0 || total > kMaxThreads || block_dim.z > kMaxBlockZ || total % kWarpSize != 0) {
    fatal(kernel + ": block (" + std::to_string(block_dim.x) + ", " +
          std::to_string(block_dim.y) + ", " + std::to_string(block_dim.z) + ")");
  }
  const int threads = static_cast<int>(total);
  if (smem > kMaxSmem) fatal(kernel + ": " + std::to_string(smem) + " bytes of shared memory");
  if (grid.x > kMaxGridX || grid.y > kMaxGridY || grid.z != 1) fatal(kernel + ": grid too large");
  const uint64_t launch = ++launch_counter();
  const long blocks = static_cast<long>(grid.x) * grid.y;
  std::atomic<long> next{0};
  auto work = [&] {
    Worker worker;
    blockDim = block_dim;
    gridDim = grid;
    for (long i = next++; i < blocks; i = next++) {
      Block b;
      b.body = &body;
      b.threads = threads;
      b.name = kernel;
      b.smem_bytes = smem;
      b.smem = worker.smem.end() - (smem + 15) / 16 * 16;
      b.rng = (launch << 32 | static_cast<uint64_t>(i)) * 0x9e3779b97f4a7c15ull | 1;
      run_block(worker, b, dim3(i % grid.x, i / grid.x));
    }
  };
  const long workers = std::min<long>(blocks, std::max(1u, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  for (long i = 1; i < workers; ++i) pool.emplace_back(work);
  work();
  for (std::thread& t : pool) t.join();
}

// The demangled name of a function of the executable (linked with -rdynamic), else (internal
// linkage) its offset in the executable, for nm -C.
inline std::string function_name(const void* f) {
  Dl_info info;
  const bool found = dladdr(f, &info) != 0;
  if (found && info.dli_sname != nullptr) {
    int status = 0;
    char* name = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    const std::string result = status == 0 ? name : info.dli_sname;
    std::free(name);
    return result;
  }
  const auto* base = static_cast<const char*>(found ? info.dli_fbase : nullptr);
  char address[48];
  std::snprintf(address, sizeof address, "kernel at offset %#lx",
                static_cast<unsigned long>(static_cast<const char*>(f) - base));
  return address;
}

// The launcher of csrc/attention_launch.cuh.
struct Launch {
  template <typename... KernelArgs, typename... Args>
  void operator()(void (*kernel)(KernelArgs...), dim3 grid, int threads, size_t smem,
                  Args... args) const {
    if (grid.x == 0 || grid.y == 0) return;
    const std::string name = function_name(reinterpret_cast<const void*>(kernel));
    run_grid(name, grid, threads, smem, [&] { kernel(args...); });
  }
};

// The number of blocks of `threads` threads and `smem` bytes of dynamic shared memory an SM of
// the emulated device runs at once (registers are not modelled).
inline int blocks_per_sm(int threads, size_t smem) {
  if (threads <= 0) return 0;
  const int by_smem = static_cast<int>(kSmemPerSm / (smem + kSmemReservedPerBlock));
  return std::min({kMaxBlocksPerSm, kMaxThreadsPerSm / threads, by_smem});
}

}  // namespace cuda_emu

// ================================ CUDA runtime ===============================================

using cudaStream_t = struct CUstream_st*;  // ignored: launches run to completion in order
enum cudaError_t : int { cudaSuccess = 0 };
enum cudaDeviceAttr : int { cudaDevAttrMultiProcessorCount = 16 };

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (attr != cudaDevAttrMultiProcessorCount || device != 0) {
    cuda_emu::fatal("cudaDeviceGetAttribute: only the SM count of device 0 is emulated");
  }
  *value = cuda_emu::sm_count();
  return cudaSuccess;
}

template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int threads,
                                                          size_t smem) {
  *blocks = cuda_emu::blocks_per_sm(threads, smem);
  return cudaSuccess;
}

// ================================ CUDA built-ins =============================================

inline void __syncthreads() { cuda_emu::syncthreads(); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  cuda_emu::require_full_mask(mask);
  cuda_emu::warp_collective(cuda_emu::Sync::kSyncWarp, [](cuda_emu::WarpSync&) {});
}

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  cuda_emu::require_full_mask(mask);
  cuda_emu::WarpSync& w = cuda_emu::warp();
  const int l = cuda_emu::lane();
  w.value[l] = v;
  w.source[l] = (l ^ lane_mask) % cuda_emu::kWarpSize;
  cuda_emu::warp_collective(cuda_emu::Sync::kShfl, [](cuda_emu::WarpSync& w) {
    for (int i = 0; i < cuda_emu::kWarpSize; ++i) w.shfl[i] = w.value[w.source[i]];
  });
  return w.shfl[l];
}

// ================================ attention_ptx.cuh ==========================================

#define LK_DYNAMIC_SMEM(type, name) \
  type* const name = reinterpret_cast<type*>(cuda_emu::block().smem)

namespace lk::attn {

inline void cp_async_16(void* smem, const void* gmem, bool valid) {
  cuda_emu::cp_async(smem, gmem, valid);
}
inline void cp_async_commit() { cuda_emu::cp_async_commit(); }
inline void cp_async_wait_all() { cuda_emu::cp_async_wait(); }

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { cuda_emu::ldmatrix(r, smem, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  cuda_emu::ldmatrix(r, smem, true);
}

template <typename T>
struct Mma {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>);
  // c += a (16x16, row) * b (16x8, col), fp32 accumulators.
  static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    cuda_emu::mma<T>(c, a, b0, b1);
  }
  static uint32_t pack(float lo, float hi) {
    return uint32_t{T(lo).bits} | uint32_t{T(hi).bits} << 16;
  }
};

}  // namespace lk::attn

// ================================ cuda_launch.cuh ============================================

namespace lk {

// kernel<<<grid, block, 0, stream>>>(args...), run to completion; an empty grid is fatal (the
// GPU rejects it).
template <typename... KernelArgs, typename... Args>
void launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, cudaStream_t,
                   Args... args) {
  const std::string name = cuda_emu::function_name(reinterpret_cast<const void*>(kernel));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) cuda_emu::fatal(name + ": empty grid");
  cuda_emu::run_grid(name, grid, block, 0, [&] { kernel(args...); });
}

// Any amount up to the launch limit (kMaxSmem, checked at the launch) may be allowed.
template <typename... KernelArgs>
void allow_dynamic_smem(void (*)(KernelArgs...), size_t) {}

// kernel<<<grid, block, smem, stream>>>(args...) as launch_kernel.
template <typename... KernelArgs, typename... Args>
void launch_kernel_smem(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem,
                        cudaStream_t, Args... args) {
  const std::string name = cuda_emu::function_name(reinterpret_cast<const void*>(kernel));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) cuda_emu::fatal(name + ": empty grid");
  cuda_emu::run_grid(name, grid, block, smem, [&] { kernel(args...); });
}

}  // namespace lk
