// Runs the row-wise CUDA kernels of csrc/ (layer_norm.cu, softmax.cu, cross_entropy.cu,
// feed_forward.cu) on the CPU emulator (cuda_emulation.h) through their real host entry points
// of csrc/kernels.h: the forward and the backward of one case. Link it with those .cu files,
// each compiled by g++ with -include cuda_emulation.h.
//
// usage: rows_driver CASE_DIR
//
// CASE_DIR/case.txt holds one "key value" per line: op (layer_norm, rms_norm, softmax,
// cross_entropy, activation, swiglu), dtype (f32, f16, bf16), rows, cols, and optionally sms
// (the emulated SM count), eps, ignore_index, act (the Activation value), inplace 1 (the
// cross-entropy backward overwrites the logits; the activation/swiglu backward writes grad_pre /
// grad_gate over grad_out), skip_syncthreads N (fault injection) and inputs, the names of the
// optional inputs present (weight, bias, residual, grad_h).
// Inputs, raw, (rows, cols) in the dtype unless said: x, weight, bias (cols), residual, grad_y,
// grad_h (norms); x, grad_y (softmax); logits, target (int64, rows), grad_loss (float32, rows)
// (cross_entropy); pre, grad_out (activation); gate, up, grad_out (swiglu).
// Outputs, raw: y, h, mean, rstd (float32), dx, dweight, dbias (norms); y, dx (softmax); loss,
// lse (float32), grad (cross_entropy); out, out_backward (the backward's out), grad_pre
// (activation); out, out_backward, grad_gate, grad_up (swiglu); faults.txt: the number of
// faults, then their messages.
// Exit status 0 when the case ran (faults or not), else 1 with a message.
#include <cstdio>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>

#include "cuda_emulation.h"
// cuda_emulation.h first: it defines LK_CUDA_EMULATION.
#include "driver_main.h"
#include "kernels.h"

namespace {

struct Case {
  std::string op, dtype;
  int64_t rows = 0, cols = 0, ignore_index = -100;
  float eps = 1e-5f;
  int act = 0;
  bool inplace = false;
  int skip_syncthreads = 0;
  std::set<std::string> inputs;  // the optional inputs present
};

using cuda_emu_driver::fail;

Case read_case(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail("cannot read " + path);
  Case c;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string key;
    if (!(fields >> key)) continue;
    int flag = 0;
    if (key == "op") fields >> c.op;
    else if (key == "dtype") fields >> c.dtype;
    else if (key == "rows") fields >> c.rows;
    else if (key == "cols") fields >> c.cols;
    else if (key == "sms") fields >> cuda_emu::sm_count();
    else if (key == "eps") fields >> c.eps;
    else if (key == "ignore_index") fields >> c.ignore_index;
    else if (key == "act") fields >> c.act;
    else if (key == "inplace") c.inplace = static_cast<bool>(fields >> flag) && flag != 0;
    else if (key == "skip_syncthreads") fields >> c.skip_syncthreads;
    else if (key == "inputs") for (std::string name; fields >> name;) c.inputs.insert(name);
    else fail("unknown key in case.txt: " + key);
    if (fields.fail() && key != "inputs") fail("bad value for " + key + " in case.txt");
  }
  if (c.rows <= 0 || c.cols <= 0) fail("case.txt: bad or missing sizes");
  return c;
}

lk::DType dtype_of(const std::string& name) {
  if (name == "f32") return lk::DType::kFloat32;
  if (name == "f16") return lk::DType::kFloat16;
  if (name == "bf16") return lk::DType::kBFloat16;
  fail("unknown dtype " + name);
}

// Reads and writes the raw files of a case directory; buffers live on the emulated device.
class Files {
 public:
  Files(std::string dir, size_t elem) : dir_(std::move(dir)), elem_(elem) {}

  void* read(const std::string& name, size_t n, size_t elem = 0) {
    return cuda_emu_driver::read_file(path(name), n * (elem != 0 ? elem : elem_));
  }

  // An output of n elements: NaN bytes until written.
  void* alloc(size_t n, size_t elem = 0) {
    return cuda_emu::device_alloc(n * (elem != 0 ? elem : elem_));
  }

  void write(const std::string& name, const void* data, size_t n, size_t elem = 0) {
    cuda_emu_driver::write_file(path(name), data, n * (elem != 0 ? elem : elem_));
  }

 private:
  std::string path(const std::string& name) const { return dir_ + "/" + name + ".bin"; }

  std::string dir_;
  size_t elem_;
};

// Fails with the CUDA error string an entry point returned.
void check(const char* error, const char* what) {
  if (error != nullptr) fail(std::string(what) + ": " + error);
}

void* copy_of(Files& files, const void* src, size_t bytes) {
  void* dst = files.alloc(bytes, 1);
  std::memcpy(dst, src, bytes);
  return dst;
}

void run_norm(const Case& c, Files& f) {
  const size_t n = c.rows * c.cols, cols = c.cols, rows = c.rows;
  const bool rms = c.op == "rms_norm";
  auto optional = [&](const char* name, size_t count) {
    return c.inputs.count(name) ? f.read(name, count) : nullptr;
  };
  lk::NormForwardArgs fw{};
  fw.x = f.read("x", n);
  fw.residual = optional("residual", n);
  fw.weight = optional("weight", cols);
  fw.bias = optional("bias", cols);
  fw.y = f.alloc(n);
  fw.h = fw.residual != nullptr ? f.alloc(n) : nullptr;
  fw.mean = rms ? nullptr : static_cast<float*>(f.alloc(rows, 4));
  fw.rstd = static_cast<float*>(f.alloc(rows, 4));
  fw.rows = c.rows;
  fw.cols = c.cols;
  fw.eps = c.eps;
  fw.rms = rms;
  fw.dtype = dtype_of(c.dtype);
  check(lk::layer_norm_forward_cuda(fw, nullptr), "layer_norm_forward_cuda");
  f.write("y", fw.y, n);
  if (fw.h != nullptr) f.write("h", fw.h, n);
  if (fw.mean != nullptr) f.write("mean", fw.mean, rows, 4);
  f.write("rstd", fw.rstd, rows, 4);

  lk::NormBackwardArgs bw{};
  bw.grad_y = f.read("grad_y", n);
  bw.grad_h = optional("grad_h", n);
  bw.h = fw.h != nullptr ? fw.h : fw.x;
  bw.weight = fw.weight;
  bw.mean = fw.mean;
  bw.rstd = fw.rstd;
  bw.dx = f.alloc(n);
  bw.dweight = fw.weight != nullptr ? f.alloc(cols) : nullptr;
  bw.dbias = fw.bias != nullptr ? f.alloc(cols) : nullptr;
  bw.rows = c.rows;
  bw.cols = c.cols;
  bw.rms = rms;
  bw.dtype = fw.dtype;
  const int64_t workspace = lk::layer_norm_backward_workspace_floats(bw);
  bw.workspace = workspace > 0 ? static_cast<float*>(f.alloc(workspace, 4)) : nullptr;
  check(lk::layer_norm_backward_cuda(bw, nullptr), "layer_norm_backward_cuda");
  f.write("dx", bw.dx, n);
  if (bw.dweight != nullptr) f.write("dweight", bw.dweight, cols);
  if (bw.dbias != nullptr) f.write("dbias", bw.dbias, cols);
}

void run_softmax(const Case& c, Files& f) {
  const size_t n = c.rows * c.cols;
  const lk::SoftmaxForwardArgs fw{f.read("x", n), f.alloc(n), c.rows, c.cols, dtype_of(c.dtype)};
  check(lk::softmax_forward_cuda(fw, nullptr), "softmax_forward_cuda");
  f.write("y", fw.y, n);
  const lk::SoftmaxBackwardArgs bw{f.read("grad_y", n), fw.y, f.alloc(n), c.rows, c.cols,
                                   fw.dtype};
  check(lk::softmax_backward_cuda(bw, nullptr), "softmax_backward_cuda");
  f.write("dx", bw.dx, n);
}

void run_cross_entropy(const Case& c, Files& f, size_t elem) {
  const size_t n = c.rows * c.cols, rows = c.rows;
  const void* logits = f.read("logits", n);
  const auto* target = static_cast<const int64_t*>(f.read("target", rows, 8));
  const lk::CrossEntropyForwardArgs fw{logits, target, static_cast<float*>(f.alloc(rows, 4)),
                                       static_cast<float*>(f.alloc(rows, 4)), c.rows, c.cols,
                                       c.ignore_index, dtype_of(c.dtype)};
  check(lk::cross_entropy_forward_cuda(fw, nullptr), "cross_entropy_forward_cuda");
  f.write("loss", fw.loss, rows, 4);
  f.write("lse", fw.lse, rows, 4);
  // In place: the gradient overwrites (a copy of) the logits it reads.
  void* grad = c.inplace ? copy_of(f, logits, n * elem) : f.alloc(n);
  const lk::CrossEntropyBackwardArgs bw{static_cast<const float*>(f.read("grad_loss", rows, 4)),
                                        c.inplace ? grad : logits, target, fw.lse, grad, c.rows,
                                        c.cols, c.ignore_index, fw.dtype};
  check(lk::cross_entropy_backward_cuda(bw, nullptr), "cross_entropy_backward_cuda");
  f.write("grad", grad, n);
}

void run_activation(const Case& c, Files& f) {
  const size_t n = c.rows * c.cols;
  const lk::Activation act = static_cast<lk::Activation>(c.act);
  const void* pre = f.read("pre", n);
  const lk::ActivationForwardArgs fw{pre, f.alloc(n), c.rows * c.cols, act, dtype_of(c.dtype)};
  check(lk::activation_forward_cuda(fw, nullptr), "activation_forward_cuda");
  f.write("out", fw.out, n);
  void* grad_out = f.read("grad_out", n);
  void* grad_pre = c.inplace ? grad_out : f.alloc(n);
  const lk::ActivationBackwardArgs bw{pre, grad_out, f.alloc(n), grad_pre, fw.n, act, fw.dtype};
  check(lk::activation_backward_cuda(bw, nullptr), "activation_backward_cuda");
  f.write("out_backward", bw.out, n);
  f.write("grad_pre", bw.grad_pre, n);
}

void run_swiglu(const Case& c, Files& f) {
  const size_t n = c.rows * c.cols;
  const void* gate = f.read("gate", n);
  const void* up = f.read("up", n);
  const lk::SwigluForwardArgs fw{gate, up, f.alloc(n), c.rows * c.cols, dtype_of(c.dtype)};
  check(lk::swiglu_forward_cuda(fw, nullptr), "swiglu_forward_cuda");
  f.write("out", fw.out, n);
  void* grad_out = f.read("grad_out", n);
  void* grad_gate = c.inplace ? grad_out : f.alloc(n);
  const lk::SwigluBackwardArgs bw{gate, up, grad_out, f.alloc(n), grad_gate, f.alloc(n), fw.n,
                                  fw.dtype};
  check(lk::swiglu_backward_cuda(bw, nullptr), "swiglu_backward_cuda");
  f.write("out_backward", bw.out, n);
  f.write("grad_gate", bw.grad_gate, n);
  f.write("grad_up", bw.grad_up, n);
}

void run_case(const std::string& dir) {
  const Case c = read_case(dir + "/case.txt");
  cuda_emu::skipped_syncthreads() = c.skip_syncthreads;
  const size_t elem = lk::dtype_size(dtype_of(c.dtype));
  Files files(dir, elem);
  if (c.op == "layer_norm" || c.op == "rms_norm") {
    run_norm(c, files);
  } else if (c.op == "softmax") {
    run_softmax(c, files);
  } else if (c.op == "cross_entropy") {
    run_cross_entropy(c, files, elem);
  } else if (c.op == "activation") {
    run_activation(c, files);
  } else if (c.op == "swiglu") {
    run_swiglu(c, files);
  } else {
    fail("unknown op " + c.op);
  }
}

}  // namespace

int main(int argc, char** argv) {
  return cuda_emu_driver::main(argc, argv, "rows_driver", run_case);
}
