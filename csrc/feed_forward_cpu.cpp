// Feed-forward epilogues on CPU tensors (math in kernels.h and common.h), elementwise in
// parallel with float32 math in the vector loops of cpu_vec.cpp; the GEMMs run in torch's CPU
// BLAS (csrc/bindings.cpp).
#include <algorithm>
#include <array>

#include "cpu_utils.h"
#include "kernels.h"

namespace lk {
namespace {

// f(inputs, outputs, m) over [0, n) in parallel, with NI input and NO output arrays of n
// elements as float32: the tensors themselves for float, else converted blocks of at most
// kBlock elements (outputs rounded back to T after each block).
template <typename T, size_t NI, size_t NO, typename F>
void blocks_as_float(const std::array<const T*, NI>& in, const std::array<T*, NO>& out,
                     int64_t n, F&& f) {
  constexpr int64_t kBlock = 2048;
  parallel_elements(n, [&](int64_t begin, int64_t end) {
    std::array<const float*, NI> fin;
    std::array<float*, NO> fout;
    if constexpr (std::is_same_v<T, float>) {
      for (size_t k = 0; k < NI; ++k) fin[k] = in[k] + begin;
      for (size_t k = 0; k < NO; ++k) fout[k] = out[k] + begin;
      f(fin, fout, end - begin);
    } else {
      std::vector<float> buffer((NI + NO) * kBlock);
      for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
        const int64_t m = std::min(kBlock, end - b0);
        for (size_t k = 0; k < NI; ++k) {
          float* dst = buffer.data() + k * kBlock;
          to_float(in[k] + b0, m, dst);
          fin[k] = dst;
        }
        for (size_t k = 0; k < NO; ++k) fout[k] = buffer.data() + (NI + k) * kBlock;
        f(fin, fout, m);
        for (size_t k = 0; k < NO; ++k) from_float(fout[k], m, out[k] + b0);
      }
    }
  });
}

}  // namespace

void activation_forward_cpu(const ActivationForwardArgs& a) {
  dispatch_cpu_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    blocks_as_float<T, 1, 1>({static_cast<const T*>(a.pre)}, {static_cast<T*>(a.out)}, a.n,
                             [&](const auto& in, const auto& out, int64_t m) {
                               activation_rows(a.act, in[0], m, out[0]);
                             });
  });
}

void activation_backward_cpu(const ActivationBackwardArgs& a) {
  dispatch_cpu_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    blocks_as_float<T, 2, 2>(
        {static_cast<const T*>(a.pre), static_cast<const T*>(a.grad_out)},
        {static_cast<T*>(a.out), static_cast<T*>(a.grad_pre)}, a.n,
        [&](const auto& in, const auto& out, int64_t m) {
          activation_grad_rows(a.act, in[0], in[1], m, out[0], out[1]);
        });
  });
}

void swiglu_forward_cpu(const SwigluForwardArgs& a) {
  dispatch_cpu_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    blocks_as_float<T, 2, 1>({static_cast<const T*>(a.gate), static_cast<const T*>(a.up)},
                             {static_cast<T*>(a.out)}, a.n,
                             [&](const auto& in, const auto& out, int64_t m) {
                               swiglu_rows(in[0], in[1], m, out[0]);
                             });
  });
}

void swiglu_backward_cpu(const SwigluBackwardArgs& a) {
  dispatch_cpu_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    blocks_as_float<T, 3, 3>(
        {static_cast<const T*>(a.gate), static_cast<const T*>(a.up),
         static_cast<const T*>(a.grad_out)},
        {static_cast<T*>(a.out), static_cast<T*>(a.grad_gate), static_cast<T*>(a.grad_up)},
        a.n, [&](const auto& in, const auto& out, int64_t m) {
          swiglu_grad_rows(in[0], in[1], in[2], m, out[0], out[1], out[2]);
        });
  });
}

}  // namespace lk
