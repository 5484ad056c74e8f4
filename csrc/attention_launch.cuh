// Launch plans of the attention kernels (no torch headers): which kernel configuration runs
// for a dtype and head dim, with which grid, block size and shared memory. Shared by
// attention_cuda.cu and the CPU emulator of tests/cuda_emulation, so that the emulator runs
// exactly the configurations the CUDA build launches. `launch` is a callable
// launch(kernel, grid, threads, smem_bytes, args...).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "attention_kernels.cuh"
#include "common.h"

namespace lk::attn {

// fp16/bf16 with D % 8 == 0 run on tensor cores (D padded to 64, 128 or 256 in shared memory),
// the backward up to D = 128; everything else runs the float32 SIMT kernels on float32 copies.
inline bool tensor_core_forward(bool is_16bit, int64_t head_dim) {
  return is_16bit && head_dim % 8 == 0;
}

inline bool tensor_core_backward(bool is_16bit, int64_t head_dim) {
  return tensor_core_forward(is_16bit, head_dim) && head_dim <= 128;
}

inline int tiles(int length, int block) { return (length + block - 1) / block; }

// ---- tensor cores (T = __half or __nv_bfloat16) ----

// Flash-decoding: group * q_len <= 32 query rows per kv head (<= 16 at D > 128).

// Fewest key tiles per split, most splits.
constexpr int kDecodeMinSplitTiles = 2, kDecodeMaxSplits = 128;

// Query rows per kv head, the rows flash-decoding takes them as (16 or 32).
inline int64_t decode_query_rows(const Params& p) { return int64_t{p.group} * p.q_len; }
inline int decode_rows(const Params& p) { return decode_query_rows(p) <= 16 ? 16 : 32; }

inline bool decode_forward(const Params& p) {
  return decode_query_rows(p) <= (p.head_dim <= 128 ? kDecodeMaxRows : 16);
}

// Warps of the decode kernel (16 keys each of a key tile) at this head dim.
inline int decode_warps(int64_t head_dim) { return head_dim <= 128 ? 4 : 2; }

// Decode blocks resident per SM on sm_90 (registers a thread / shared memory per block), 16 rows:
// HD 64: 118 / 39 KB (4 blocks); HD 128: 164 / 74 KB (3); HD 256: 204 with 2 warps / 76 KB (2);
// 32 rows: HD 64: 175 / 41 KB (2); HD 128: 238 / 78 KB (2).
inline int decode_blocks_per_sm(const Params& p) {
  if (decode_rows(p) == 16 && p.head_dim <= 128) return p.head_dim <= 64 ? 4 : 3;
  return 2;
}

// Keys some query row sees: [0, decode_keys) (the host twin of key_end(p, p.q_len)).
inline int64_t decode_keys(const Params& p) {
  if (!p.causal) return p.k_len;
  const int64_t end = p.q_len + p.causal_offset;
  return end < 0 ? 0 : (end > p.k_len ? p.k_len : end);
}

// The decode plan of a tensor-core forward, which the forward then follows: where flash-decoding
// applies (decode_forward), p.decode_rows, p.decode_splits and p.decode_split_tiles: as many
// splits per kv head as one wave of resident blocks holds (B * Hkv * splits <= SMs * blocks per
// SM), each split at least kDecodeMinSplitTiles key tiles, no split empty; else
// p.decode_splits = 0 (the forward kernel). Returns the floats of workspace the splits need
// (p.decode_o, then p.decode_lse; set_decode_workspace), 0 for none.
inline size_t plan_decode(Params& p) {
  p.decode_splits = 0;
  if (!decode_forward(p)) return 0;
  p.decode_rows = decode_rows(p);
  const int64_t key_tile = 16 * decode_warps(p.head_dim);
  const int64_t tiles = (decode_keys(p) + key_tile - 1) / key_tile;
  const int64_t kv_heads = int64_t{p.batch} * p.kv_heads;
  int64_t splits = int64_t{p.sm_count} * decode_blocks_per_sm(p) / kv_heads;
  splits = std::min<int64_t>({splits, tiles / kDecodeMinSplitTiles, kDecodeMaxSplits});
  splits = std::max<int64_t>(splits, 1);
  const int64_t split_tiles = std::max<int64_t>((tiles + splits - 1) / splits, 1);
  p.decode_split_tiles = static_cast<int>(split_tiles);
  p.decode_splits = static_cast<int>(std::max<int64_t>((tiles + split_tiles - 1) / split_tiles, 1));
  if (p.decode_splits == 1) return 0;
  return static_cast<size_t>(kv_heads) * p.decode_splits * p.decode_rows * (p.head_dim + 1);
}

// Points p.decode_o and p.decode_lse into the workspace plan_decode sized.
inline void set_decode_workspace(Params& p, float* workspace) {
  p.decode_o = workspace;
  p.decode_lse = workspace + int64_t{p.batch} * p.kv_heads * p.decode_splits * p.decode_rows *
                                 p.head_dim;
}

// The split grid, then (several splits) their merge. Shared memory: Q, two stages of K and V
// tiles; the warps' states reuse it at the end (NW x 16 MT rows of HD + 8 floats, two floats
// more per row: at most the Q and K/V tiles' bytes, (16 MT + 64 NW) (HD + 8) 2).
template <typename T, int HD, int NW, int MT, typename Launch>
void decode_tc(const Params& p, const Launch& launch) {
  constexpr int BN = 16 * NW, ROWS = 16 * MT;
  constexpr size_t smem = static_cast<size_t>(ROWS + 4 * BN) * Tile<HD>::kLd * sizeof(T);
  static_assert(NW * ROWS * ((HD + 8) + 2) * sizeof(float) <= smem);
  const unsigned kv_heads = static_cast<unsigned>(p.batch * p.kv_heads);
  launch(attention_decode_tc<T, HD, NW, MT>, dim3(kv_heads, p.decode_splits), NW * 32, smem, p);
  if (p.decode_splits > 1) {
    launch(attention_decode_combine<T>, dim3(kv_heads, 1), kDecodeCombineThreads,
           static_cast<size_t>(p.decode_rows) * p.decode_splits * sizeof(float), p);
  }
}

// Key tiles of 64 (4 warps) up to HD 128, of 32 (2 warps) at HD 256 (16 rows only); see
// decode_warps.
template <typename T, typename Launch>
void decode_tc_dispatch(const Params& p, const Launch& launch) {
  const bool two_tiles = p.decode_rows == 32;
  if (p.head_dim <= 64) {
    two_tiles ? decode_tc<T, 64, 4, 2>(p, launch) : decode_tc<T, 64, 4, 1>(p, launch);
  } else if (p.head_dim <= 128) {
    two_tiles ? decode_tc<T, 128, 4, 2>(p, launch) : decode_tc<T, 128, 4, 1>(p, launch);
  } else {
    decode_tc<T, 256, 2, 1>(p, launch);
  }
}

template <typename T, int HD, int BN, int NW, int MT, typename Launch>
void forward_tc(const Params& p, const Launch& launch) {
  constexpr int BM = 16 * MT * NW;
  // The Q tile, then two stages of K and V tiles.
  const size_t smem = static_cast<size_t>(BM + 4 * BN) * Tile<HD>::kLd * sizeof(T);
  launch(attention_forward_tc<T, HD, BN, NW, MT>, dim3(p.batch * p.heads, tiles(p.q_len, BM)),
         NW * 32, smem, p);
}

// sm_90 registers / shared memory per block (occupancy). p.warp_rows 16: HD 64: 148 / 45 KB
// (3 blocks of 4 warps per SM); HD 128: 213 / 102 KB (1 block of 8 warps). p.warp_rows 32 (two
// m-tiles per warp, half the K/V shared memory reads per mma): HD 64: 209 / 37 KB; HD 128:
// 249 / 70 KB (2 blocks of 4 warps each; BN 64 would spill). HD 256: 242 / 99 KB (2 blocks).
template <typename T, typename Launch>
void forward_tc_dispatch(const Params& p, const Launch& launch) {
  if (p.decode_splits > 0) return decode_tc_dispatch<T>(p, launch);  // plan_decode
  const bool two_tiles = p.warp_rows == 32;
  if (p.head_dim <= 64) {
    two_tiles ? forward_tc<T, 64, 32, 4, 2>(p, launch) : forward_tc<T, 64, 64, 4, 1>(p, launch);
  } else if (p.head_dim <= 128) {
    two_tiles ? forward_tc<T, 128, 32, 4, 2>(p, launch) : forward_tc<T, 128, 64, 8, 1>(p, launch);
  } else {
    forward_tc<T, 256, 32, 4, 1>(p, launch);
  }
}

// delta, then dK, dV: the K, V tiles, then two stages of Q, dO tiles and of the rows' lse, delta.
template <typename T, int HD, int BMQ, int NW, bool KV_REGS, typename Launch>
void backward_dkdv_tc(const Params& p, const Launch& launch) {
  constexpr int kWarpRows = 16 * NW;
  const int64_t rows = int64_t{p.batch} * p.heads * p.q_len;
  launch(attention_backward_delta<T>, dim3(static_cast<unsigned>(lk::ceil_div(rows, 8)), 1), 256,
         0, p, rows);
  const size_t smem = static_cast<size_t>(2 * kWarpRows + 4 * BMQ) * Tile<HD>::kLd * sizeof(T) +
                      4 * BMQ * sizeof(float);
  launch(attention_backward_dkdv_tc<T, HD, BMQ, NW, KV_REGS>,
         dim3(p.batch * p.kv_heads, tiles(p.k_len, kWarpRows)), NW * 32, smem, p);
}

// dQ: two stages of K, V tiles (Q, dO pass through them before the loop).
template <typename T, int HD, int BN, int NW, int MT, typename Launch>
void backward_dq_tc(const Params& p, const Launch& launch) {
  constexpr int BM = 16 * MT * NW;
  const size_t smem = static_cast<size_t>(4 * BN) * Tile<HD>::kLd * sizeof(T);
  launch(attention_backward_dq_tc<T, HD, BN, NW, MT>,
         dim3(p.batch * p.heads, tiles(p.q_len, BM)), NW * 32, smem, p);
}

// sm_90 registers / shared memory per block, 4 warps (blocks per SM): dK/dV HD 64 (K, V in
// registers): 236 / 55 KB (2); HD 128: 248 / 69 KB (2). dQ HD 64: 167 / 36 KB (3), with
// p.warp_rows 32 (two m-tiles per warp, 128 rows a block) 255 / 36 KB (2); HD 128: 255 / 68 KB
// (2).
template <typename T, typename Launch>
void backward_tc_dispatch(const Params& p, const Launch& launch) {
  if (p.head_dim <= 64) {
    backward_dkdv_tc<T, 64, 64, 4, true>(p, launch);
    p.warp_rows == 32 ? backward_dq_tc<T, 64, 64, 4, 2>(p, launch)
                      : backward_dq_tc<T, 64, 64, 4, 1>(p, launch);
  } else {
    backward_dkdv_tc<T, 128, 32, 4, false>(p, launch);
    backward_dq_tc<T, 128, 64, 4, 1>(p, launch);
  }
}

// ---- SIMT float32 ----

// D <= 128 uses 32 columns per thread, D <= 256 64.
constexpr int kColsSmall = 32, kColsLarge = 64;

inline size_t simt_tile_floats(const Params& p) { return size_t{kSimtRows} * (p.head_dim + 1); }

template <int COLS, typename Launch>
void forward_simt(const Params& p, const Launch& launch) {
  const size_t smem = (3 * simt_tile_floats(p) + kSimtRows * 33) * sizeof(float);
  launch(attention_forward_simt<COLS>, dim3(p.batch * p.heads, tiles(p.q_len, kSimtRows)),
         kSimtThreads, smem, p);
}

template <int COLS, typename Launch>
void backward_simt(const Params& p, const Launch& launch) {
  const int64_t rows = int64_t{p.batch} * p.heads * p.q_len;
  constexpr int kDeltaThreads = 128;
  launch(attention_backward_delta_simt<kDeltaThreads>,
         dim3(static_cast<unsigned>(lk::ceil_div(rows, kDeltaThreads)), 1), kDeltaThreads, 0, p,
         rows);
  const size_t smem_dkdv =
      (4 * simt_tile_floats(p) + 2 * kSimtRows * 33 + 2 * kSimtRows) * sizeof(float);
  launch(attention_backward_dkdv_simt<COLS>,
         dim3(p.batch * p.kv_heads, tiles(p.k_len, kSimtRows)), kSimtThreads, smem_dkdv, p);
  const size_t smem_dq = (4 * simt_tile_floats(p) + kSimtRows * 33) * sizeof(float);
  launch(attention_backward_dq_simt<COLS>, dim3(p.batch * p.heads, tiles(p.q_len, kSimtRows)),
         kSimtThreads, smem_dq, p);
}

// ---- entry points: T = __half / __nv_bfloat16 on tensor cores, T = float on SIMT ----

// out, lse of p.
template <typename T, typename Launch>
void launch_forward(const Params& p, const Launch& launch) {
  if constexpr (std::is_same_v<T, float>) {
    p.head_dim <= 4 * kColsSmall ? forward_simt<kColsSmall>(p, launch)
                                 : forward_simt<kColsLarge>(p, launch);
  } else {
    forward_tc_dispatch<T>(p, launch);
  }
}

// delta, dq, dk, dv of p.
template <typename T, typename Launch>
void launch_backward(const Params& p, const Launch& launch) {
  if constexpr (std::is_same_v<T, float>) {
    p.head_dim <= 4 * kColsSmall ? backward_simt<kColsSmall>(p, launch)
                                 : backward_simt<kColsLarge>(p, launch);
  } else {
    backward_tc_dispatch<T>(p, launch);
  }
}

}  // namespace lk::attn
