// ds4's CPU kernels as torch operators, so that a compiled decode step's C++ wrapper calls them through the
// dispatcher with no Python in between:
//   ds4_cpu::linear, the dense layers' kernel: about 10 us a call against 33 for the Python custom op
//     (docs/perf.md), and a `small` decode step makes 57 such calls. The kernel is cpu_moe.cpp's, compiled
//     into this library (its symbols hidden, so they never meet the ctypes copy's).
//   ds4_cpu::moe, the routed experts' kernel (a layer's every (token, expert) pair in one call), in place of
//     the Python custom op that calls back into the expert stack.
//   ds4_cpu::paged_latent_attention and ds4_cpu::sparse_latent_attention, MLA's decode attention over the
//     cache rows where they sit (cpu_attention.cpp).
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

#pragma GCC visibility push(hidden)  // the kernels' symbols stay in this library (their headers are in above)
#include "cpu_moe.cpp"
#include "cpu_attention.cpp"
#pragma GCC visibility pop

namespace {

constexpr int64_t KERNEL_ROWS = 32;        // ds4.engine.layers.linear.KERNEL_ROWS
constexpr int64_t THREAD_BYTES = 128 << 10;  // ds4.kernels.cpu_moe.THREAD_BYTES

// torch's threads, at most one per THREAD_BYTES of weights a call reads (as cpu_moe.py counts them)
int kernel_threads(int64_t bytes) {
    return int(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), bytes / THREAD_BYTES)));
}

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
    const int threads = kernel_threads(weight.nbytes());
    const int fmt = weight.scalar_type() == at::kFloat ? 3 : 4;
    const int rc = ds4_linear(rows.data_ptr<float>(), rows.size(0), in, out, static_cast<const uint8_t*>(weight.data_ptr()),
                              fmt, y.data_ptr<float>(), threads);
    TORCH_CHECK(rc == 0, "ds4_linear returned ", rc);
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = out;
    return y.to(x.scalar_type()).view(shape);
}

// [T, D] in x's dtype: the routed experts' weighted sum in the kernel (ds4_moe), as cpu_moe.moe computes
// it (the same threads and arguments, so the same bits): fmt as cpu_moe.FORMATS, act8 int8 activations
at::Tensor moe(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& expert_ids, const at::Tensor& w13,
               const std::optional<at::Tensor>& s13, const at::Tensor& w2, const std::optional<at::Tensor>& s2,
               int64_t fmt, bool act8, std::optional<double> limit) {
    TORCH_CHECK(x.dim() == 2 && expert_ids.dim() == 2 && weights.sizes() == expert_ids.sizes(),
                "x [T, D], weights and expert_ids [T, K]");
    TORCH_CHECK(w13.device().is_cpu() && w2.device().is_cpu() && w13.is_contiguous() && w2.is_contiguous(),
                "contiguous expert stacks on the CPU");
    TORCH_CHECK(fmt >= 0 && fmt <= 4 && (fmt >= 3) == !s13.has_value() && s13.has_value() == s2.has_value(),
                "format ", fmt, " with", s13.has_value() ? "" : "out", " scales");
    const int64_t T = expert_ids.size(0), K = expert_ids.size(1), E = w13.size(0), D = x.size(1);
    const int64_t inter = w2.size(-1) * (fmt <= 1 ? 2 : 1);
    const at::Tensor xf = x.to(at::kFloat).contiguous(), ids = expert_ids.to(at::kLong).contiguous();
    const at::Tensor wf = weights.to(at::kFloat).contiguous();
    const int64_t* id = ids.data_ptr<int64_t>();
    for (int64_t p = 0; p < T * K; ++p) TORCH_CHECK(id[p] >= -1 && id[p] < E, "expert id ", id[p], " outside the stack's ", E);
    at::Tensor out = at::empty({T, D}, xf.options());
    at::Tensor work = at::empty({T * K * (2 * D + 3 * inter)}, xf.options());
    const int64_t expert_bytes = E ? w13[0].nbytes() + w2[0].nbytes() : 0;
    const int threads = kernel_threads(std::min(T * K, E) * expert_bytes);
    double seconds = 0.;
    const int rc = ds4_moe(xf.data_ptr<float>(), id, wf.data_ptr<float>(), T, K, E, D, inter,
                           static_cast<const uint8_t*>(w13.data_ptr()), s13 ? s13->data_ptr() : nullptr,
                           static_cast<const uint8_t*>(w2.data_ptr()), s2 ? s2->data_ptr() : nullptr, int(fmt), int(act8),
                           limit ? float(*limit) : NAN, out.data_ptr<float>(), work.data_ptr<float>(), threads, &seconds);
    TORCH_CHECK(rc == 0, "ds4_moe returned ", rc);
    return out.to(x.scalar_type());
}

LatentQuery latent_query(const at::Tensor& q, const at::Tensor& pool, double scale, int64_t latent) {
    TORCH_CHECK(q.dim() == 3 && pool.dim() == 2 && q.device().is_cpu() && pool.device().is_cpu(),
                "q [B, H, D] and pool [rows, D] on the CPU");
    TORCH_CHECK(pool.is_contiguous() && (pool.scalar_type() == at::kFloat || pool.scalar_type() == at::kBFloat16),
                "a contiguous fp32 or bf16 pool");
    TORCH_CHECK(q.size(2) == pool.size(1), "q's width ", q.size(2), " against the pool's ", pool.size(1));
    TORCH_CHECK(latent > 0 && latent <= pool.size(1), "latent width ", latent, " outside the rows' ", pool.size(1));
    return {nullptr, pool.data_ptr(), pool.scalar_type() == at::kBFloat16, q.size(0), q.size(1), q.size(2), latent,
            float(scale)};
}

// [B, H, latent] float32: each sequence's queries over its positions [0, seq_lens[b]) through its block table
at::Tensor paged_latent_attention(const at::Tensor& q, const at::Tensor& pool, const at::Tensor& block_table,
                                  const at::Tensor& seq_lens, int64_t block_size, double scale, int64_t latent) {
    LatentQuery a = latent_query(q, pool, scale, latent);
    TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == a.B && seq_lens.numel() == a.B && block_size > 0,
                "block_table [B, blocks] and seq_lens [B] for q's ", a.B, " sequences");
    const at::Tensor table = block_table.to(at::kLong).contiguous(), lens = seq_lens.to(at::kLong).contiguous();
    const int64_t* t = table.data_ptr<int64_t>();
    const int64_t* n = lens.data_ptr<int64_t>();
    const int64_t width = table.size(1), rows = pool.size(0);
    for (int64_t b = 0; b < a.B; ++b) {  // every row read is inside the pool
        TORCH_CHECK(n[b] >= 0 && n[b] <= width * block_size, "sequence ", b, "'s length ", n[b], " past its table");
        for (int64_t k = 0; k < (n[b] + block_size - 1) / block_size; ++k)
            TORCH_CHECK(t[b * width + k] >= 0 && (t[b * width + k] + 1) * block_size <= rows, "block ", t[b * width + k],
                        " outside the pool");
    }
    const at::Tensor qf = q.to(at::kFloat).contiguous();
    a.q = qf.data_ptr<float>();
    at::Tensor out = at::empty({a.B, a.H, latent}, qf.options());
    auto row_of = [&](int64_t b, int64_t j) { return t[b * width + j / block_size] * block_size + j % block_size; };
    latent_attention(a, [&](int64_t b) { return n[b]; }, row_of, out.data_ptr<float>(), at::get_num_threads());
    return out;
}

// [B, H, latent] float32: each sequence's queries over its chosen pool rows [B, k] (-1: none)
at::Tensor sparse_latent_attention(const at::Tensor& q, const at::Tensor& pool, const at::Tensor& rows, double scale,
                                   int64_t latent) {
    LatentQuery a = latent_query(q, pool, scale, latent);
    TORCH_CHECK(rows.dim() == 2 && rows.size(0) == a.B, "rows [B, k] for q's ", a.B, " sequences");
    const at::Tensor chosen = rows.to(at::kLong).contiguous();
    const int64_t* r = chosen.data_ptr<int64_t>();
    const int64_t k = chosen.size(1);
    for (int64_t i = 0; i < chosen.numel(); ++i)
        TORCH_CHECK(r[i] >= -1 && r[i] < pool.size(0), "row ", r[i], " outside the pool's ", pool.size(0));
    const at::Tensor qf = q.to(at::kFloat).contiguous();
    a.q = qf.data_ptr<float>();
    at::Tensor out = at::empty({a.B, a.H, latent}, qf.options());
    latent_attention(a, [&](int64_t) { return k; }, [&](int64_t b, int64_t j) { return r[b * k + j]; },
                     out.data_ptr<float>(), at::get_num_threads());
    return out;
}

}  // namespace

TORCH_LIBRARY(ds4_cpu, m) {
    m.def("isa() -> int", +[]() -> int64_t { return ds4_moe_isa(); });  // the vector paths this build has
    m.def("linear(Tensor x, Tensor weight) -> Tensor");
    m.def("moe(Tensor x, Tensor weights, Tensor expert_ids, Tensor w13, Tensor? s13, Tensor w2, Tensor? s2, int fmt, "
          "bool act8, float? limit) -> Tensor");
    m.def("paged_latent_attention(Tensor q, Tensor pool, Tensor block_table, Tensor seq_lens, int block_size, "
          "float scale, int latent) -> Tensor");
    m.def("sparse_latent_attention(Tensor q, Tensor pool, Tensor rows, float scale, int latent) -> Tensor");
}
TORCH_LIBRARY_IMPL(ds4_cpu, CPU, m) {
    m.impl("linear", linear);
    m.impl("moe", moe);
    m.impl("paged_latent_attention", paged_latent_attention);
    m.impl("sparse_latent_attention", sparse_latent_attention);
}
