// ds4's CPU dense-layer kernel as a torch operator, `torch.ops.ds4_cpu.linear`, so that a compiled decode
// step's C++ wrapper calls it through the dispatcher with no Python in between: about 10 us a call against
// 33 for the Python custom op (docs/perf.md), and a `small` decode step makes 57 such calls. The kernel is
// cpu_moe.cpp's, compiled into this library (its symbols hidden, so they never meet the ctypes copy's).
// Built by cpu_ops.py against torch's headers; where that fails, ds4.engine.layers.linear calls the same
// kernel through ctypes.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#pragma GCC visibility push(hidden)  // the kernel's symbols stay in this library (its headers are in above)
#include "cpu_moe.cpp"
#pragma GCC visibility pop

namespace {

constexpr int64_t KERNEL_ROWS = 32;        // ds4.engine.layers.linear.KERNEL_ROWS
constexpr int64_t THREAD_BYTES = 128 << 10;  // ds4.kernels.cpu_moe.THREAD_BYTES

// x [..., in] @ weight.T in x's dtype, for a float32 or bfloat16 weight [out, in] stored row by row on the
// CPU: up to KERNEL_ROWS rows in the kernel, longer products in torch's GEMM (as cpu_moe.linear and
// ds4.engine.layers.linear._product do, with the same thread count, so the bits are the same)
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight) {
    TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.device().is_cpu(), "weight [out, in] on the CPU");
    TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16, "fp32 or bf16 weight");
    const int64_t in = weight.size(1), out = weight.size(0);
    TORCH_CHECK(x.size(-1) == in, "x's last dimension ", x.size(-1), " against the weight's ", in);
    at::Tensor rows = x.reshape({-1, in});
    if (rows.size(0) > KERNEL_ROWS) return at::linear(x, weight);
    rows = rows.to(at::kFloat).contiguous();
    at::Tensor y = at::empty({rows.size(0), out}, rows.options());
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), weight.nbytes() / THREAD_BYTES));
    const int fmt = weight.scalar_type() == at::kFloat ? 3 : 4;
    const int rc = ds4_linear(rows.data_ptr<float>(), rows.size(0), in, out, static_cast<const uint8_t*>(weight.data_ptr()),
                              fmt, y.data_ptr<float>(), int(threads));
    TORCH_CHECK(rc == 0, "ds4_linear returned ", rc);
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = out;
    return y.to(x.scalar_type()).view(shape);
}

}  // namespace

TORCH_LIBRARY(ds4_cpu, m) { m.def("linear(Tensor x, Tensor weight) -> Tensor"); }
TORCH_LIBRARY_IMPL(ds4_cpu, CPU, m) { m.impl("linear", linear); }
