// Feed-forward epilogues on CPU tensors (math in kernels.h and common.h), elementwise in
// parallel with float32 math; the GEMMs run in torch's CPU BLAS (csrc/bindings.cpp).
#include "cpu_utils.h"
#include "kernels.h"

namespace lk {

void activation_forward_cpu(const ActivationForwardArgs& a) {
  dispatch_cpu_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* pre = static_cast<const T*>(a.pre);
    T* out = static_cast<T*>(a.out);
    parallel_elements(a.n, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        out[i] = static_cast<T>(activation(a.act, static_cast<float>(pre[i])));
      }
    });
  });
}

void activation_backward_cpu(const ActivationBackwardArgs& a) {
  dispatch_cpu_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* pre = static_cast<const T*>(a.pre);
    const T* grad_out = static_cast<const T*>(a.grad_out);
    T* out = static_cast<T*>(a.out);
    T* grad_pre = static_cast<T*>(a.grad_pre);
    parallel_elements(a.n, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float x = static_cast<float>(pre[i]);
        const float g = static_cast<float>(grad_out[i]);
        out[i] = static_cast<T>(activation(a.act, x));
        grad_pre[i] = static_cast<T>(g * activation_grad(a.act, x));
      }
    });
  });
}

void swiglu_forward_cpu(const SwigluForwardArgs& a) {
  dispatch_cpu_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* gate = static_cast<const T*>(a.gate);
    const T* up = static_cast<const T*>(a.up);
    T* out = static_cast<T*>(a.out);
    parallel_elements(a.n, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        out[i] = static_cast<T>(silu(static_cast<float>(gate[i])) * static_cast<float>(up[i]));
      }
    });
  });
}

void swiglu_backward_cpu(const SwigluBackwardArgs& a) {
  dispatch_cpu_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* gate = static_cast<const T*>(a.gate);
    const T* up = static_cast<const T*>(a.up);
    const T* grad_out = static_cast<const T*>(a.grad_out);
    T* out = static_cast<T*>(a.out);
    T* grad_gate = static_cast<T*>(a.grad_gate);
    T* grad_up = static_cast<T*>(a.grad_up);
    parallel_elements(a.n, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float g = static_cast<float>(gate[i]);
        const float u = static_cast<float>(up[i]);
        const float d = static_cast<float>(grad_out[i]);
        const float s = silu(g);
        out[i] = static_cast<T>(s * u);
        grad_gate[i] = static_cast<T>(d * u * silu_grad(g));
        grad_up[i] = static_cast<T>(d * s);
      }
    });
  });
}

}  // namespace lk
