// Helpers shared by the CUDA kernels (.cu), their C++ CPU twins (*_cpu.cpp) and the binding
// layer. No torch headers: the .cu files include this and compile in seconds.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LK_HD __host__ __device__ __forceinline__
#else
#define LK_HD inline
#endif

namespace lk {

// Element type of the tensors a kernel reads and writes (math is always float32).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

enum class Activation : int { kGelu = 0, kGeluTanh = 1, kRelu = 2, kSilu = 3 };

LK_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Bytes of one element of `dtype`.
LK_HD int dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// ---- activation math shared by the CUDA and CPU feed-forward epilogues (float32) ----

constexpr float kSqrt1_2 = 0.70710678118654752440f;      // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;   // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286535588f;  // sqrt(2 / pi)
constexpr float kGeluTanhCoef = 0.044715f;

LK_HD float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// act(x).
LK_HD float activation(Activation act, float x) {
  switch (act) {
    case Activation::kGelu:
      return 0.5f * x * (1.0f + erff(x * kSqrt1_2));
    case Activation::kGeluTanh:
      return 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + kGeluTanhCoef * x * x * x)));
    case Activation::kRelu:
      return x < 0.0f ? 0.0f : x;  // NaN stays NaN, as in torch
    default:
      return x * sigmoid(x);
  }
}

// d act(x) / dx.
LK_HD float activation_grad(Activation act, float x) {
  switch (act) {
    case Activation::kGelu:
      return 0.5f * (1.0f + erff(x * kSqrt1_2)) + x * kInvSqrt2Pi * expf(-0.5f * x * x);
    case Activation::kGeluTanh: {
      const float t = tanhf(kSqrt2OverPi * (x + kGeluTanhCoef * x * x * x));
      return 0.5f * (1.0f + t) +
             0.5f * x * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhCoef * x * x);
    }
    case Activation::kRelu:
      return x > 0.0f ? 1.0f : 0.0f;
    default: {
      const float s = sigmoid(x);
      return s * (1.0f + x * (1.0f - s));
    }
  }
}

// silu(g) * u and its gradients: d/dg = u * silu'(g), d/du = silu(g).
LK_HD float silu(float g) { return g * sigmoid(g); }
LK_HD float silu_grad(float g) {
  const float s = sigmoid(g);
  return s * (1.0f + g * (1.0f - s));
}

// ---- attention scores are kept in the log2 domain ----

constexpr float kLog2e = 1.4426950408889634f;
// An additive-mask value below kMaskFloor2 / log2(e) (about -45426, e.g. torch.finfo(dtype).min
// or masked_fill(-1e9)) hides its key like -inf. Such a key has zero weight (below fp32's exp
// range) in any row with a visible key; a row with none gives zeros and zero gradients instead of
// a score so large that the backward's recomputed P = exp2(s - lse) loses all precision. NaN
// is kept.
constexpr float kMaskFloor2 = -65536.0f;

LK_HD float mask_log2(float m) {
  const float s = m * kLog2e;
  return s < kMaskFloor2 ? -INFINITY : s;
}

// ---- online softmax statistics: (running max, sum of exp(x - max)) ----

struct MaxSum {
  float max;
  float sum;
};

// A pair that has seen only -inf values: max = -inf and sum = 0. A NaN or +inf value poisons
// the sum with NaN (as exp(x - max) does in torch), and merging never drops a poisoned pair.
LK_HD bool is_empty(MaxSum a) { return a.max == -INFINITY && a.sum == 0.0f; }

// Merge two partial (max, sum) pairs.
LK_HD MaxSum merge(MaxSum a, MaxSum b) {
  if (is_empty(a)) return b;
  if (is_empty(b)) return a;
  const float m = fmaxf(a.max, b.max);
  return {m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};
}

// Add one value to a (max, sum) pair; -inf adds nothing; exp(x - x) is NaN for x = +inf.
LK_HD MaxSum push(MaxSum a, float x) {
  if (x == -INFINITY) return a;
  if (x > a.max) return {x, a.sum * expf(a.max - x) + (x == INFINITY ? NAN : 1.0f)};
  return {a.max, a.sum + expf(x - a.max)};
}

}  // namespace lk
