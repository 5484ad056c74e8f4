// Vectorizable float32 row loops of the CPU twins (declared in cpu_utils.h), cloned for AVX-512,
// AVX2 and the baseline ISA on x86-64 Linux (GCC/Clang target_clones: one binary, the best
// version is picked at load time). Plain loops over raw pointers that the compiler vectorizes;
// sums keep kVecLanes independent float32 lanes per block of kSumBlock values and add the block
// totals in double, so their error does not grow with the row length. exp_nonpositive is the
// vectorized exp of the softmax and cross-entropy rows.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu_utils.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#include <immintrin.h>
#define LK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define LK_F16C 1
#else
#define LK_CLONES
#define LK_F16C 0
#endif

#pragma GCC diagnostic ignored "-Wpsabi"  // the vector type never crosses a non-inlined call

namespace lk {
namespace {

constexpr int kVecLanes = 16;
constexpr int64_t kSumBlock = 512;  // values per block of the sums
typedef float VecF __attribute__((vector_size(kVecLanes * sizeof(float))));
typedef int32_t VecI __attribute__((vector_size(kVecLanes * sizeof(int32_t))));
// Half-width vectors for compare-and-select loops: GCC lowers a 16-lane select to scalar code
// for AVX2 (8-lane registers), an 8-lane one to vmaxps/vcmpps on AVX2 and AVX-512 alike.
typedef float VecF8 __attribute__((vector_size(8 * sizeof(float))));
typedef int32_t VecI8 __attribute__((vector_size(8 * sizeof(int32_t))));

#define LK_INLINE inline __attribute__((always_inline))

LK_INLINE VecF load(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

LK_INLINE void store(float* p, const VecF& v) { std::memcpy(p, &v, sizeof(v)); }

LK_INLINE VecF8 load8(const float* p) {
  VecF8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The first `count` (< kVecLanes) values at p, the other lanes `fill`.
LK_INLINE VecF load_partial(const float* p, int64_t count, float fill) {
  VecF v = VecF{} + fill;
  for (int64_t k = 0; k < count; ++k) v[k] = p[k];
  return v;
}

LK_INLINE void store_partial(float* p, int64_t count, const VecF& v) {
  for (int64_t k = 0; k < count; ++k) p[k] = v[k];
}

LK_INLINE float lane_total(const VecF& v) {
  float total = 0.0f;
  for (int k = 0; k < kVecLanes; ++k) total += v[k];
  return total;
}

uint32_t bits_of(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}

float float_of(uint32_t b) {
  float v;
  std::memcpy(&v, &b, sizeof(v));
  return v;
}

// exp(x) for x < 44 (softmax arguments x - max <= 0); x < -104 and -inf give 0 (exp(-104)
// rounds to 0 in float32), NaN gives NaN. Cody-Waite split x = n ln2 + r with n = round(x log2e),
// |r| <= ln2/2 (ln2 in two parts, n * 0.693359375 exact), exp(r) by Cephes' expf polynomial
// (degree 7), 2^n by exponent bits as 2^(n+64) * 2^-64, so results below 2^-126 round correctly
// to subnormals. Measured against double exp on every float32 in [-104, 0] (1.12e9 values):
// max relative error 8.4e-8 where the result is normal (>= 2^-126), 1.01 ulp everywhere
// (subnormal ulp 2^-149), on the AVX-512 clone (FMA); 8.1e-8 and 0.98 ulp on the others.
LK_INLINE VecF exp_nonpositive(VecF x) {
  x = x < -104.0f ? VecF{} - 104.0f : x;
  const float round_shift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const VecF n = (x * 1.44269504f + round_shift) - round_shift;
  const VecF r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  VecF p = VecF{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const VecI bits = (__builtin_convertvector(n, VecI) + (127 + 64)) << 23;
  return p * (VecF)bits * 0x1p-64f;  // a vector cast reinterprets the bits
}

// ---- the feed-forward activations (common.h's formulas) on vectors ----
// Each quantity that a formula subtracts from 1 is computed without that cancellation (1 + erf,
// 1 - sigmoid, 1 + tanh, 1 - tanh^2 from exp(-|.|) and erfc), so the results keep float32's
// relative accuracy in the tails. NaN inputs give NaN.

LK_INLINE VecF abs_of(VecF x) { return x < 0.0f ? -x : x; }

// sigmoid(x) and 1 - sigmoid(x).
struct Sigmoid {
  VecF s, one_minus_s;
};

LK_INLINE Sigmoid sigmoid_of(VecF x) {
  const VecF e = exp_nonpositive(-abs_of(x));
  const VecF inv = 1.0f / (1.0f + e);
  return {x >= 0.0f ? inv : e * inv, x >= 0.0f ? e * inv : inv};
}

// erfc(a) for a >= 0 with relative error below 1.2e-7 (the Chebyshev fit of Numerical Recipes'
// erfcc); exp's argument is never above ~1e-7.
LK_INLINE VecF erfc_nonnegative(VecF a) {
  const VecF t = 1.0f / (1.0f + 0.5f * a);
  VecF p = VecF{} + 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  const VecF arg = p - a * a;
  return t * exp_nonpositive(arg < 0.0f ? arg : VecF{});
}

// 1 + erf(z): 2 - erfc(z) for z >= 0, erfc(-z) below.
LK_INLINE VecF one_plus_erf(VecF z) {
  const VecF c = erfc_nonnegative(abs_of(z));
  return z >= 0.0f ? 2.0f - c : c;
}

// 1 + tanh(u) and 1 - tanh(u)^2, from e = exp(-2|u|).
struct Tanh {
  VecF one_plus_t, one_minus_t2;
};

LK_INLINE Tanh tanh_of(VecF u) {
  const VecF e = exp_nonpositive(-2.0f * abs_of(u));
  const VecF inv = 1.0f / (1.0f + e);
  return {u >= 0.0f ? 2.0f * inv : 2.0f * e * inv, 4.0f * e * inv * inv};
}

LK_INLINE VecF gelu_tanh_arg(VecF x) { return kSqrt2OverPi * (x + kGeluTanhCoef * x * x * x); }

LK_INLINE VecF activation_of(Activation act, VecF x) {
  switch (act) {
    case Activation::kGelu:
      return 0.5f * x * one_plus_erf(x * kSqrt1_2);
    case Activation::kGeluTanh:
      return 0.5f * x * tanh_of(gelu_tanh_arg(x)).one_plus_t;
    case Activation::kRelu:
      return x < 0.0f ? VecF{} : x;  // NaN stays NaN
    default:
      return x * sigmoid_of(x).s;
  }
}

LK_INLINE VecF activation_grad_of(Activation act, VecF x) {
  switch (act) {
    case Activation::kGelu:
      return 0.5f * one_plus_erf(x * kSqrt1_2) + x * kInvSqrt2Pi * exp_nonpositive(-0.5f * x * x);
    case Activation::kGeluTanh: {
      const Tanh t = tanh_of(gelu_tanh_arg(x));
      return 0.5f * t.one_plus_t +
             0.5f * x * t.one_minus_t2 * kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhCoef * x * x);
    }
    case Activation::kRelu:
      return x > 0.0f ? VecF{} + 1.0f : VecF{};
    default: {
      const Sigmoid s = sigmoid_of(x);
      return s.s * (1.0f + x * s.one_minus_s);
    }
  }
}

}  // namespace

LK_CLONES void bf16_to_float(const c10::BFloat16* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_of(static_cast<uint32_t>(src[i].x) << 16);
}

// Round to nearest even, NaN to the canonical bfloat16 NaN (as c10::BFloat16(float)).
LK_CLONES void float_to_bf16(const float* src, int64_t n, c10::BFloat16* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = bits_of(src[i]);
    const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    dst[i].x = static_cast<uint16_t>(std::isnan(src[i]) ? 0x7FC0u : rounded);
  }
}

#if LK_F16C
// fp16 <-> fp32 with the F16C instructions (round to nearest even), 8 values at a time.
static __attribute__((target("avx,f16c"))) void half_to_float_f16c(const c10::Half* src, int64_t n,
                                                             float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(
                                  reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

static __attribute__((target("avx,f16c"))) void float_to_half_f16c(const float* src, int64_t n,
                                                             c10::Half* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

static bool has_f16c() {
  static const bool supported = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
  return supported;
}
#endif

void half_to_float(const c10::Half* src, int64_t n, float* dst) {
#if LK_F16C
  if (has_f16c()) return half_to_float_f16c(src, n, dst);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

void float_to_half(const float* src, int64_t n, c10::Half* dst) {
#if LK_F16C
  if (has_f16c()) return float_to_half_f16c(src, n, dst);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

namespace {

// s += sum(v[i] - c), q += sum((v[i] - c)^2) over [0, n): two float32 vector accumulators each
// within blocks of kSumBlock values, block totals added in double.
LK_INLINE void shifted_sums(const float* v, int64_t n, float c, double& s, double& q) {
  for (int64_t start = 0; start < n; start += kSumBlock) {
    const int64_t end = start + kSumBlock < n ? start + kSumBlock : n;
    VecF s0 = {}, s1 = {}, q0 = {}, q1 = {};
    int64_t i = start;
    for (; i + 2 * kVecLanes <= end; i += 2 * kVecLanes) {
      const VecF d0 = load(v + i) - c, d1 = load(v + i + kVecLanes) - c;
      s0 += d0;
      s1 += d1;
      q0 += d0 * d0;
      q1 += d1 * d1;
    }
    float block_s = lane_total(s0 + s1), block_q = lane_total(q0 + q1);
    for (; i < end; ++i) {
      const float d = v[i] - c;
      block_s += d;
      block_q += d * d;
    }
    s += block_s;
    q += block_q;
  }
}

}  // namespace

// One read in the common case: with c the mean of the first few values, m2 = q - s^2 / n from
// the shifted sums, which is accurate while c is within the spread of the row
// (s^2 / n <= q / 4: the subtraction keeps at least three quarters of q). Otherwise (sorted
// rows, outliers up front) a second, exact pass about the mean.
LK_CLONES RowMoments row_moments(const float* v, int64_t n) {
  const int64_t head = std::min<int64_t>(n, 2 * kVecLanes);
  float c = 0.0f;
  for (int64_t i = 0; i < head; ++i) c += v[i];
  c /= static_cast<float>(head);
  double s = 0.0, q = 0.0;
  shifted_sums(v, n, c, s, q);
  if (s * s <= 0.25 * q * n) {
    return {static_cast<float>(c + s / n), static_cast<float>(std::max(q - s * s / n, 0.0))};
  }
  const float mean = static_cast<float>(c + s / n);
  double s2 = 0.0, q2 = 0.0;
  shifted_sums(v, n, mean, s2, q2);
  return {static_cast<float>(mean + s2 / n), static_cast<float>(std::max(q2 - s2 * s2 / n, 0.0))};
}

LK_CLONES float sum_squares(const float* v, int64_t n) {
  double s = 0.0, q = 0.0;
  shifted_sums(v, n, 0.0f, s, q);
  return static_cast<float>(q);
}

LK_CLONES void add_floats(const float* a, const float* b, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

LK_CLONES void normalize_affine(const float* v, int64_t n, float mean, float rstd, const float* w,
                                const float* b, float* out) {
  int64_t i = 0;
  for (; i + kVecLanes <= n; i += kVecLanes) {
    store(out + i, (load(v + i) - mean) * rstd * load(w + i) + load(b + i));
  }
  for (; i < n; ++i) out[i] = (v[i] - mean) * rstd * w[i] + b[i];
}

LK_CLONES void norm_backward_row(const float* dy, const float* h, const float* w,
                                 const float* grad_h, int64_t n, float mean, float rstd, bool rms,
                                 float* dx, float* acc_w, float* acc_b) {
  double sum_gx = 0.0, sum_g = 0.0;
  for (int64_t start = 0; start < n; start += kSumBlock) {
    const int64_t end = start + kSumBlock < n ? start + kSumBlock : n;
    VecF lanes_gx = {}, lanes_g = {};
    int64_t i = start;
    for (; i + kVecLanes <= end; i += kVecLanes) {
      const VecF g = load(dy + i) * load(w + i);
      lanes_gx += g * ((load(h + i) - mean) * rstd);
      lanes_g += g;
    }
    float block_gx = lane_total(lanes_gx), block_g = lane_total(lanes_g);
    for (; i < end; ++i) {
      block_gx += dy[i] * w[i] * ((h[i] - mean) * rstd);
      block_g += dy[i] * w[i];
    }
    sum_gx += block_gx;
    sum_g += block_g;
  }
  const float c1 = static_cast<float>(sum_gx / n);
  const float c2 = rms ? 0.0f : static_cast<float>(sum_g / n);
  // One output stream per loop: the rows are 4 KB apart, so a loop that stored dx, acc_w and
  // acc_b together had its loads wait on stores to the same address mod 4 KB (4K aliasing).
  int64_t i = 0;
  for (; i + kVecLanes <= n; i += kVecLanes) {
    const VecF xhat = (load(h + i) - mean) * rstd;
    VecF d = (load(dy + i) * load(w + i) - xhat * c1 - c2) * rstd;
    if (grad_h != nullptr) d += load(grad_h + i);
    store(dx + i, d);
  }
  for (; i < n; ++i) {
    const float xhat = (h[i] - mean) * rstd;
    dx[i] = (dy[i] * w[i] - xhat * c1 - c2) * rstd + (grad_h != nullptr ? grad_h[i] : 0.0f);
  }
  if (acc_w == nullptr) return;
  for (i = 0; i + kVecLanes <= n; i += kVecLanes) {
    store(acc_w + i, load(acc_w + i) + load(dy + i) * ((load(h + i) - mean) * rstd));
  }
  for (; i < n; ++i) acc_w[i] += dy[i] * ((h[i] - mean) * rstd);
  for (i = 0; i + kVecLanes <= n; i += kVecLanes) store(acc_b + i, load(acc_b + i) + load(dy + i));
  for (; i < n; ++i) acc_b[i] += dy[i];
}

// Vector max that propagates NaN: two 8-lane running maxima of the ordered values and a lane
// mask of whether any value was NaN (`x > NaN` is false, so the maxima skip NaN; folding the
// NaN test into the select made GCC scalarize the loop: 6x slower softmax).
LK_CLONES float max_of(const float* v, int64_t n) {
  VecF8 lo = VecF8{} - INFINITY, hi = lo;
  VecI8 unordered = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const VecF8 a = load8(v + i), b = load8(v + i + 8);
    lo = a > lo ? a : lo;
    hi = b > hi ? b : hi;
    unordered |= (a != a) | (b != b);
  }
  float m = -INFINITY;
  bool nan = false;
  for (int k = 0; k < 8; ++k) {
    m = lo[k] > m ? lo[k] : m;
    m = hi[k] > m ? hi[k] : m;
    nan |= unordered[k] != 0;
  }
  for (; i < n; ++i) {
    m = v[i] > m ? v[i] : m;
    nan |= v[i] != v[i];
  }
  return nan ? NAN : m;
}

// The tail lanes are exp(-inf - shift) = 0 in the sum.
LK_CLONES float exp_shift_sum(const float* v, int64_t n, float shift, float* out) {
  double total = 0.0;
  for (int64_t start = 0; start < n; start += kSumBlock) {
    const int64_t end = start + kSumBlock < n ? start + kSumBlock : n;
    VecF lanes = {};
    int64_t i = start;
    for (; i + kVecLanes <= end; i += kVecLanes) {
      const VecF p = exp_nonpositive(load(v + i) - shift);
      store(out + i, p);
      lanes += p;
    }
    if (i < end) {
      const VecF p = exp_nonpositive(load_partial(v + i, end - i, -INFINITY) - shift);
      store_partial(out + i, end - i, p);
      lanes += p;
    }
    total += lane_total(lanes);
  }
  return static_cast<float>(total);
}

LK_CLONES void scale_floats(const float* v, int64_t n, float factor, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = v[i] * factor;
}

LK_CLONES void softmax_backward_row(const float* dy, const float* y, int64_t n, float* dx) {
  double sum_y = 0.0, sum_gy = 0.0;
  for (int64_t start = 0; start < n; start += kSumBlock) {
    const int64_t end = start + kSumBlock < n ? start + kSumBlock : n;
    VecF lanes_y = {}, lanes_gy = {};
    int64_t i = start;
    for (; i + kVecLanes <= end; i += kVecLanes) {
      const VecF yv = load(y + i);
      lanes_y += yv;
      lanes_gy += load(dy + i) * yv;
    }
    float block_y = lane_total(lanes_y), block_gy = lane_total(lanes_gy);
    for (; i < end; ++i) {
      block_y += y[i];
      block_gy += dy[i] * y[i];
    }
    sum_y += block_y;
    sum_gy += block_gy;
  }
  const float total = static_cast<float>(sum_y);
  const float inv = total != 0.0f ? 1.0f / total : 0.0f;
  const float dot = static_cast<float>(sum_gy) * inv;
  for (int64_t i = 0; i < n; ++i) dx[i] = y[i] * inv * (dy[i] - dot);
}

// Each vector of v is read before the same vector of out is written, so out may be v.
LK_CLONES void softmax_minus_onehot(const float* v, int64_t n, float shift, float scale,
                                    int64_t hot, float* out) {
  for (int64_t i = 0; i < n; i += kVecLanes) {
    const int64_t count = std::min<int64_t>(kVecLanes, n - i);
    VecF p = exp_nonpositive(
        (count == kVecLanes ? load(v + i) : load_partial(v + i, count, -INFINITY)) - shift);
    if (static_cast<uint64_t>(hot - i) < static_cast<uint64_t>(count)) p[hot - i] -= 1.0f;
    p *= scale;
    if (count == kVecLanes) {
      store(out + i, p);
    } else {
      store_partial(out + i, count, p);
    }
  }
}

// The loops below spell out their vector and tail steps: a lambda would be a separate function
// of the baseline ISA that the clones do not inline.
LK_CLONES void activation_rows(Activation act, const float* pre, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + kVecLanes <= n; i += kVecLanes) store(out + i, activation_of(act, load(pre + i)));
  if (i < n) {
    store_partial(out + i, n - i, activation_of(act, load_partial(pre + i, n - i, 0.0f)));
  }
}

LK_INLINE void activation_grad_step(Activation act, VecF x, VecF g, VecF& out, VecF& grad) {
  out = activation_of(act, x);
  grad = g * activation_grad_of(act, x);
}

LK_CLONES void activation_grad_rows(Activation act, const float* pre, const float* grad_out,
                                    int64_t n, float* out, float* grad_pre) {
  int64_t i = 0;
  VecF o, g;
  for (; i + kVecLanes <= n; i += kVecLanes) {
    activation_grad_step(act, load(pre + i), load(grad_out + i), o, g);
    store(out + i, o);
    store(grad_pre + i, g);
  }
  if (i < n) {
    const int64_t m = n - i;
    activation_grad_step(act, load_partial(pre + i, m, 0.0f), load_partial(grad_out + i, m, 0.0f),
                         o, g);
    store_partial(out + i, m, o);
    store_partial(grad_pre + i, m, g);
  }
}

LK_INLINE VecF swiglu_of(VecF g, VecF u) { return g * sigmoid_of(g).s * u; }

LK_CLONES void swiglu_rows(const float* gate, const float* up, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + kVecLanes <= n; i += kVecLanes) store(out + i, swiglu_of(load(gate + i), load(up + i)));
  if (i < n) {
    const int64_t m = n - i;
    store_partial(out + i, m, swiglu_of(load_partial(gate + i, m, 0.0f),
                                        load_partial(up + i, m, 0.0f)));
  }
}

// out = silu(g) u, dg = d u silu'(g), du = d silu(g).
LK_INLINE void swiglu_grad_step(VecF g, VecF u, VecF d, VecF& out, VecF& dg, VecF& du) {
  const Sigmoid s = sigmoid_of(g);
  const VecF silu = g * s.s;
  out = silu * u;
  dg = d * u * (s.s * (1.0f + g * s.one_minus_s));
  du = d * silu;
}

LK_CLONES void swiglu_grad_rows(const float* gate, const float* up, const float* grad_out,
                                int64_t n, float* out, float* grad_gate, float* grad_up) {
  int64_t i = 0;
  VecF o, dg, du;
  for (; i + kVecLanes <= n; i += kVecLanes) {
    swiglu_grad_step(load(gate + i), load(up + i), load(grad_out + i), o, dg, du);
    store(out + i, o);
    store(grad_gate + i, dg);
    store(grad_up + i, du);
  }
  if (i < n) {
    const int64_t m = n - i;
    swiglu_grad_step(load_partial(gate + i, m, 0.0f), load_partial(up + i, m, 0.0f),
                     load_partial(grad_out + i, m, 0.0f), o, dg, du);
    store_partial(out + i, m, o);
    store_partial(grad_gate + i, m, dg);
    store_partial(grad_up + i, m, du);
  }
}

}  // namespace lk
