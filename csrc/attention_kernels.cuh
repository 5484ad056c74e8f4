// Device code of the CUDA attention (no torch headers). Included through attention_launch.cuh
// by attention_cuda.cu, and by the CPU emulator of tests/cuda_emulation, which defines
// LK_CUDA_EMULATION and provides the primitives of attention_ptx.cuh.
//
// Tensor-core path (fp16/bf16, sm_80+): FlashAttention-2 with mma.sync.m16n8k16 (fp32
// accumulation), ldmatrix from padded shared memory tiles filled by cp.async. Each warp owns 16
// rows of its block's tile (the forward and dQ optionally 32: two m-tiles sharing each K/V
// fragment); a row's softmax statistics live in the 4 lanes of a quad. At most 32 query rows per
// kv head (decode) run flash-decoding: keys split over blocks and warps, then merged.
// SIMT path (float32, and the fallback of everything else): 4 threads per row, 32 rows per
// block, tiles of 32 keys in shared memory.
//
// Conventions: scores are kept in the log2 domain (s * scale * log2(e) + mask * log2(e));
// lse (natural log) is +inf for a row that sees no key, so every recomputed P of that row is 0.
// Query i sees key j iff j < Lk and (not causal or j <= i + causal_offset).
#pragma once

#include <cstdint>

#include "common.h"
#ifndef LK_CUDA_EMULATION
#include "attention_ptx.cuh"  // LK_DYNAMIC_SMEM, cp_async_*, ldmatrix_x4(_trans), Mma<T>
#endif

namespace lk::attn {

enum MaskDType : int { kMaskFloat32 = 0, kMaskFloat16 = 1, kMaskBFloat16 = 2 };

// Everything a kernel needs; strides in elements. dout/out/dq/dk/dv and lse/delta are
// contiguous: (B, H, Lq, D), (B, Hkv, Lk, D), (B, H, Lq).
struct Params {
  const void* q;
  const void* k;
  const void* v;
  const void* mask;  // nullptr or additive (B, H, Lq, Lk) with strides mask_stride
  int mask_dtype;
  int64_t q_stride[3], k_stride[3], v_stride[3];  // batch, head, row
  int64_t mask_stride[4];
  void* out;          // forward output
  float* lse;         // forward output / backward input (natural log)
  const void* dout;   // backward
  const void* o;      // backward: the forward output
  float* delta;       // backward: rowsum(dout * out)
  void* dq;
  void* dk;
  void* dv;
  int batch, heads, kv_heads, q_len, k_len, head_dim, group;
  bool causal;
  int64_t causal_offset;
  float scale, scale_log2;
  int warp_rows;  // host only: query rows per warp of the tensor-core forward and dQ (16 / 32)
  int sm_count;   // host only: streaming multiprocessors (the decode split plan)
  // Flash-decoding (attention_decode_tc): splits of decode_split_tiles key tiles each, for
  // decode_rows (16 or 32) query rows per kv head; with several, the splits' normalized O
  // (B * Hkv, splits, decode_rows, D) and log2-domain lse (B * Hkv, splits, decode_rows) in float32
  // workspaces.
  int decode_splits, decode_split_tiles, decode_rows;
  float* decode_o;
  float* decode_lse;
};

// Row i of query head h of batch b (likewise keys/values of kv head hk): strided tensors.
template <typename T>
__device__ __forceinline__ const T* q_row(const Params& p, int b, int h, int i) {
  return static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i * p.q_stride[2];
}
template <typename T>
__device__ __forceinline__ const T* k_row(const Params& p, int b, int hk, int j) {
  return static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1] + j * p.k_stride[2];
}
template <typename T>
__device__ __forceinline__ const T* v_row(const Params& p, int b, int hk, int j) {
  return static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] + j * p.v_stride[2];
}

// Row i of head bh (= b * H + h) of a contiguous (B, H, L, D) tensor.
template <typename T>
__device__ __forceinline__ T* head_row(T* base, int64_t bh, int length, int i, int d) {
  return base + (bh * length + i) * d;
}

__device__ __forceinline__ float load_mask(const Params& p, int b, int h, int i, int j) {
  const int64_t idx = b * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2] +
                      j * p.mask_stride[3];
  switch (p.mask_dtype) {
    case kMaskFloat16:
      return __half2float(static_cast<const __half*>(p.mask)[idx]);
    case kMaskBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p.mask)[idx]);
    default:
      return static_cast<const float*>(p.mask)[idx];
  }
}

// The score of query i and key j in the log2 domain, -inf where j is hidden.
__device__ __forceinline__ float masked_score(const Params& p, float s, int b, int h, int i,
                                              int j) {
  if (j >= p.k_len || (p.causal && j > i + p.causal_offset)) return -INFINITY;
  s *= p.scale_log2;
  if (p.mask != nullptr && i < p.q_len) s += mask_log2(load_mask(p, b, h, i, j));
  return s;
}

// Keys [0, key_end) are visible to some query in [q0, q1).
__device__ __forceinline__ int key_end(const Params& p, int q1) {
  if (!p.causal) return p.k_len;
  const int64_t end = q1 + p.causal_offset;
  return static_cast<int>(end < 0 ? 0 : (end > p.k_len ? p.k_len : end));
}

// First query that sees key k0.
__device__ __forceinline__ int first_query(const Params& p, int k0) {
  if (!p.causal) return 0;
  const int64_t first = k0 - p.causal_offset;
  return static_cast<int>(first < 0 ? 0 : (first > p.q_len ? p.q_len : first));
}

// The lse of a row in the log2 domain (rounded once from the float lse).
__device__ __forceinline__ float lse_log2(float lse) {
  return static_cast<float>(static_cast<double>(lse) * 1.4426950408889634);
}

// The natural lse of a row from its log2-domain max m and sum l of 2^(s - m) (rounded once),
// +inf for an empty row (l == 0).
__device__ __forceinline__ float lse_of(float m, float l) {
  if (l == 0.0f) return INFINITY;
  return static_cast<float>((static_cast<double>(m) + log2(static_cast<double>(l))) *
                            0.6931471805599453);
}

// ================================ tensor-core helpers ========================================

// Shared memory tile of ROWS x HD 16-bit values, rows padded by 8 elements (16 bytes) so that
// the 8 row addresses of an ldmatrix hit 8 different bank groups.
template <int HD>
struct Tile {
  static constexpr int kLd = HD + 8;
};

// Copies rows [0, rows) x columns [0, d) of a row-major slab (row stride `stride`) into the
// ROWS x HD shared tile, zero filling the rest. Needs d % 8 == 0 and 16-byte aligned rows.
template <int ROWS, int HD, int THREADS, typename T>
__device__ __forceinline__ void load_tile_async(T* tile, const T* src, int64_t stride, int rows,
                                                int d) {
  constexpr int kChunks = HD / 8;
  for (int c = threadIdx.x; c < ROWS * kChunks; c += THREADS) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool valid = r < rows && col < d;
    cp_async_16(tile + r * Tile<HD>::kLd + col, valid ? src + r * stride + col : src, valid);
  }
}

// Writes the 16 rows x HD tile a warp staged in shared memory to dst rows [0, rows) (row
// stride d, contiguous), 16 bytes per store.
template <int HD, typename T>
__device__ __forceinline__ void store_warp_rows(const T* tile, T* dst, int rows, int d) {
  constexpr int kChunks = HD / 8;
  const int lane = threadIdx.x % 32;
  for (int c = lane; c < 16 * kChunks; c += 32) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    if (r < rows && col < d) {
      *reinterpret_cast<uint4*>(dst + static_cast<int64_t>(r) * d + col) =
          *reinterpret_cast<const uint4*>(tile + r * Tile<HD>::kLd + col);
    }
  }
}

// Stages a warp's 16 x HD fp32 accumulator fragment (times `factor` per row half) as T into
// its rows of a shared tile.
template <int HD, typename T>
__device__ __forceinline__ void stage_fragment(T* tile, const float (&acc)[HD / 8][4],
                                               const float (&factor)[2]) {
  const int lane = threadIdx.x % 32;
  const int r = lane / 4, c = (lane % 4) * 2;
#pragma unroll
  for (int nt = 0; nt < HD / 8; ++nt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      *reinterpret_cast<uint32_t*>(tile + (r + 8 * half) * Tile<HD>::kLd + nt * 8 + c) =
          Mma<T>::pack(acc[nt][2 * half] * factor[half], acc[nt][2 * half + 1] * factor[half]);
    }
  }
}

// A warp's rows in MT m-tiles of 16: an mma operand or accumulator of m-tile mt is [mt]. The
// *_mt helpers load each B fragment once for all MT m-tiles (MT = 2 halves the shared memory
// read per mma); the others are their MT = 1 forms.
template <int MT, int N>
using Acc = float[MT][N][4];
template <int MT>
using AFrag = uint32_t[MT][4];

template <int N>
__device__ __forceinline__ Acc<1, N>& one_tile(float (&acc)[N][4]) {
  return reinterpret_cast<Acc<1, N>&>(acc);
}
// The A fragments (KSTEPS k-steps of 16 columns) of the MT m-tiles of 16 rows from `a`, a
// warp's rows of a shared tile: af[ks][mt].
template <int MT, int KSTEPS, int HD, typename T>
__device__ __forceinline__ void load_a_fragments_mt(uint32_t (&af)[KSTEPS][MT][4], const T* a) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      ldmatrix_x4(af[ks][mt],
                  a + (mt * 16 + lane % 16) * Tile<HD>::kLd + ks * 16 + (lane / 16) * 8);
    }
  }
}

// The A fragments (16 x 16*KSTEPS as KSTEPS k-steps of 16) of 16 rows `a` of a shared tile.
template <int KSTEPS, int HD, typename T>
__device__ __forceinline__ void load_a_fragments(uint32_t (&af)[KSTEPS][4], const T* a) {
  load_a_fragments_mt<1, KSTEPS, HD>(reinterpret_cast<uint32_t(&)[KSTEPS][1][4]>(af), a);
}

// acc[mt] (16 x 8*N) += A[mt] (16 x 16, k-step ks) times B^T over columns [16*ks, 16*ks + 16),
// where B is N*8 rows of a shared tile `b` (row = output column).
template <int MT, int N, int HD, typename T>
__device__ __forceinline__ void mma_step_x_rows_mt(Acc<MT, N>& acc, const AFrag<MT>& af,
                                                   const T* b, int ks) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int np = 0; np < N / 2; ++np) {
    uint32_t bf[4];
    ldmatrix_x4(bf, b + (np * 16 + lane % 8 + (lane / 16) * 8) * Tile<HD>::kLd + ks * 16 +
                        ((lane / 8) % 2) * 8);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      Mma<T>::run(acc[mt][2 * np], af[mt], bf[0], bf[1]);
      Mma<T>::run(acc[mt][2 * np + 1], af[mt], bf[2], bf[3]);
    }
  }
}

// acc[mt] (16 x 8*N) += A[mt] (16 x 16*KSTEPS: m-tile mt of the warp's rows `a` of a shared
// tile) times B^T, B as in mma_step_x_rows_mt, over columns [0, 16*KSTEPS).
template <int MT, int N, int KSTEPS, int HD, typename T>
__device__ __forceinline__ void mma_rows_x_rows_mt(Acc<MT, N>& acc, const T* a, const T* b) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int ks = 0; ks < KSTEPS; ++ks) {
    uint32_t af[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      ldmatrix_x4(af[mt], a + (mt * 16 + lane % 16) * Tile<HD>::kLd + ks * 16 + (lane / 16) * 8);
    }
    mma_step_x_rows_mt<MT, N, HD>(acc, af, b, ks);
  }
}

// As mma_rows_x_rows_mt with A held in registers (load_a_fragments_mt).
template <int MT, int N, int KSTEPS, int HD, typename T>
__device__ __forceinline__ void mma_frags_x_rows_mt(Acc<MT, N>& acc,
                                                    const uint32_t (&af)[KSTEPS][MT][4],
                                                    const T* b) {
#pragma unroll
  for (int ks = 0; ks < KSTEPS; ++ks) mma_step_x_rows_mt<MT, N, HD>(acc, af[ks], b, ks);
}

// acc[mt] (16 x HD) += A[mt] (16 x 16*KSTEPS, register fragments a[mt][ks]) times B (16*KSTEPS
// rows x HD of a shared tile `b`, row-major).
template <int MT, int KSTEPS, int HD, typename T>
__device__ __forceinline__ void mma_regs_x_tile_mt(Acc<MT, HD / 8>& acc,
                                                   const uint32_t (&a)[MT][KSTEPS][4],
                                                   const T* b) {
  constexpr int kLd = Tile<HD>::kLd;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int ks = 0; ks < KSTEPS; ++ks) {
#pragma unroll
    for (int dp = 0; dp < HD / 16; ++dp) {
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, b + (ks * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kLd + dp * 16 +
                                (lane / 16) * 8);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        Mma<T>::run(acc[mt][2 * dp], a[mt][ks], bf[0], bf[1]);
        Mma<T>::run(acc[mt][2 * dp + 1], a[mt][ks], bf[2], bf[3]);
      }
    }
  }
}

// acc (16 x 8*N) += A (16 x 16*KSTEPS, the warp's rows `a` of a shared tile) times B^T where B
// is N*8 rows of a shared tile `b` (row = output column), over columns [0, 16*KSTEPS).
template <int N, int KSTEPS, int HD, typename T>
__device__ __forceinline__ void mma_rows_x_rows(float (&acc)[N][4], const T* a, const T* b) {
  mma_rows_x_rows_mt<1, N, KSTEPS, HD>(one_tile(acc), a, b);
}

// As mma_rows_x_rows with A held in registers (load_a_fragments).
template <int N, int KSTEPS, int HD, typename T>
__device__ __forceinline__ void mma_frags_x_rows(float (&acc)[N][4],
                                                 const uint32_t (&af)[KSTEPS][4], const T* b) {
  mma_frags_x_rows_mt<1, N, KSTEPS, HD>(
      one_tile(acc), reinterpret_cast<const uint32_t(&)[KSTEPS][1][4]>(af), b);
}

// acc (16 x HD) += A (16 x 16*KSTEPS, register fragments) times B (16*KSTEPS rows x HD of a
// shared tile `b`, row-major).
template <int KSTEPS, int HD, typename T>
__device__ __forceinline__ void mma_regs_x_tile(float (&acc)[HD / 8][4],
                                                const uint32_t (&a)[KSTEPS][4], const T* b) {
  mma_regs_x_tile_mt<1, KSTEPS, HD>(one_tile(acc),
                                    reinterpret_cast<const uint32_t(&)[1][KSTEPS][4]>(a), b);
}

// The A fragments (16 x 8N as N/2 k-steps of 16) of a 16 x 8N fp32 accumulator.
template <int N, typename T>
__device__ __forceinline__ void to_a_fragments(uint32_t (&a)[N / 2][4], const float (&c)[N][4]) {
#pragma unroll
  for (int ks = 0; ks < N / 2; ++ks) {
    a[ks][0] = Mma<T>::pack(c[2 * ks][0], c[2 * ks][1]);
    a[ks][1] = Mma<T>::pack(c[2 * ks][2], c[2 * ks][3]);
    a[ks][2] = Mma<T>::pack(c[2 * ks + 1][0], c[2 * ks + 1][1]);
    a[ks][3] = Mma<T>::pack(c[2 * ks + 1][2], c[2 * ks + 1][3]);
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
}

// Accumulator element e of n-tile nt sits at row (lane/4 + 8*(e/2)), column nt*8 + 2*(lane%4) +
// e%2 of the warp's 16 x 8N fragment.
__device__ __forceinline__ int frag_row(int e) { return (threadIdx.x % 32) / 4 + 8 * (e / 2); }
__device__ __forceinline__ int frag_col(int nt, int e) {
  return nt * 8 + 2 * (threadIdx.x % 4) + e % 2;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// One key tile's online-softmax step for a warp's 16 rows: the log2-domain scores s (NT n-tiles)
// become P = 2^(s - new max); the running max, this lane's share of the running sum (summed over
// the quad at the end) and the O fragment are rescaled by 2^(old max - new max).
template <int NT, int HD>
__device__ __forceinline__ void online_softmax(float (&s)[NT][4], float (&o)[HD / 8][4],
                                               float (&row_max)[2], float (&row_sum)[2]) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float m = row_max[half];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) m = fmaxf(m, fmaxf(s[nt][2 * half], s[nt][2 * half + 1]));
    m = quad_max(m);
    const float shift = m == -INFINITY ? 0.0f : m;
    const float alpha = exp2f(row_max[half] - shift);
    row_max[half] = m;
    float sum = 0.0f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 2 * half; e < 2 * half + 2; ++e) {
        s[nt][e] = exp2f(s[nt][e] - shift);
        sum += s[nt][e];
      }
    }
    row_sum[half] = row_sum[half] * alpha + sum;
#pragma unroll
    for (int dt = 0; dt < HD / 8; ++dt) {
      o[dt][2 * half] *= alpha;
      o[dt][2 * half + 1] *= alpha;
    }
  }
}

// ================================ tensor-core forward ========================================

// One block's query tile in the forward and dQ grids (gridDim = (B * H, query tiles)). Blocks
// start in launch order (x fastest); block `linear` of it takes query tile linear % gridDim.y of
// head linear / gridDim.y, so the blocks in flight cover few heads and read the same K, V from
// L2; within a head the longest causal rows start first.
template <typename T>
struct QueryTile {
  int bh, b, h;      // batch * heads + head, batch, head
  int m0, q_rows;    // first query row, rows in the tile
  int n_tiles;       // key tiles of BN that any row of the tile sees
  const T* k;        // key 0 of the head's K / V head (B, Hkv, Lk, D)
  const T* v;
};

template <typename T, int BM, int BN>
__device__ __forceinline__ QueryTile<T> query_tile(const Params& p) {
  const int64_t linear = int64_t{blockIdx.y} * gridDim.x + blockIdx.x;
  QueryTile<T> tile;
  tile.bh = static_cast<int>(linear / gridDim.y);
  tile.b = tile.bh / p.heads;
  tile.h = tile.bh % p.heads;
  tile.m0 = (gridDim.y - 1 - static_cast<int>(linear % gridDim.y)) * BM;
  tile.q_rows = min(BM, p.q_len - tile.m0);
  tile.n_tiles = (key_end(p, tile.m0 + tile.q_rows) + BN - 1) / BN;
  tile.k = k_row<T>(p, tile.b, tile.h / p.group, 0);
  tile.v = v_row<T>(p, tile.b, tile.h / p.group, 0);
  return tile;
}

// Key tile t of the tile's head (BN rows of K and of V) into stage t % 2 of s_k and s_v
// (2 x BN x HD each; cp.async, not committed).
template <int BN, int HD, int THREADS, typename T>
__device__ __forceinline__ void load_kv_stage(T* s_k, T* s_v, const QueryTile<T>& tile,
                                              const Params& p, int t) {
  const int n0 = t * BN, rows = min(BN, p.k_len - n0), at = (t % 2) * BN * Tile<HD>::kLd;
  load_tile_async<BN, HD, THREADS>(s_k + at, tile.k + n0 * p.k_stride[2], p.k_stride[2], rows,
                                   p.head_dim);
  load_tile_async<BN, HD, THREADS>(s_v + at, tile.v + n0 * p.v_stride[2], p.v_stride[2], rows,
                                   p.head_dim);
}

// Grid (B * H, query tiles), remapped below; NW warps of 16 * MT query rows each, BM = 16 * MT *
// NW rows x BN keys per step (MT = 2: each K, V fragment read from shared memory feeds two
// m-tiles). K and V are double-buffered (stage t % 2 holds key tile t): tile t + 1 loads while
// tile t is computed, one __syncthreads per tile. When MT * HD <= 128 a warp keeps its Q rows as
// mma A fragments in registers for the whole key loop (MT * HD / 4 registers); beyond that they
// would not fit beside the fp32 O fragments (MT * HD / 2 registers), so those paths re-read them
// from shared memory per key tile.
template <typename T, int HD, int BN, int NW, int MT>
__global__ void __launch_bounds__(NW * 32) attention_forward_tc(const Params p) {
  constexpr int kWarpRows = 16 * MT, BM = kWarpRows * NW, kThreads = NW * 32;
  constexpr int kLd = Tile<HD>::kLd, NT = BN / 8;
  constexpr bool kQInRegs = MT * HD <= 128;
  LK_DYNAMIC_SMEM(unsigned char, smem);
  T* s_q = reinterpret_cast<T*>(smem);  // BM x HD
  T* s_k = s_q + BM * kLd;              // 2 stages x BN x HD
  T* s_v = s_k + 2 * BN * kLd;          // 2 stages x BN x HD

  const QueryTile<T> tile = query_tile<T, BM, BN>(p);
  const int bh = tile.bh, b = tile.b, h = tile.h, m0 = tile.m0, q_rows = tile.q_rows;
  const int n_tiles = tile.n_tiles, warp = threadIdx.x / 32, d = p.head_dim;
  auto load_kv = [&](int t) { load_kv_stage<BN, HD, kThreads>(s_k, s_v, tile, p, t); };

  load_tile_async<BM, HD, kThreads>(s_q, q_row<T>(p, b, h, m0), p.q_stride[2], q_rows, d);
  if (n_tiles > 0) load_kv(0);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();  // Q and key tile 0 are in

  const T* q_warp = s_q + warp * kWarpRows * kLd;
  uint32_t qf[kQInRegs ? HD / 16 : 1][MT][4];
  if constexpr (kQInRegs) load_a_fragments_mt<MT, HD / 16, HD>(qf, q_warp);
  float o[MT][HD / 8][4];
  float row_max[MT][2], row_sum[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    zero(o[mt]);
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.0f;
  }
  const int row_base = m0 + warp * kWarpRows;

  for (int t = 0; t < n_tiles; ++t) {
    const int n0 = t * BN;
    const T* k_tile = s_k + (t % 2) * BN * kLd;
    const T* v_tile = s_v + (t % 2) * BN * kLd;
    if (t + 1 < n_tiles) load_kv(t + 1);  // into the stage every warp finished at tile t - 1
    cp_async_commit();

    float s[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) zero(s[mt]);
    if constexpr (kQInRegs) {
      mma_frags_x_rows_mt<MT, NT, HD / 16, HD>(s, qf, k_tile);
    } else {
      mma_rows_x_rows_mt<MT, NT, HD / 16, HD>(s, q_warp, k_tile);
    }

    const bool need_mask = p.mask != nullptr || n0 + BN > p.k_len ||
                           (p.causal && n0 + BN - 1 > m0 + p.causal_offset);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if (need_mask) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[mt][nt][e] = masked_score(p, s[mt][nt][e], b, h, row_base + mt * 16 + frag_row(e),
                                        n0 + frag_col(nt, e));
          }
        }
      } else {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][nt][e] *= p.scale_log2;
        }
      }

      online_softmax<NT, HD>(s[mt], o[mt], row_max[mt], row_sum[mt]);
    }
    uint32_t pa[MT][NT / 2][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) to_a_fragments<NT, T>(pa[mt], s[mt]);
    mma_regs_x_tile_mt<MT, NT / 2, HD>(o, pa, v_tile);

    cp_async_wait_all();
    __syncthreads();  // key tile t + 1 is in; every warp is done with stage t % 2
  }

  // Every cp.async has landed (waited before the last __syncthreads); the warp's Q rows are read
  // by it alone: it stages its O rows there.
  T* stage = s_q + warp * kWarpRows * kLd;
  T* out = head_row(static_cast<T*>(p.out), bh, p.q_len, row_base, d);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    float inv[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float sum = quad_sum(row_sum[mt][half]);
      inv[half] = sum > 0.0f ? 1.0f / sum : 0.0f;
      const int i = row_base + mt * 16 + frag_row(2 * half);
      if (threadIdx.x % 4 == 0 && i < p.q_len) {
        p.lse[static_cast<int64_t>(bh) * p.q_len + i] = lse_of(row_max[mt][half], sum);
      }
    }
    stage_fragment<HD>(stage + mt * 16 * kLd, o[mt], inv);
  }
  __syncwarp();
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    store_warp_rows<HD>(stage + mt * 16 * kLd, out + mt * 16 * d,
                        min(16, p.q_len - row_base - mt * 16), d);
  }
}

// ================================ tensor-core decode =========================================

// Flash-decoding, for few query rows per kv head (group * q_len <= 32: one or a few new tokens
// against a KV cache). A block takes the group's query rows of one kv head as MT m-tiles of 16
// (row r = query r % q_len of the group's head r / q_len; rows past group * q_len are padding)
// and one split of the key tiles (grid (B * Hkv, splits)); each of its NW warps takes 16 keys of
// every BN = 16 * NW key tile for all the rows. K and V are read once per kv head, not once per
// query head, and the keys are spread over splits x warps, so a decode step fills the GPU. The
// warps' softmax states merge in shared memory; with one split the block writes out and lse,
// else the split's normalized O and log2-domain lse go to the workspace (p.decode_o,
// p.decode_lse: p.decode_rows = 16 * MT rows per split) that attention_decode_combine merges.
constexpr int kDecodeMaxRows = 32;
constexpr int kDecodeCombineThreads = 128;

// A decode m-tile row: query i of head h; rows past group * q_len are padding (valid false).
struct DecodeRow {
  int h, i;
  bool valid;
};

__device__ __forceinline__ DecodeRow decode_row(const Params& p, int hk, int r) {
  return {hk * p.group + r / p.q_len, r % p.q_len, r < p.group * p.q_len};
}

// The index of a decode row's (b, h, i) in (B, H, Lq): its lse, and its out row (times D).
__device__ __forceinline__ int64_t decode_out_row(const Params& p, int b, const DecodeRow& row) {
  return (int64_t{b} * p.heads + row.h) * p.q_len + row.i;
}

// Row r of split `split` of kv head bk (= b * Hkv + hk) in the decode workspace.
__device__ __forceinline__ int64_t decode_split_row(const Params& p, int bk, int split, int r) {
  return (int64_t{bk} * p.decode_splits + split) * p.decode_rows + r;
}

// The group's query rows of kv head hk of batch b into the ROWS x HD shared tile (zeros past
// group * q_len and past d; cp.async, not committed).
template <int ROWS, int HD, int THREADS, typename T>
__device__ __forceinline__ void load_decode_queries(T* tile, const Params& p, int b, int hk) {
  constexpr int kChunks = HD / 8;
  for (int c = threadIdx.x; c < ROWS * kChunks; c += THREADS) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const DecodeRow row = decode_row(p, hk, r);
    const bool valid = row.valid && col < p.head_dim;
    const T* src = valid ? q_row<T>(p, b, row.h, row.i) + col : static_cast<const T*>(p.q);
    cp_async_16(tile + r * Tile<HD>::kLd + col, src, valid);
  }
}

// Merges the NW warps' softmax states of the block's ROWS rows (log2-domain max m_w, sum l_w and
// unnormalized O_w in shared memory, row w * ROWS + r): m = max m_w, l = sum l_w 2^(m_w - m),
// O = sum O_w 2^(m_w - m) / l; writes O and lse to out (one split) or to the workspace.
template <typename T, int HD, int NW, int ROWS>
__device__ __forceinline__ void decode_merge_warps(const Params& p, float* s_o, float* s_max,
                                                   float* s_weight, int b, int hk) {
  constexpr int kOLd = HD + 8;
  const int bk = blockIdx.x, split = blockIdx.y, rows = p.group * p.q_len, d = p.head_dim;
  if (threadIdx.x < rows) {
    const int r = threadIdx.x;
    float m = -INFINITY, l = 0.0f;
    for (int w = 0; w < NW; ++w) m = fmaxf(m, s_max[w * ROWS + r]);
    float scale[NW];
    for (int w = 0; w < NW; ++w) {
      scale[w] = m == -INFINITY ? 0.0f : exp2f(s_max[w * ROWS + r] - m);
      l += s_weight[w * ROWS + r] * scale[w];
    }
    for (int w = 0; w < NW; ++w) s_weight[w * ROWS + r] = l > 0.0f ? scale[w] / l : 0.0f;
    if (p.decode_splits == 1) {
      p.lse[decode_out_row(p, b, decode_row(p, hk, r))] = lse_of(m, l);
    } else {
      p.decode_lse[decode_split_row(p, bk, split, r)] = l == 0.0f ? -INFINITY : m + log2f(l);
    }
  }
  __syncthreads();  // every row's warp weights are in s_weight
  for (int idx = threadIdx.x; idx < rows * d; idx += NW * 32) {
    const int r = idx / d, c = idx % d;
    float v = 0.0f;
    for (int w = 0; w < NW; ++w) v += s_weight[w * ROWS + r] * s_o[(w * ROWS + r) * kOLd + c];
    if (p.decode_splits == 1) {
      static_cast<T*>(p.out)[decode_out_row(p, b, decode_row(p, hk, r)) * d + c] = T(v);
    } else {
      p.decode_o[decode_split_row(p, bk, split, r) * d + c] = v;
    }
  }
}

// Grid (B * Hkv, splits): split y takes key tiles [y * p.decode_split_tiles, ...) of BN = 16 * NW
// keys, double-buffered as in the forward (tile t + 1 loads while tile t is computed, one
// __syncthreads per tile); warp w computes S = Q K_w^T for its MT m-tiles, the online softmax
// and O += P V_w over keys [16 w, 16 w + 16) of each tile, each K and V fragment read once for
// all the m-tiles. Q stays in registers as mma A fragments when MT * HD <= 128.
template <typename T, int HD, int NW, int MT>
__global__ void __launch_bounds__(NW * 32) attention_decode_tc(const Params p) {
  constexpr int BN = 16 * NW, ROWS = 16 * MT, kThreads = NW * 32, kLd = Tile<HD>::kLd;
  constexpr int kOLd = HD + 8;
  constexpr bool kQInRegs = MT * HD <= 128;
  LK_DYNAMIC_SMEM(unsigned char, smem);
  T* s_q = reinterpret_cast<T*>(smem);  // ROWS x HD
  T* s_k = s_q + ROWS * kLd;            // 2 stages x BN x HD
  T* s_v = s_k + 2 * BN * kLd;          // 2 stages x BN x HD

  const int bk = blockIdx.x, b = bk / p.kv_heads, hk = bk % p.kv_heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, d = p.head_dim;
  const int all_tiles = (key_end(p, p.q_len) + BN - 1) / BN;
  const int t0 = blockIdx.y * p.decode_split_tiles;
  const int t1 = min(all_tiles, t0 + p.decode_split_tiles);
  const T* k_head = k_row<T>(p, b, hk, 0);
  const T* v_head = v_row<T>(p, b, hk, 0);
  auto load_kv = [&](int t) {
    const int n0 = t * BN, keys = min(BN, p.k_len - n0), at = ((t - t0) % 2) * BN * kLd;
    load_tile_async<BN, HD, kThreads>(s_k + at, k_head + n0 * p.k_stride[2], p.k_stride[2], keys,
                                      d);
    load_tile_async<BN, HD, kThreads>(s_v + at, v_head + n0 * p.v_stride[2], p.v_stride[2], keys,
                                      d);
  };

  load_decode_queries<ROWS, HD, kThreads>(s_q, p, b, hk);
  if (t0 < t1) load_kv(t0);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();  // Q and key tile t0 are in

  uint32_t qf[kQInRegs ? HD / 16 : 1][MT][4];
  if constexpr (kQInRegs) load_a_fragments_mt<MT, HD / 16, HD>(qf, s_q);
  float o[MT][HD / 8][4];
  float row_max[MT][2], row_sum[MT][2];
  DecodeRow row[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    zero(o[mt]);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      row_max[mt][half] = -INFINITY;
      row_sum[mt][half] = 0.0f;
      row[mt][half] = decode_row(p, hk, mt * 16 + frag_row(2 * half));
    }
  }

  for (int t = t0; t < t1; ++t) {
    const int n0 = t * BN + warp * 16;  // the warp's first key
    const int at = ((t - t0) % 2) * BN * kLd + warp * 16 * kLd;
    if (t + 1 < t1) load_kv(t + 1);  // into the stage every warp finished at tile t - 1
    cp_async_commit();

    float s[MT][2][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) zero(s[mt]);
    if constexpr (kQInRegs) {
      mma_frags_x_rows_mt<MT, 2, HD / 16, HD>(s, qf, s_k + at);
    } else {
      mma_rows_x_rows_mt<MT, 2, HD / 16, HD>(s, s_q, s_k + at);
    }
    // Query 0 sees the fewest keys; padding rows (zero queries) need no mask.
    const bool need_mask =
        p.mask != nullptr || n0 + 16 > p.k_len || (p.causal && n0 + 15 > p.causal_offset);
    uint32_t pa[MT][1][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const DecodeRow& r = row[mt][e / 2];
          if (!need_mask) {
            s[mt][nt][e] *= p.scale_log2;
          } else {
            s[mt][nt][e] = r.valid ? masked_score(p, s[mt][nt][e], b, r.h, r.i,
                                                  n0 + frag_col(nt, e))
                                   : -INFINITY;
          }
        }
      }
      online_softmax<2, HD>(s[mt], o[mt], row_max[mt], row_sum[mt]);
      to_a_fragments<2, T>(pa[mt], s[mt]);
    }
    mma_regs_x_tile_mt<MT, 1, HD>(o, pa, s_v + at);

    cp_async_wait_all();
    __syncthreads();  // key tile t + 1 is in; every warp is done with stage (t - t0) % 2
  }

  // Every cp.async has landed; once every warp is past its last read of Q, K and V (the loop's
  // last barrier, or this one when the split has no tile), shared memory from its start takes
  // the warps' states (NW x ROWS rows of O at a stride of HD + 8 floats, then the rows' max and
  // sum).
  __syncthreads();
  float* s_o = reinterpret_cast<float*>(smem);
  float* s_max = s_o + NW * ROWS * kOLd;
  float* s_sum = s_max + NW * ROWS;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float sum = quad_sum(row_sum[mt][half]);
      const int r = warp * ROWS + mt * 16 + frag_row(2 * half);
      if (lane % 4 == 0) {
        s_max[r] = row_max[mt][half];
        s_sum[r] = sum;
      }
    }
#pragma unroll
    for (int nt = 0; nt < HD / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s_o[(warp * ROWS + mt * 16 + frag_row(e)) * kOLd + frag_col(nt, e)] = o[mt][nt][e];
      }
    }
  }
  __syncthreads();  // every warp's state is in
  decode_merge_warps<T, HD, NW, ROWS>(p, s_o, s_max, s_sum, b, hk);
}

// Merges the splits of attention_decode_tc, row by row: lse = log2 sum_s 2^lse_s (rounded once to
// the natural log; +inf when no split saw a key, NaN when one holds NaN, whose row's out is NaN
// then too, as in the forward kernel) and out = sum_s 2^(lse_s - lse) O_s. Grid
// (B * Hkv); dynamic shared memory holds the rows x splits weights.
template <typename T>
__global__ void __launch_bounds__(kDecodeCombineThreads) attention_decode_combine(const Params p) {
  LK_DYNAMIC_SMEM(float, s_weight);  // rows x splits
  const int bk = blockIdx.x, b = bk / p.kv_heads, hk = bk % p.kv_heads;
  const int splits = p.decode_splits, rows = p.group * p.q_len, d = p.head_dim;
  for (int r = threadIdx.x; r < rows; r += kDecodeCombineThreads) {
    float m = -INFINITY, l = 0.0f;
    for (int s = 0; s < splits; ++s) m = fmaxf(m, p.decode_lse[decode_split_row(p, bk, s, r)]);
    for (int s = 0; s < splits; ++s) {
      const float lse2 = p.decode_lse[decode_split_row(p, bk, s, r)];  // NaN stays NaN
      const float w = m == -INFINITY && lse2 == -INFINITY ? 0.0f : exp2f(lse2 - m);
      s_weight[r * splits + s] = w;
      l += w;
    }
    for (int s = 0; s < splits; ++s) {
      s_weight[r * splits + s] = l > 0.0f ? s_weight[r * splits + s] / l : 0.0f;
    }
    p.lse[decode_out_row(p, b, decode_row(p, hk, r))] = lse_of(m, l);
  }
  __syncthreads();  // every row's split weights are in
  for (int idx = threadIdx.x; idx < rows * d; idx += kDecodeCombineThreads) {
    const int r = idx / d, c = idx % d;
    float v = 0.0f;
    for (int s = 0; s < splits; ++s) {
      v += s_weight[r * splits + s] * p.decode_o[decode_split_row(p, bk, s, r) * d + c];
    }
    static_cast<T*>(p.out)[decode_out_row(p, b, decode_row(p, hk, r)) * d + c] = T(v);
  }
}

// ================================ tensor-core backward =======================================

// delta[row] = sum_d dout[row, d] * o[row, d] (one warp per row).
template <typename T>
__global__ void attention_backward_delta(const Params p, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const T* dout = static_cast<const T*>(p.dout) + row * p.head_dim;
  const T* o = static_cast<const T*>(p.o) + row * p.head_dim;
  float acc = 0.0f;
  for (int c = threadIdx.x % 32; c < p.head_dim; c += 32) {
    acc += static_cast<float>(dout[c]) * static_cast<float>(o[c]);
  }
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (threadIdx.x % 32 == 0) p.delta[row] = acc;
}

// dK, dV of BN = 16 * NW keys (grid (B * Hkv, key tiles), remapped below); one loop over the
// query tiles (BMQ rows) of the group's query heads, head by head. Each warp owns 16 keys:
// S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q.
// Q, dO and the rows' lse, delta are double-buffered (stage t % 2 holds query tile t): tile t + 1
// loads (Q, dO by cp.async, lse, delta into registers, stored after the compute) while tile t is
// computed, one __syncthreads per tile. With KV_REGS a warp keeps its K and V rows as mma A
// fragments in registers for the whole loop (HD / 2 registers); at HD = 128 even the K ones
// alone spill beside the two 16 x 128 fp32 dK, dV fragments (128 registers), so that path re-reads
// them from shared memory per query tile.
template <typename T, int HD, int BMQ, int NW, bool KV_REGS>
__global__ void __launch_bounds__(NW * 32) attention_backward_dkdv_tc(const Params p) {
  constexpr int BN = 16 * NW, kThreads = NW * 32, kLd = Tile<HD>::kLd, NQ = BMQ / 8;
  static_assert(BMQ <= kThreads, "one thread per query row loads lse, delta");
  LK_DYNAMIC_SMEM(unsigned char, smem);
  T* s_k = reinterpret_cast<T*>(smem);  // BN x HD
  T* s_v = s_k + BN * kLd;              // BN x HD
  T* s_q = s_v + BN * kLd;              // 2 stages x BMQ x HD
  T* s_do = s_q + 2 * BMQ * kLd;        // 2 stages x BMQ x HD
  float* s_lse = reinterpret_cast<float*>(s_do + 2 * BMQ * kLd);  // 2 stages x BMQ, log2 domain
  float* s_delta = s_lse + 2 * BMQ;                                // 2 stages x BMQ

  // Block `linear` (launch order) takes key tile linear % gridDim.y of kv head
  // linear / gridDim.y: the blocks in flight cover few kv heads and read the same Q, dO from L2;
  // within a head the first keys (the most causal query tiles) start first.
  const int64_t linear = int64_t{blockIdx.y} * gridDim.x + blockIdx.x;
  const int bhk = static_cast<int>(linear / gridDim.y), b = bhk / p.kv_heads;
  const int hk = bhk % p.kv_heads;
  const int n0 = static_cast<int>(linear % gridDim.y) * BN;
  const int warp = threadIdx.x / 32, d = p.head_dim;
  const int key_rows = min(BN, p.k_len - n0);
  const int m_start = first_query(p, n0) / BMQ * BMQ;
  const int q_tiles = (p.q_len - m_start + BMQ - 1) / BMQ;  // per query head
  const int n_tiles = p.group * q_tiles;
  // Query tile t: head hk * group + t / q_tiles, rows from m_start + (t % q_tiles) * BMQ.
  auto tile_head = [&](int t) { return hk * p.group + t / q_tiles; };
  auto tile_row = [&](int t) { return m_start + t % q_tiles * BMQ; };
  // Q, dO of query tile t into stage t % 2 (cp.async, not committed).
  auto load_q_do = [&](int t) {
    const int h = tile_head(t), m0 = tile_row(t), rows = min(BMQ, p.q_len - m0);
    const int64_t bh = int64_t{b} * p.heads + h;
    const int at = (t % 2) * BMQ * kLd;
    load_tile_async<BMQ, HD, kThreads>(s_q + at, q_row<T>(p, b, h, m0), p.q_stride[2], rows, d);
    load_tile_async<BMQ, HD, kThreads>(
        s_do + at, head_row(static_cast<const T*>(p.dout), bh, p.q_len, m0, d), d, rows, d);
  };
  // lse (log2 domain; +inf past Lq, so P = 0) and delta of row threadIdx.x of query tile t.
  float next_lse = INFINITY, next_delta = 0.0f;
  auto load_stats = [&](int t) {
    const int i = tile_row(t) + threadIdx.x;
    const int64_t row = (int64_t{b} * p.heads + tile_head(t)) * p.q_len + i;
    next_lse = i < p.q_len ? lse_log2(p.lse[row]) : INFINITY;
    next_delta = i < p.q_len ? p.delta[row] : 0.0f;
  };
  auto store_stats = [&](int t) {
    s_lse[(t % 2) * BMQ + threadIdx.x] = next_lse;
    s_delta[(t % 2) * BMQ + threadIdx.x] = next_delta;
  };

  load_tile_async<BN, HD, kThreads>(s_k, k_row<T>(p, b, hk, n0), p.k_stride[2], key_rows, d);
  load_tile_async<BN, HD, kThreads>(s_v, v_row<T>(p, b, hk, n0), p.v_stride[2], key_rows, d);
  if (n_tiles > 0) load_q_do(0);
  cp_async_commit();
  if (n_tiles > 0 && threadIdx.x < BMQ) {
    load_stats(0);
    store_stats(0);
  }
  cp_async_wait_all();
  __syncthreads();  // K, V and query tile 0 are in

  const T* k_warp = s_k + warp * 16 * kLd;
  const T* v_warp = s_v + warp * 16 * kLd;
  uint32_t kf[KV_REGS ? HD / 16 : 1][4], vf[KV_REGS ? HD / 16 : 1][4];
  if constexpr (KV_REGS) {
    load_a_fragments<HD / 16, HD>(kf, k_warp);
    load_a_fragments<HD / 16, HD>(vf, v_warp);
  }
  float dk[HD / 8][4], dv[HD / 8][4];
  zero(dk);
  zero(dv);
  const int key_base = n0 + warp * 16;

  for (int t = 0; t < n_tiles; ++t) {
    const int h = tile_head(t), m0 = tile_row(t);
    const T* q_tile = s_q + (t % 2) * BMQ * kLd;
    const T* do_tile = s_do + (t % 2) * BMQ * kLd;
    const float* lse_tile = s_lse + (t % 2) * BMQ;
    const float* delta_tile = s_delta + (t % 2) * BMQ;
    const bool prefetch = t + 1 < n_tiles;
    if (prefetch) load_q_do(t + 1);  // into the stage every warp finished at tile t - 1
    cp_async_commit();
    if (prefetch && threadIdx.x < BMQ) load_stats(t + 1);

    float pt[NQ][4];  // P^T: 16 keys x BMQ queries
    zero(pt);
    if constexpr (KV_REGS) {
      mma_frags_x_rows<NQ, HD / 16, HD>(pt, kf, q_tile);
    } else {
      mma_rows_x_rows<NQ, HD / 16, HD>(pt, k_warp, q_tile);
    }
    const bool need_mask =
        p.mask != nullptr || (p.causal && n0 + BN - 1 > m0 + p.causal_offset);
#pragma unroll
    for (int nt = 0; nt < NQ; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = frag_col(nt, e);
        const float x = need_mask
                            ? masked_score(p, pt[nt][e], b, h, m0 + col, key_base + frag_row(e))
                            : pt[nt][e] * p.scale_log2;
        pt[nt][e] = exp2f(x - lse_tile[col]);
      }
    }
    uint32_t pa[NQ / 2][4];
    to_a_fragments<NQ, T>(pa, pt);
    mma_regs_x_tile<NQ / 2, HD>(dv, pa, do_tile);  // dV += P^T dO

    float dpt[NQ][4];  // dP^T = V dO^T
    zero(dpt);
    if constexpr (KV_REGS) {
      mma_frags_x_rows<NQ, HD / 16, HD>(dpt, vf, do_tile);
    } else {
      mma_rows_x_rows<NQ, HD / 16, HD>(dpt, v_warp, do_tile);
    }
#pragma unroll
    for (int nt = 0; nt < NQ; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        dpt[nt][e] = pt[nt][e] * (dpt[nt][e] - delta_tile[frag_col(nt, e)]);
      }
    }
    to_a_fragments<NQ, T>(pa, dpt);
    mma_regs_x_tile<NQ / 2, HD>(dk, pa, q_tile);  // dK += dS^T Q

    if (prefetch && threadIdx.x < BMQ) store_stats(t + 1);
    cp_async_wait_all();
    __syncthreads();  // query tile t + 1 is in; every warp is done with stage t % 2
  }

  // Every cp.async has landed (waited before the last __syncthreads); a warp's K, V rows are
  // read by it alone.
  const float scale_dk[2] = {p.scale, p.scale}, one[2] = {1.0f, 1.0f};
  T* stage_k = s_k + warp * 16 * kLd;
  T* stage_v = s_v + warp * 16 * kLd;
  stage_fragment<HD>(stage_k, dk, scale_dk);
  stage_fragment<HD>(stage_v, dv, one);
  __syncwarp();
  const int64_t offset = (static_cast<int64_t>(bhk) * p.k_len + key_base) * d;
  const int rows = min(16, p.k_len - key_base);
  store_warp_rows<HD>(stage_k, static_cast<T*>(p.dk) + offset, rows, d);
  store_warp_rows<HD>(stage_v, static_cast<T*>(p.dv) + offset, rows, d);
}

// dQ of BM = 16 * MT * NW query rows (NW warps of 16 * MT rows; grid (B * H, query tiles),
// remapped as in the forward) over key tiles of BN: S = Q K^T, P, dP = dO V^T,
// dS = P (dP - delta), dQ += dS K. K and V are double-buffered (stage t % 2 holds key tile t):
// tile t + 1 loads while tile t is computed, one __syncthreads per tile. Each warp keeps its Q
// and dO rows as mma A fragments in registers (MT * HD / 2 registers), so Q and dO only pass
// through shared memory before the loop: in the K and V stage 1 that key tile 1 fills later
// (BM <= BN), or with MT = 2 (BM = 2 * BN) in both K and V stages, key tile 0 loading after.
template <typename T, int HD, int BN, int NW, int MT>
__global__ void __launch_bounds__(NW * 32) attention_backward_dq_tc(const Params p) {
  constexpr int kWarpRows = 16 * MT, BM = kWarpRows * NW, kThreads = NW * 32;
  constexpr int kLd = Tile<HD>::kLd, NT = BN / 8;
  constexpr bool kStage1 = BM <= BN;  // else Q and dO fill both stages of K and V
  static_assert(kStage1 || BM <= 2 * BN, "Q and dO pass through the K, V stages");
  LK_DYNAMIC_SMEM(unsigned char, smem);
  T* s_k = reinterpret_cast<T*>(smem);         // 2 stages x BN x HD
  T* s_v = s_k + 2 * BN * kLd;                 // 2 stages x BN x HD
  T* s_q = kStage1 ? s_k + BN * kLd : s_k;     // BM x HD, before the loop
  T* s_do = kStage1 ? s_v + BN * kLd : s_v;    // BM x HD, before the loop

  const QueryTile<T> tile = query_tile<T, BM, BN>(p);
  const int bh = tile.bh, b = tile.b, h = tile.h, m0 = tile.m0, q_rows = tile.q_rows;
  const int n_tiles = tile.n_tiles, warp = threadIdx.x / 32, d = p.head_dim;
  auto load_kv = [&](int t) { load_kv_stage<BN, HD, kThreads>(s_k, s_v, tile, p, t); };

  load_tile_async<BM, HD, kThreads>(s_q, q_row<T>(p, b, h, m0), p.q_stride[2], q_rows, d);
  load_tile_async<BM, HD, kThreads>(
      s_do, head_row(static_cast<const T*>(p.dout), bh, p.q_len, m0, d), d, q_rows, d);
  if (kStage1 && n_tiles > 0) load_kv(0);
  cp_async_commit();

  const int row_base = m0 + warp * kWarpRows;
  float lse2[MT][2], delta[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = row_base + mt * 16 + frag_row(2 * half);
      const int64_t row = static_cast<int64_t>(bh) * p.q_len + i;
      lse2[mt][half] = i < p.q_len ? lse_log2(p.lse[row]) : INFINITY;
      delta[mt][half] = i < p.q_len ? p.delta[row] : 0.0f;
    }
  }
  cp_async_wait_all();
  __syncthreads();  // Q, dO (and, in stage 1, key tile 0) are in
  uint32_t qf[HD / 16][MT][4], dof[HD / 16][MT][4];
  load_a_fragments_mt<MT, HD / 16, HD>(qf, s_q + warp * kWarpRows * kLd);
  load_a_fragments_mt<MT, HD / 16, HD>(dof, s_do + warp * kWarpRows * kLd);
  __syncthreads();  // every warp holds its Q, dO fragments: the stages are free for K, V
  if constexpr (!kStage1) {
    if (n_tiles > 0) load_kv(0);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();  // key tile 0 is in
  }

  float dq[MT][HD / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) zero(dq[mt]);
  for (int t = 0; t < n_tiles; ++t) {
    const int n0 = t * BN;
    const T* k_tile = s_k + (t % 2) * BN * kLd;
    const T* v_tile = s_v + (t % 2) * BN * kLd;
    if (t + 1 < n_tiles) load_kv(t + 1);  // into the stage every warp finished at tile t - 1
    cp_async_commit();

    const bool need_mask = p.mask != nullptr || n0 + BN > p.k_len ||
                           (p.causal && n0 + BN - 1 > m0 + p.causal_offset);
    // dS in chunks of NC n-tiles (keys [8 * NC * c, 8 * NC * (c + 1)) of the tile), so that only
    // one chunk of S and dP is live beside the Q, dO fragments and dQ. With MT = 2 each chunk's
    // dS is also added to dQ before the next (the same k order as one product over the tile);
    // with MT = 1 the tile's dS is added at once (fewer registers there).
    constexpr int NC = NT / (2 * MT) >= 2 ? NT / (2 * MT) : 2;
    constexpr bool kPerChunk = MT > 1;
    uint32_t ds[MT][kPerChunk ? NC / 2 : NT / 2][4];
#pragma unroll
    for (int c = 0; c < NT / NC; ++c) {
      float s[MT][NC][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) zero(s[mt]);
      mma_frags_x_rows_mt<MT, NC, HD / 16, HD>(s, qf, k_tile + c * NC * 8 * kLd);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < NC; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = row_base + mt * 16 + frag_row(e), j = n0 + frag_col(c * NC + nt, e);
            const float x = need_mask ? masked_score(p, s[mt][nt][e], b, h, i, j)
                                      : s[mt][nt][e] * p.scale_log2;
            s[mt][nt][e] = exp2f(x - lse2[mt][e / 2]);
          }
        }
      }
      float dp[MT][NC][4];  // dP = dO V^T
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) zero(dp[mt]);
      mma_frags_x_rows_mt<MT, NC, HD / 16, HD>(dp, dof, v_tile + c * NC * 8 * kLd);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < NC; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            dp[mt][nt][e] = s[mt][nt][e] * (dp[mt][nt][e] - delta[mt][e / 2]);
          }
        }
        to_a_fragments<NC, T>(
            *reinterpret_cast<uint32_t(*)[NC / 2][4]>(ds[mt][kPerChunk ? 0 : c * NC / 2]),
            dp[mt]);
      }
      if constexpr (kPerChunk) {
        mma_regs_x_tile_mt<MT, NC / 2, HD>(dq, ds, k_tile + c * NC * 8 * kLd);  // dQ += dS K
      }
    }
    if constexpr (!kPerChunk) mma_regs_x_tile_mt<MT, NT / 2, HD>(dq, ds, k_tile);  // dQ += dS K

    cp_async_wait_all();
    __syncthreads();  // key tile t + 1 is in; every warp is done with stage t % 2
  }

  // Every cp.async has landed and every warp is past its last read of the K stages (the last
  // __syncthreads); the warp stages its dQ rows where its Q rows were.
  const float scale[2] = {p.scale, p.scale};
  T* stage = s_q + warp * kWarpRows * kLd;
  T* dst = head_row(static_cast<T*>(p.dq), bh, p.q_len, row_base, d);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) stage_fragment<HD>(stage + mt * 16 * kLd, dq[mt], scale);
  __syncwarp();
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    store_warp_rows<HD>(stage + mt * 16 * kLd, dst + mt * 16 * d,
                        min(16, p.q_len - row_base - mt * 16), d);
  }
}

// ================================ SIMT float32 path ==========================================
//
// 128 threads = 32 rows x 4 threads; thread `sub` of a row owns columns sub + 4 * c, c < COLS
// (D <= 4 * COLS). Tiles of 32 rows live in shared memory with a row stride of D + 1 floats.
// Every dot product runs over d = 0, 1, ..., D-1 with fmaf from 0, in the delta kernel too, so
// that dP - delta is exactly 0 for a row that attends to a single key.

constexpr int kSimtRows = 32;
constexpr int kSimtThreads = 128;

__device__ __forceinline__ float dot_seq(const float* a, const float* b, int d) {
  float acc = 0.0f;
  for (int c = 0; c < d; ++c) acc = fmaf(a[c], b[c], acc);
  return acc;
}

// rows [0, rows) of a float (L, D) slab into a 32 x D shared tile (row stride ld), zeros after.
__device__ __forceinline__ void load_rows_f32(float* tile, int ld, const float* src,
                                              int64_t stride, int rows, int d) {
  for (int idx = threadIdx.x; idx < kSimtRows * d; idx += blockDim.x) {
    const int r = idx / d, c = idx % d;
    tile[r * ld + c] = r < rows ? src[r * stride + c] : 0.0f;
  }
}

template <int COLS>
__global__ void __launch_bounds__(kSimtThreads) attention_forward_simt(const Params p) {
  LK_DYNAMIC_SMEM(float, fsmem);
  const int d = p.head_dim, ld = d + 1;
  float* s_q = fsmem;                      // 32 x ld
  float* s_k = s_q + kSimtRows * ld;       // 32 x ld
  float* s_v = s_k + kSimtRows * ld;       // 32 x ld
  float* s_p = s_v + kSimtRows * ld;       // 32 x 33

  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads, hk = h / p.group;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * kSimtRows;
  const int r = threadIdx.x / 4, sub = threadIdx.x % 4, i = m0 + r;
  const int q_rows = min(kSimtRows, p.q_len - m0);
  const float* k = k_row<float>(p, b, hk, 0);
  const float* v = v_row<float>(p, b, hk, 0);
  load_rows_f32(s_q, ld, q_row<float>(p, b, h, m0), p.q_stride[2], q_rows, d);

  float o[COLS];
#pragma unroll
  for (int c = 0; c < COLS; ++c) o[c] = 0.0f;
  float row_max = -INFINITY, row_sum = 0.0f;
  const int n_end = key_end(p, m0 + q_rows);
  for (int n0 = 0; n0 < n_end; n0 += kSimtRows) {
    const int key_rows = min(kSimtRows, p.k_len - n0);
    __syncthreads();  // everyone is done with the previous K, V tiles
    load_rows_f32(s_k, ld, k + n0 * p.k_stride[2], p.k_stride[2], key_rows, d);
    load_rows_f32(s_v, ld, v + n0 * p.v_stride[2], p.v_stride[2], key_rows, d);
    __syncthreads();
    float s[kSimtRows / 4];
    float m = row_max;
#pragma unroll
    for (int jj = 0; jj < kSimtRows / 4; ++jj) {
      const int j = sub + 4 * jj;
      s[jj] = masked_score(p, dot_seq(s_q + r * ld, s_k + j * ld, d), b, h, i, n0 + j);
      m = fmaxf(m, s[jj]);
    }
    m = quad_max(m);
    const float shift = m == -INFINITY ? 0.0f : m;
    const float alpha = exp2f(row_max - shift);
    row_max = m;
    float sum = 0.0f;
#pragma unroll
    for (int jj = 0; jj < kSimtRows / 4; ++jj) {
      const float pj = exp2f(s[jj] - shift);
      s_p[r * 33 + sub + 4 * jj] = pj;
      sum += pj;
    }
    row_sum = row_sum * alpha + quad_sum(sum);
    __syncwarp();
#pragma unroll
    for (int c = 0; c < COLS; ++c) {
      const int col = sub + 4 * c;
      if (col < d) {
        float acc = o[c] * alpha;
        for (int j = 0; j < kSimtRows; ++j) acc = fmaf(s_p[r * 33 + j], s_v[j * ld + col], acc);
        o[c] = acc;
      }
    }
  }
  if (i >= p.q_len) return;
  const int64_t row = static_cast<int64_t>(bh) * p.q_len + i;
  const float inv = row_sum > 0.0f ? 1.0f / row_sum : 0.0f;
#pragma unroll
  for (int c = 0; c < COLS; ++c) {
    const int col = sub + 4 * c;
    if (col < d) static_cast<float*>(p.out)[row * d + col] = o[c] * inv;
  }
  if (sub == 0) p.lse[row] = lse_of(row_max, row_sum);
}

// delta[row] = dot_seq(dout[row], o[row]) (one thread per row, blocks of THREADS, float32).
template <int THREADS>
__global__ void __launch_bounds__(THREADS) attention_backward_delta_simt(const Params p,
                                                                         int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const int d = p.head_dim;
  p.delta[row] = dot_seq(static_cast<const float*>(p.dout) + row * d,
                         static_cast<const float*>(p.o) + row * d, d);
}

template <int COLS>
__global__ void __launch_bounds__(kSimtThreads) attention_backward_dq_simt(const Params p) {
  LK_DYNAMIC_SMEM(float, fsmem);
  const int d = p.head_dim, ld = d + 1;
  float* s_q = fsmem;                  // 32 x ld
  float* s_do = s_q + kSimtRows * ld;  // 32 x ld
  float* s_k = s_do + kSimtRows * ld;  // 32 x ld
  float* s_v = s_k + kSimtRows * ld;   // 32 x ld
  float* s_ds = s_v + kSimtRows * ld;  // 32 x 33

  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads, hk = h / p.group;
  const int m0 = (gridDim.y - 1 - blockIdx.y) * kSimtRows;
  const int r = threadIdx.x / 4, sub = threadIdx.x % 4, i = m0 + r;
  const int q_rows = min(kSimtRows, p.q_len - m0);
  const int64_t row = static_cast<int64_t>(bh) * p.q_len + i;
  const float* k = k_row<float>(p, b, hk, 0);
  const float* v = v_row<float>(p, b, hk, 0);
  load_rows_f32(s_q, ld, q_row<float>(p, b, h, m0), p.q_stride[2], q_rows, d);
  load_rows_f32(s_do, ld, head_row(static_cast<const float*>(p.dout), bh, p.q_len, m0, d), d,
                q_rows, d);
  const float lse2 = i < p.q_len ? lse_log2(p.lse[row]) : INFINITY;
  const float delta = i < p.q_len ? p.delta[row] : 0.0f;

  float dq[COLS];
#pragma unroll
  for (int c = 0; c < COLS; ++c) dq[c] = 0.0f;
  const int n_end = key_end(p, m0 + q_rows);
  for (int n0 = 0; n0 < n_end; n0 += kSimtRows) {
    const int key_rows = min(kSimtRows, p.k_len - n0);
    __syncthreads();
    load_rows_f32(s_k, ld, k + n0 * p.k_stride[2], p.k_stride[2], key_rows, d);
    load_rows_f32(s_v, ld, v + n0 * p.v_stride[2], p.v_stride[2], key_rows, d);
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < kSimtRows / 4; ++jj) {
      const int j = sub + 4 * jj;
      const float x = masked_score(p, dot_seq(s_q + r * ld, s_k + j * ld, d), b, h, i, n0 + j);
      const float pj = exp2f(x - lse2);
      const float dp = dot_seq(s_do + r * ld, s_v + j * ld, d);
      s_ds[r * 33 + j] = pj * (dp - delta);
    }
    __syncwarp();
#pragma unroll
    for (int c = 0; c < COLS; ++c) {
      const int col = sub + 4 * c;
      if (col < d) {
        float acc = dq[c];
        for (int j = 0; j < kSimtRows; ++j) acc = fmaf(s_ds[r * 33 + j], s_k[j * ld + col], acc);
        dq[c] = acc;
      }
    }
  }
  if (i >= p.q_len) return;
#pragma unroll
  for (int c = 0; c < COLS; ++c) {
    const int col = sub + 4 * c;
    if (col < d) static_cast<float*>(p.dq)[row * d + col] = dq[c] * p.scale;
  }
}

// dK, dV of 32 keys (4 threads per key) over the group's query heads and query tiles of 32.
template <int COLS>
__global__ void __launch_bounds__(kSimtThreads) attention_backward_dkdv_simt(const Params p) {
  LK_DYNAMIC_SMEM(float, fsmem);
  const int d = p.head_dim, ld = d + 1;
  float* s_k = fsmem;                   // 32 x ld
  float* s_v = s_k + kSimtRows * ld;    // 32 x ld
  float* s_q = s_v + kSimtRows * ld;    // 32 x ld
  float* s_do = s_q + kSimtRows * ld;   // 32 x ld
  float* s_p = s_do + kSimtRows * ld;   // 32 keys x 33: P^T
  float* s_ds = s_p + kSimtRows * 33;   // 32 keys x 33: dS^T
  float* s_lse = s_ds + kSimtRows * 33; // 32, log2 domain
  float* s_delta = s_lse + kSimtRows;   // 32

  const int bhk = blockIdx.x, b = bhk / p.kv_heads, hk = bhk % p.kv_heads;
  const int n0 = blockIdx.y * kSimtRows;
  const int r = threadIdx.x / 4, sub = threadIdx.x % 4, j = n0 + r;
  const int key_rows = min(kSimtRows, p.k_len - n0);
  load_rows_f32(s_k, ld, k_row<float>(p, b, hk, n0), p.k_stride[2], key_rows, d);
  load_rows_f32(s_v, ld, v_row<float>(p, b, hk, n0), p.v_stride[2], key_rows, d);

  float dk[COLS], dv[COLS];
#pragma unroll
  for (int c = 0; c < COLS; ++c) dk[c] = dv[c] = 0.0f;
  const int m_start = first_query(p, n0) / kSimtRows * kSimtRows;
  for (int h = hk * p.group; h < (hk + 1) * p.group; ++h) {
    const int64_t bh = static_cast<int64_t>(b) * p.heads + h;
    for (int m0 = m_start; m0 < p.q_len; m0 += kSimtRows) {
      const int q_rows = min(kSimtRows, p.q_len - m0);
      __syncthreads();
      load_rows_f32(s_q, ld, q_row<float>(p, b, h, m0), p.q_stride[2], q_rows, d);
      load_rows_f32(s_do, ld, head_row(static_cast<const float*>(p.dout), bh, p.q_len, m0, d), d,
                    q_rows, d);
      for (int t = threadIdx.x; t < kSimtRows; t += blockDim.x) {
        s_lse[t] = t < q_rows ? lse_log2(p.lse[bh * p.q_len + m0 + t]) : INFINITY;
        s_delta[t] = t < q_rows ? p.delta[bh * p.q_len + m0 + t] : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int ii = 0; ii < kSimtRows / 4; ++ii) {
        const int qi = sub + 4 * ii;
        const float x = masked_score(p, dot_seq(s_q + qi * ld, s_k + r * ld, d), b, h, m0 + qi, j);
        const float pij = exp2f(x - s_lse[qi]);
        const float dp = dot_seq(s_do + qi * ld, s_v + r * ld, d);
        s_p[r * 33 + qi] = pij;
        s_ds[r * 33 + qi] = pij * (dp - s_delta[qi]);
      }
      __syncwarp();
#pragma unroll
      for (int c = 0; c < COLS; ++c) {
        const int col = sub + 4 * c;
        if (col < d) {
          float acc_v = dv[c], acc_k = dk[c];
          for (int qi = 0; qi < kSimtRows; ++qi) {
            acc_v = fmaf(s_p[r * 33 + qi], s_do[qi * ld + col], acc_v);
            acc_k = fmaf(s_ds[r * 33 + qi], s_q[qi * ld + col], acc_k);
          }
          dv[c] = acc_v;
          dk[c] = acc_k;
        }
      }
    }
  }
  if (j >= p.k_len) return;
  const int64_t offset = (static_cast<int64_t>(bhk) * p.k_len + j) * d;
#pragma unroll
  for (int c = 0; c < COLS; ++c) {
    const int col = sub + 4 * c;
    if (col < d) {
      static_cast<float*>(p.dk)[offset + col] = dk[c] * p.scale;
      static_cast<float*>(p.dv)[offset + col] = dv[c];
    }
  }
}

}  // namespace lk::attn
