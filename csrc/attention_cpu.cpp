// C++ CPU attention: the FlashAttention-2 algorithm on tiles, forward and backward.
//
// Forward, per (batch, head, query tile): S = Q K^T * scale + mask over key tiles, online
// softmax (running max m and sum l per row, log2 domain), O += P V; out = O / l and
// lse = m + log(l) (+inf for a row that sees no key, which makes every recomputed P zero).
// Backward: delta = rowsum(dO * O); P = exp(S - lse); dP = dO V^T; dS = P * (dP - delta);
// dQ = dS K * scale, dK = dS^T Q * scale and dV = P^T dO. With enough (batch, kv head) pairs
// for the threads, one pass: a task per pair loops over its key tiles and, per tile, over the
// group's query heads and tiles, and accumulates their dQ in float32. Otherwise two passes that
// split the work finer: dQ over query tiles, dK and dV over key tiles (each recomputing P and
// dS). GQA without copies, no atomics: every output element is written by one task in a fixed
// order, so the backward is deterministic.
// Tiles are converted to float32 buffers; the tile products go through BLAS (sgemm) when torch
// has one, and the softmax rows through vector code cloned for AVX2/AVX-512. O(L) memory.
// dP and delta come from one dot-product routine, so a row that attends to a single key
// (O == V_j) gets dP - delta == 0 exactly and zero dq/dk, as in exact arithmetic.
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "attention_checks.h"
#include "common.h"

namespace {

using lk::attn::Sizes;

constexpr float kInf = std::numeric_limits<float>::infinity();

// The natural lse of a row from its log2-domain max m and sum l of 2^(s - m), rounded once.
float lse_of(float m, float l) {
  return static_cast<float>((double{m} + std::log2(double{l})) * 0.6931471805599453);
}

// lse in the log2 domain, rounded once.
float lse_log2(float lse) { return static_cast<float>(double{lse} * 1.4426950408889634); }

// Tile sizes (rows of queries x keys). Large key tiles keep the BLAS calls efficient; the S
// tile (query rows x kFwdBlockK floats) stays in the L2 cache. The forward takes 256 query rows
// (each K, V tile converted and packed by the BLAS half as often: 3-4% faster at L 1024, D 64)
// but 128 when causal (fewer scores past the diagonal: 256 was 8% slower).
constexpr int64_t kFwdBlockQ = 256;
constexpr int64_t kFwdCausalBlockQ = 128;
constexpr int64_t kFwdBlockK = 512;
constexpr int64_t kBwdBlockQ = 128;
constexpr int64_t kBwdBlockK = 128;

// ---- vector math on float rows (GCC/Clang vector extensions; cloned for AVX2/AVX-512) -------

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define LK_ROW_KERNEL __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LK_ROW_KERNEL
#endif
#define LK_INLINE inline __attribute__((always_inline))
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors only live inside this file

constexpr int kLanes = 16;
typedef float VecF __attribute__((vector_size(kLanes * sizeof(float))));
typedef int VecI __attribute__((vector_size(kLanes * sizeof(int))));

LK_INLINE VecF splat(float x) { return VecF{} + x; }

LK_INLINE VecF load_vec(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

LK_INLINE void store_vec(float* p, VecF v) { std::memcpy(p, &v, sizeof(v)); }

// 2^x for x < 128 (relative error ~2e-7; the softmax needs x <= 0 up to rounding); x <= -127
// (and -inf) gives exactly 0. Round-to-nearest split x = n + f with |f| <= 1/2, 2^f by its
// degree-7 Taylor polynomial, 2^n by exponent bits.
LK_INLINE VecF exp2_nonpositive(VecF x) {
  const VecF floor = splat(-127.0f);
  x = x < floor ? floor : x;
  const VecF round_shift = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const VecF n = (x + round_shift) - round_shift;
  const VecF f = x - n;
  VecF p = splat(1.5252734e-5f);
  p = p * f + 1.5403530e-4f;
  p = p * f + 1.3333558e-3f;
  p = p * f + 9.6181291e-3f;
  p = p * f + 5.5504109e-2f;
  p = p * f + 2.4022651e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  const VecI bits = (__builtin_convertvector(n, VecI) + 127) << 23;
  return p * (VecF)bits;  // a same-size vector cast reinterprets the bits
}

float exp2_nonpositive_scalar(float x) {
  float lanes[kLanes] = {x};
  store_vec(lanes, exp2_nonpositive(load_vec(lanes)));
  return lanes[0];
}

// max(row[0:n]) (-inf for n == 0).
LK_ROW_KERNEL float row_max(const float* row, int64_t n) {
  VecF acc = splat(-kInf), acc2 = acc;  // two chains: one max's latency no longer bounds a step
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    const VecF x = load_vec(row + j), y = load_vec(row + j + kLanes);
    acc = x > acc ? x : acc;
    acc2 = y > acc2 ? y : acc2;
  }
  for (; j + kLanes <= n; j += kLanes) {
    const VecF x = load_vec(row + j);
    acc = x > acc ? x : acc;
  }
  acc = acc2 > acc ? acc2 : acc;
  float m = -kInf;
  for (int u = 0; u < kLanes; ++u) m = std::max(m, acc[u]);
  for (; j < n; ++j) m = std::max(m, row[j]);
  return m;
}

// row[j] = 2^(row[j] - shift) for j < n, returns the sum of the new values.
LK_ROW_KERNEL float exp2_shift_sum(float* row, int64_t n, float shift) {
  VecF acc = splat(0.0f);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const VecF p = exp2_nonpositive(load_vec(row + j) - shift);
    store_vec(row + j, p);
    acc += p;
  }
  float sum = 0.0f;
  for (int u = 0; u < kLanes; ++u) sum += acc[u];
  for (; j < n; ++j) {
    row[j] = exp2_nonpositive_scalar(row[j] - shift);
    sum += row[j];
  }
  return sum;
}

// dS = P * (dP - delta) in place of dP, over n values.
LK_ROW_KERNEL void softmax_grad_row(const float* p, float* dp, int64_t n, float delta) {
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}

LK_ROW_KERNEL void scale_row(float* row, int64_t n, float factor) {
  for (int64_t j = 0; j < n; ++j) row[j] *= factor;
}

// out[r][j] = sum over c = 0, 1, ..., d-1 (in that order) of a[r][c] * bt[c][j], for r < rows
// and j < cols; bt is d x ldb with ldb a multiple of kLanes. Every entry comes from the same
// sequence of operations on its lane, so equal inputs give equal bits wherever they sit.
LK_ROW_KERNEL void dot_tile(const float* a, int64_t lda, int64_t rows, int64_t d,
                            const float* bt, int64_t ldb, int64_t cols, float* out,
                            int64_t ldo) {
  constexpr int kRows = 4;
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    const float* arow[kRows];
    for (int u = 0; u < kRows; ++u) arow[u] = a + std::min(r0 + u, rows - 1) * lda;
    int64_t j = 0;
    for (; j + 2 * kLanes <= cols; j += 2 * kLanes) {  // 2 vectors of columns: 8 FMAs per 6 loads
      VecF lo[kRows] = {}, hi[kRows] = {};
      for (int64_t c = 0; c < d; ++c) {
        const VecF b_lo = load_vec(bt + c * ldb + j), b_hi = load_vec(bt + c * ldb + j + kLanes);
        for (int u = 0; u < kRows; ++u) {
          lo[u] += arow[u][c] * b_lo;
          hi[u] += arow[u][c] * b_hi;
        }
      }
      for (int u = 0; u < kRows && r0 + u < rows; ++u) {
        store_vec(out + (r0 + u) * ldo + j, lo[u]);
        store_vec(out + (r0 + u) * ldo + j + kLanes, hi[u]);
      }
    }
    for (; j < cols; j += kLanes) {
      VecF acc[kRows] = {};
      for (int64_t c = 0; c < d; ++c) {
        const VecF b = load_vec(bt + c * ldb + j);
        for (int u = 0; u < kRows; ++u) acc[u] += arow[u][c] * b;
      }
      for (int u = 0; u < kRows && r0 + u < rows; ++u) {
        float lanes[kLanes];
        store_vec(lanes, acc[u]);
        std::copy(lanes, lanes + std::min<int64_t>(kLanes, cols - j), out + (r0 + u) * ldo + j);
      }
    }
  }
}

// ---- tile products: row-major C = alpha * op(A) op(B) + beta * C -----------------------------

#if AT_BUILD_WITH_BLAS()
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);
#endif

// op(A) is M x K, op(B) is K x N; trans_a means A is stored K x M (likewise B).
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc) {
#if AT_BUILD_WITH_BLAS()
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int im = int(m), in = int(n), ik = int(k), ilda = int(lda), ildb = int(ldb),
            ildc = int(ldc);
  sgemm_(&tb, &ta, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
#else
  for (int64_t i = 0; i < m; ++i) {
    float* crow = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) crow[j] = beta == 0.0f ? 0.0f : beta * crow[j];
    for (int64_t p = 0; p < k; ++p) {
      const float av = alpha * (trans_a ? a[p * lda + i] : a[i * lda + p]);
      if (trans_b) {
        for (int64_t j = 0; j < n; ++j) crow[j] += av * b[j * ldb + p];
      } else {
        const float* brow = b + p * ldb;
        for (int64_t j = 0; j < n; ++j) crow[j] += av * brow[j];
      }
    }
  }
#endif
}

// ---- problem description ------------------------------------------------------------------

// A (B, heads, L, D) tensor with stride(-1) == 1, seen through its other strides.
struct Rows {
  const void* data;
  int64_t batch_stride, head_stride, row_stride;

  template <typename T>
  const T* row(int64_t b, int64_t h, int64_t i) const {
    return static_cast<const T*>(data) + b * batch_stride + h * head_stride + i * row_stride;
  }
};

Rows rows_of(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

// The optional additive mask (B, H, Lq, Lk) with any strides and a float dtype.
struct Mask {
  const void* data = nullptr;
  at::ScalarType dtype = at::kFloat;
  int64_t strides[4] = {0, 0, 0, 0};

  // row[j] += mask[b, h, i, k0 + j] * log2(e) for j < n.
  void add_row(int64_t b, int64_t h, int64_t i, int64_t k0, int64_t n, float* row) const {
    const int64_t offset = b * strides[0] + h * strides[1] + i * strides[2] + k0 * strides[3];
    switch (dtype) {
      case at::kHalf:
        add_row_as(static_cast<const c10::Half*>(data) + offset, n, row);
        break;
      case at::kBFloat16:
        add_row_as(static_cast<const c10::BFloat16*>(data) + offset, n, row);
        break;
      default:
        add_row_as(static_cast<const float*>(data) + offset, n, row);
    }
  }

  template <typename M>
  void add_row_as(const M* src, int64_t n, float* row) const {
    const int64_t step = strides[3];
    for (int64_t j = 0; j < n; ++j) row[j] += lk::mask_log2(static_cast<float>(src[j * step]));
  }
};

Mask mask_of(const std::optional<at::Tensor>& mask) {
  Mask m;
  if (mask.has_value()) {
    m.data = mask->data_ptr();
    m.dtype = mask->scalar_type();
    for (int d = 0; d < 4; ++d) m.strides[d] = mask->stride(d);
  }
  return m;
}

struct Problem {
  Sizes sizes;
  Rows q, k, v;
  Mask mask;
  bool causal;
  int64_t causal_offset;
  float scale;       // softmax scale
  float scale_log2;  // scale * log2(e): scores are kept in the log2 domain

  int64_t group() const { return sizes.heads / sizes.kv_heads; }

  // Keys [0, key_end) are visible to some query in [q0, q1).
  int64_t key_end(int64_t q1) const {
    if (!causal) return sizes.k_len;
    return std::clamp<int64_t>(q1 + causal_offset, 0, sizes.k_len);
  }

  // First query that sees key k0.
  int64_t first_query(int64_t k0) const {
    return causal ? std::clamp<int64_t>(k0 - causal_offset, 0, sizes.q_len) : 0;
  }

  // Scores (log2 domain) of rows [q0, q0 + nq) against keys [k0, k0 + nk) of head (b, h):
  // adds the mask and sets causally hidden entries to -inf. s is nq x ld.
  void mask_scores(int64_t b, int64_t h, int64_t q0, int64_t nq, int64_t k0, int64_t nk,
                   float* s, int64_t ld) const {
    for (int64_t r = 0; r < nq; ++r) {
      float* row = s + r * ld;
      if (mask.data != nullptr) mask.add_row(b, h, q0 + r, k0, nk, row);
      if (causal) {
        const int64_t visible = std::clamp<int64_t>(q0 + r + causal_offset + 1 - k0, 0, nk);
        std::fill(row + visible, row + nk, -kInf);
      }
    }
  }
};

Problem problem_of(const Sizes& sizes, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const std::optional<at::Tensor>& mask, bool causal,
                   int64_t causal_offset, double scale) {
  return {sizes, rows_of(q), rows_of(k), rows_of(v), mask_of(mask), causal, causal_offset,
          float(scale), float(scale * 1.4426950408889634)};
}

// rows x D of `src` (row stride `stride`) into the contiguous float tile dst (rows x D).
template <typename T>
void load_tile(const T* src, int64_t stride, int64_t rows, int64_t d, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * stride;
    float* o = dst + r * d;
    for (int64_t c = 0; c < d; ++c) o[c] = static_cast<float>(s[c]);
  }
}

// A float32 tile of rows x D with row stride ld, as the BLAS calls read it.
struct TileView {
  const float* data;
  int64_t ld;
};

// rows x D of `src` as a float32 tile: `src` itself when it is float32 with a row stride BLAS
// accepts (>= D), else its conversion into `buf` (row stride D).
template <typename T>
TileView float_tile(const T* src, int64_t stride, int64_t rows, int64_t d, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    if (stride >= d) return {src, stride};
  }
  load_tile(src, stride, rows, d, buf);
  return {buf, d};
}

// The transpose of rows x D of `src` into dst (D x ld, ld >= rows).
template <typename T>
void load_tile_transposed(const T* src, int64_t stride, int64_t rows, int64_t d, float* dst,
                          int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * stride;
    for (int64_t c = 0; c < d; ++c) dst[c * ld + r] = static_cast<float>(s[c]);
  }
}

int64_t round_up_lanes(int64_t n) { return lk::ceil_div(n, kLanes) * kLanes; }

template <typename T>
void store_tile(const float* src, int64_t rows, int64_t d, T* dst, int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < d; ++c) dst[r * stride + c] = static_cast<T>(src[r * d + c]);
  }
}

// Contiguous float scratch of one task (64-byte aligned through the torch allocator).
float* scratch(at::Tensor& holder, int64_t floats) {
  holder = at::empty({std::max<int64_t>(floats, 1)}, at::TensorOptions().dtype(at::kFloat));
  return holder.data_ptr<float>();
}

// A query tile index that alternates direction between heads, so that the contiguous ranges
// at::parallel_for hands each thread get similar causal work.
int64_t tile_of(int64_t head_index, int64_t r, int64_t tiles) {
  return head_index % 2 == 0 ? r : tiles - 1 - r;
}

// ---- forward ------------------------------------------------------------------------------

template <typename T>
void forward_tiles(const Problem& p, T* out, float* lse) {
  const Sizes& s = p.sizes;
  const int64_t d = s.head_dim;
  const int64_t block_q = p.causal ? kFwdCausalBlockQ : kFwdBlockQ;
  const int64_t q_tiles = lk::ceil_div(s.q_len, block_q);
  at::parallel_for(0, s.batch * s.heads * q_tiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor hold_q, hold_k, hold_v, hold_s, hold_o, hold_stats;
    float* qt = scratch(hold_q, block_q * d);
    float* kt = scratch(hold_k, kFwdBlockK * d);
    float* vt = scratch(hold_v, kFwdBlockK * d);
    float* st = scratch(hold_s, block_q * kFwdBlockK);
    float* ot = scratch(hold_o, block_q * d);
    float* stats = scratch(hold_stats, 2 * block_q);
    float* row_m = stats;             // running max (log2 domain)
    float* row_l = stats + block_q;   // running sum of 2^(s - m), per thread row
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / q_tiles, b = bh / s.heads, h = bh % s.heads;
      const int64_t hk = h / p.group();
      const int64_t q0 = tile_of(bh, item % q_tiles, q_tiles) * block_q;
      const int64_t nq = std::min(block_q, s.q_len - q0);
      const TileView q_tile = float_tile(p.q.row<T>(b, h, q0), p.q.row_stride, nq, d, qt);
      std::fill(ot, ot + nq * d, 0.0f);
      std::fill(row_m, row_m + nq, -kInf);
      std::fill(row_l, row_l + nq, 0.0f);
      const int64_t key_end = p.key_end(q0 + nq);
      for (int64_t k0 = 0; k0 < key_end; k0 += kFwdBlockK) {
        const int64_t nk = std::min(kFwdBlockK, key_end - k0);
        const TileView k_tile = float_tile(p.k.row<T>(b, hk, k0), p.k.row_stride, nk, d, kt);
        const TileView v_tile = float_tile(p.v.row<T>(b, hk, k0), p.v.row_stride, nk, d, vt);
        gemm(false, true, nq, nk, d, p.scale_log2, q_tile.data, q_tile.ld, k_tile.data,
             k_tile.ld, 0.0f, st, nk);  // S = Q K^T
        p.mask_scores(b, h, q0, nq, k0, nk, st, nk);
        for (int64_t r = 0; r < nq; ++r) {
          float* row = st + r * nk;
          const float m_new = std::max(row_m[r], row_max(row, nk));
          const float shift = m_new == -kInf ? 0.0f : m_new;
          const float alpha = std::exp2(row_m[r] - shift);
          row_l[r] = row_l[r] * alpha + exp2_shift_sum(row, nk, shift);
          row_m[r] = m_new;
          if (alpha != 1.0f) scale_row(ot + r * d, d, alpha);
        }
        gemm(false, false, nq, d, nk, 1.0f, st, nk, v_tile.data, v_tile.ld, 1.0f, ot,
             d);  // O += P V
      }
      float* lse_tile = lse + (b * s.heads + h) * s.q_len + q0;
      for (int64_t r = 0; r < nq; ++r) {
        const bool empty = row_l[r] == 0.0f;  // the row sees no key: out = 0, lse = +inf
        scale_row(ot + r * d, d, empty ? 0.0f : 1.0f / row_l[r]);
        lse_tile[r] = empty ? kInf : lse_of(row_m[r], row_l[r]);
      }
      store_tile(ot, nq, d, out + ((b * s.heads + h) * s.q_len + q0) * d, d);
    }
  });
}

// ---- backward -----------------------------------------------------------------------------

// delta[b, h, i] = sum_d grad_out[b, h, i, d] * out[b, h, i, d] (float32, (B, H, Lq)), by the
// dot_tile routine that computes dP.
template <typename T>
void backward_delta(const Sizes& s, const Rows& grad_out, const Rows& out, float* delta) {
  const int64_t d = s.head_dim;
  at::parallel_for(0, s.batch * s.heads * s.q_len, 64, [&](int64_t begin, int64_t end) {
    at::Tensor hold_go, hold_o;
    float* go = scratch(hold_go, d);
    float* o_column = scratch(hold_o, d * kLanes);  // (D, kLanes): out's row in column 0
    std::fill(o_column, o_column + d * kLanes, 0.0f);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / s.q_len, b = bh / s.heads, h = bh % s.heads, i = row % s.q_len;
      load_tile(grad_out.row<T>(b, h, i), 0, 1, d, go);
      load_tile_transposed(out.row<T>(b, h, i), 0, 1, d, o_column, kLanes);
      dot_tile(go, d, 1, d, o_column, kLanes, 1, delta + row, 1);
    }
  });
}

// Buffers of one backward task, and the float32 views of its current Q, dO and K tiles.
struct BackwardScratch {
  at::Tensor holders[7];
  float *q_buf, *dout_buf, *k_buf, *vt, *p, *dp, *stats;  // vt: V^T (D x round_up_lanes(nk))
  TileView q{}, dout{}, k{};

  BackwardScratch(int64_t d) {
    q_buf = scratch(holders[0], kBwdBlockQ * d);
    dout_buf = scratch(holders[1], kBwdBlockQ * d);
    k_buf = scratch(holders[2], kBwdBlockK * d);
    vt = scratch(holders[3], d * round_up_lanes(kBwdBlockK));
    std::fill(vt, vt + d * round_up_lanes(kBwdBlockK), 0.0f);  // lanes past a tile's keys
    p = scratch(holders[4], kBwdBlockQ * kBwdBlockK);
    dp = scratch(holders[5], kBwdBlockQ * kBwdBlockK);
    stats = scratch(holders[6], 2 * kBwdBlockQ);
  }
};

// Loads keys [k0, k0 + nk) of kv head (b, hk): K as w.k, V^T into w.vt (row stride
// round_up_lanes(nk)).
template <typename T>
void load_key_tile(const Problem& p, int64_t b, int64_t hk, int64_t k0, int64_t nk,
                   BackwardScratch& w) {
  const int64_t d = p.sizes.head_dim;
  w.k = float_tile(p.k.row<T>(b, hk, k0), p.k.row_stride, nk, d, w.k_buf);
  load_tile_transposed(p.v.row<T>(b, hk, k0), p.v.row_stride, nk, d, w.vt, round_up_lanes(nk));
}

// For the tile (rows [q0, q0+nq) of head (b, h)) x (keys [k0, k0+nk) of its kv head), with the
// q, dO tiles in w.q, w.dout and K, V^T tiles in w.k, w.vt: w.p = P and w.dp = dS (nq x nk).
void softmax_grads(const Problem& p, const float* lse, const float* delta, int64_t b,
                   int64_t h, int64_t q0, int64_t nq, int64_t k0, int64_t nk,
                   BackwardScratch& w) {
  const int64_t d = p.sizes.head_dim;
  const int64_t row0 = (b * p.sizes.heads + h) * p.sizes.q_len + q0;
  gemm(false, true, nq, nk, d, p.scale_log2, w.q.data, w.q.ld, w.k.data, w.k.ld, 0.0f, w.p,
       nk);  // S = Q K^T
  p.mask_scores(b, h, q0, nq, k0, nk, w.p, nk);
  for (int64_t r = 0; r < nq; ++r) {
    // lse = +inf (a row that sees no key) makes the whole row of P zero.
    exp2_shift_sum(w.p + r * nk, nk, lse_log2(lse[row0 + r]));
  }
  dot_tile(w.dout.data, w.dout.ld, nq, d, w.vt, round_up_lanes(nk), nk, w.dp, nk);  // dP = dO V^T
  for (int64_t r = 0; r < nq; ++r) {
    softmax_grad_row(w.p + r * nk, w.dp + r * nk, nk, delta[row0 + r]);
  }
}

template <typename T>
void backward_dq(const Problem& p, const Rows& grad_out, const float* lse, const float* delta,
                 T* dq) {
  const Sizes& s = p.sizes;
  const int64_t d = s.head_dim;
  const int64_t q_tiles = lk::ceil_div(s.q_len, kBwdBlockQ);
  at::parallel_for(0, s.batch * s.heads * q_tiles, 1, [&](int64_t begin, int64_t end) {
    BackwardScratch w(d);
    at::Tensor hold_acc;
    float* acc = scratch(hold_acc, kBwdBlockQ * d);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / q_tiles, b = bh / s.heads, h = bh % s.heads;
      const int64_t hk = h / p.group();
      const int64_t q0 = tile_of(bh, item % q_tiles, q_tiles) * kBwdBlockQ;
      const int64_t nq = std::min(kBwdBlockQ, s.q_len - q0);
      w.q = float_tile(p.q.row<T>(b, h, q0), p.q.row_stride, nq, d, w.q_buf);
      w.dout = float_tile(grad_out.row<T>(b, h, q0), grad_out.row_stride, nq, d, w.dout_buf);
      std::fill(acc, acc + nq * d, 0.0f);
      const int64_t key_end = p.key_end(q0 + nq);
      for (int64_t k0 = 0; k0 < key_end; k0 += kBwdBlockK) {
        const int64_t nk = std::min(kBwdBlockK, key_end - k0);
        load_key_tile<T>(p, b, hk, k0, nk, w);
        softmax_grads(p, lse, delta, b, h, q0, nq, k0, nk, w);
        gemm(false, false, nq, d, nk, p.scale, w.dp, nk, w.k.data, w.k.ld, 1.0f, acc,
             d);  // dQ += dS K
      }
      store_tile(acc, nq, d, dq + ((b * s.heads + h) * s.q_len + q0) * d, d);
    }
  });
}

template <typename T>
void backward_dkdv(const Problem& p, const Rows& grad_out, const float* lse,
                   const float* delta, T* dk, T* dv) {
  const Sizes& s = p.sizes;
  const int64_t d = s.head_dim;
  const int64_t k_tiles = lk::ceil_div(s.k_len, kBwdBlockK);
  at::parallel_for(0, s.batch * s.kv_heads * k_tiles, 1, [&](int64_t begin, int64_t end) {
    BackwardScratch w(d);
    at::Tensor hold_dk, hold_dv;
    float* dk_acc = scratch(hold_dk, kBwdBlockK * d);
    float* dv_acc = scratch(hold_dv, kBwdBlockK * d);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bhk = item / k_tiles, b = bhk / s.kv_heads, hk = bhk % s.kv_heads;
      const int64_t k0 = tile_of(bhk, item % k_tiles, k_tiles) * kBwdBlockK;
      const int64_t nk = std::min(kBwdBlockK, s.k_len - k0);
      load_key_tile<T>(p, b, hk, k0, nk, w);
      std::fill(dk_acc, dk_acc + nk * d, 0.0f);
      std::fill(dv_acc, dv_acc + nk * d, 0.0f);
      const int64_t first_tile = p.first_query(k0) / kBwdBlockQ;
      for (int64_t h = hk * p.group(); h < (hk + 1) * p.group(); ++h) {
        for (int64_t q0 = first_tile * kBwdBlockQ; q0 < s.q_len; q0 += kBwdBlockQ) {
          const int64_t nq = std::min(kBwdBlockQ, s.q_len - q0);
          w.q = float_tile(p.q.row<T>(b, h, q0), p.q.row_stride, nq, d, w.q_buf);
          w.dout = float_tile(grad_out.row<T>(b, h, q0), grad_out.row_stride, nq, d, w.dout_buf);
          softmax_grads(p, lse, delta, b, h, q0, nq, k0, nk, w);
          gemm(true, false, nk, d, nq, 1.0f, w.p, nk, w.dout.data, w.dout.ld, 1.0f, dv_acc,
               d);  // dV += P^T dO
          gemm(true, false, nk, d, nq, p.scale, w.dp, nk, w.q.data, w.q.ld, 1.0f, dk_acc,
               d);  // dK += dS^T Q
        }
      }
      const int64_t offset = ((b * s.kv_heads + hk) * s.k_len + k0) * d;
      store_tile(dk_acc, nk, d, dk + offset, d);
      store_tile(dv_acc, nk, d, dv + offset, d);
    }
  });
}

// One pass, a task per (batch, kv head): each key tile's P and dS are computed once and feed
// dV, dK and the dQ of the group's heads, which the task accumulates in float32 (group x Lq x
// D) over the key tiles in order. 5 tile products per tile pair against the two passes' 7.
template <typename T>
void backward_one_pass(const Problem& p, const Rows& grad_out, const float* lse,
                       const float* delta, T* dq, T* dk, T* dv) {
  const Sizes& s = p.sizes;
  const int64_t d = s.head_dim, group = p.group();
  at::parallel_for(0, s.batch * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    BackwardScratch w(d);
    at::Tensor hold_dq, hold_dk, hold_dv;
    float* dq_acc = scratch(hold_dq, group * s.q_len * d);  // (group, Lq, D)
    float* dk_acc = scratch(hold_dk, kBwdBlockK * d);
    float* dv_acc = scratch(hold_dv, kBwdBlockK * d);
    for (int64_t bhk = begin; bhk < end; ++bhk) {
      const int64_t b = bhk / s.kv_heads, hk = bhk % s.kv_heads;
      std::fill(dq_acc, dq_acc + group * s.q_len * d, 0.0f);
      for (int64_t k0 = 0; k0 < s.k_len; k0 += kBwdBlockK) {
        const int64_t nk = std::min(kBwdBlockK, s.k_len - k0);
        load_key_tile<T>(p, b, hk, k0, nk, w);
        std::fill(dk_acc, dk_acc + nk * d, 0.0f);
        std::fill(dv_acc, dv_acc + nk * d, 0.0f);
        const int64_t first_tile = p.first_query(k0) / kBwdBlockQ;
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = hk * group + g;
          for (int64_t q0 = first_tile * kBwdBlockQ; q0 < s.q_len; q0 += kBwdBlockQ) {
            const int64_t nq = std::min(kBwdBlockQ, s.q_len - q0);
            w.q = float_tile(p.q.row<T>(b, h, q0), p.q.row_stride, nq, d, w.q_buf);
            w.dout = float_tile(grad_out.row<T>(b, h, q0), grad_out.row_stride, nq, d,
                                w.dout_buf);
            softmax_grads(p, lse, delta, b, h, q0, nq, k0, nk, w);
            gemm(true, false, nk, d, nq, 1.0f, w.p, nk, w.dout.data, w.dout.ld, 1.0f, dv_acc,
                 d);  // dV += P^T dO
            gemm(true, false, nk, d, nq, p.scale, w.dp, nk, w.q.data, w.q.ld, 1.0f, dk_acc,
                 d);  // dK += dS^T Q
            gemm(false, false, nq, d, nk, p.scale, w.dp, nk, w.k.data, w.k.ld, 1.0f,
                 dq_acc + (g * s.q_len + q0) * d, d);  // dQ += dS K
          }
        }
        const int64_t offset = ((b * s.kv_heads + hk) * s.k_len + k0) * d;
        store_tile(dk_acc, nk, d, dk + offset, d);
        store_tile(dv_acc, nk, d, dv + offset, d);
      }
      store_tile(dq_acc, group * s.q_len, d, dq + (b * s.heads + hk * group) * s.q_len * d, d);
    }
  });
}

// The one-pass backward when it keeps every thread busy (a task per batch x kv head, at least
// two per thread) and its dQ accumulator stays small; else the two passes, which split the
// work per query tile and per key tile.
bool one_pass_backward(const Sizes& s) {
  constexpr int64_t kMaxAccumulatorFloats = int64_t{4} << 20;  // 16 MB
  return s.batch * s.kv_heads >= 2 * at::get_num_threads() &&
         (s.heads / s.kv_heads) * s.q_len * s.head_dim <= kMaxAccumulatorFloats;
}

template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kHalf:
      fn(c10::Half{});
      break;
    case at::kBFloat16:
      fn(c10::BFloat16{});
      break;
    default:
      fn(float{});
  }
}

at::Tensor with_unit_last_stride(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, bool causal, int64_t causal_offset, double scale) {
  const Sizes s = lk::attn::check_forward_inputs("attention_forward_cpu", q, k, v, mask, scale,
                                                 at::kCPU);
  at::Tensor out = at::empty(q.sizes(), q.options());  // (B, H, Lq, D) contiguous
  at::Tensor lse = at::empty({s.batch, s.heads, s.q_len}, q.options().dtype(at::kFloat));
  const Problem p = problem_of(s, q, k, v, mask, causal, causal_offset, scale);
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    forward_tiles<T>(p, out.data_ptr<T>(), lse.data_ptr<float>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
    bool causal, int64_t causal_offset, double scale) {
  const Sizes s = lk::attn::check_backward_inputs("attention_backward_cpu", grad_out, q, k, v,
                                                  out, lse, mask, scale, at::kCPU);
  const at::Tensor go = with_unit_last_stride(grad_out);
  const at::Tensor o = with_unit_last_stride(out);
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor delta = at::empty({s.batch, s.heads, s.q_len}, q.options().dtype(at::kFloat));
  const Problem p = problem_of(s, q, k, v, mask, causal, causal_offset, scale);
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const Rows go_rows = rows_of(go);
    backward_delta<T>(s, go_rows, rows_of(o), delta.data_ptr<float>());
    if (one_pass_backward(s)) {
      backward_one_pass<T>(p, go_rows, lse_c.data_ptr<float>(), delta.data_ptr<float>(),
                           dq.data_ptr<T>(), dk.data_ptr<T>(), dv.data_ptr<T>());
      return;
    }
    backward_dq<T>(p, go_rows, lse_c.data_ptr<float>(), delta.data_ptr<float>(),
                   dq.data_ptr<T>());
    backward_dkdv<T>(p, go_rows, lse_c.data_ptr<float>(), delta.data_ptr<float>(),
                     dk.data_ptr<T>(), dv.data_ptr<T>());
  });
  return {dq, dk, dv};
}
