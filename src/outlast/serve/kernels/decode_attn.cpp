// Decode attention over the decode copy, one call per layer (outlast.serve.kernels).
//
// For every (decoding sequence, KV head): scores of its G query heads against its slot's first n
// positions, softmax, and the weighted sum of values; the K/V are read once for all G query heads
// (grouped-query attention) and at the exact length (no padding, no mask). Parallel over
// (sequence, head) pairs on ATen's thread pool (torch's OpenMP threads).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "vexp.h"

namespace {

using outlast_kernels::exp_clamped;

template <int D, int GMAX>
void run(const float* q, const float* k, const float* v, float* out, const int64_t* rows, const int64_t* slots,
         const int64_t* lens, int64_t B, int64_t kvh, int64_t G, int64_t qs0, int64_t qs1, int64_t os0,
         int64_t os1, int64_t ks0, int64_t ks1, int64_t ks2, int64_t vs0, int64_t vs1, int64_t vs2, float scale) {
  // (sequence, KV head) pairs dealt out round robin, not in halves: lengths differ, and
  // neighbouring sequences tend to be alike (they started together), so halves could give one
  // thread the long ones.
  const int64_t items = B * kvh;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  at::parallel_for(0, parts, 1, [&](int64_t pbegin, int64_t pend) {
    std::vector<float> s;
    float acc[GMAX][D];
    float mx[GMAX], inv[GMAX];
    for (int64_t part = pbegin; part < pend; ++part) {
      for (int64_t i = part; i < items; i += parts) {
        const int64_t b = i / kvh, h = i % kvh, n = lens[b];
        const float* kb = k + slots[b] * ks0 + h * ks1;
        const float* vb = v + slots[b] * vs0 + h * vs1;
        const float* qi = q + rows[b] * qs0 + h * G * qs1;  // query heads h*G .. h*G+G-1 share KV head h
        float* oi = out + rows[b] * os0 + h * G * os1;
        s.resize(static_cast<size_t>(G * n));
        for (int64_t g = 0; g < G; ++g) mx[g] = -INFINITY;
        for (int64_t l = 0; l < n; ++l) {
          const float* __restrict__ kr = kb + l * ks2;
          for (int64_t g = 0; g < G; ++g) {
            const float* __restrict__ qg = qi + g * qs1;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int d = 0; d < D; ++d) dot += qg[d] * kr[d];
            dot *= scale;
            s[g * n + l] = dot;
            mx[g] = dot > mx[g] ? dot : mx[g];
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          float* sg = s.data() + g * n;
          const float m = mx[g];
          float z = 0.f;
#pragma omp simd reduction(+ : z)
          for (int64_t l = 0; l < n; ++l) {
            const float e = exp_clamped(sg[l] - m);
            sg[l] = e;
            z += e;
          }
          inv[g] = 1.f / z;
          for (int d = 0; d < D; ++d) acc[g][d] = 0.f;
        }
        for (int64_t l = 0; l < n; ++l) {
          const float* __restrict__ vr = vb + l * vs2;
          for (int64_t g = 0; g < G; ++g) {
            const float p = s[g * n + l];
#pragma omp simd
            for (int d = 0; d < D; ++d) acc[g][d] += p * vr[d];
          }
        }
        for (int64_t g = 0; g < G; ++g)
          for (int d = 0; d < D; ++d) oi[g * os1 + d] = acc[g][d] * inv[g];
      }
    }
  });
}

}  // namespace

// For each decoding sequence b: q[rows[b]] ([H, D], query heads of KV head h at h*G .. h*G+G-1)
// attends over k/v[slots[b], h, :lens[b]], written to out[rows[b]]. q, out: [T, H, D] fp32, each
// head's D values contiguous; k, v: [slots, kvh, capacity, D] fp32, rows contiguous; rows, slots,
// lens: [B] int64. Reads the step's rows and writes its output in place: no gather, no scatter.
void decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                      const torch::Tensor& rows, const torch::Tensor& slots, const torch::Tensor& lens, double scale,
                      torch::Tensor& out) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k.dtype() == torch::kFloat32 && v.dtype() == torch::kFloat32 &&
              out.dtype() == torch::kFloat32, "decode_attention: fp32 tensors only");
  for (const torch::Tensor* t : {&rows, &slots, &lens})
    TORCH_CHECK(t->dtype() == torch::kInt64 && t->is_contiguous() && t->dim() == 1 && t->size(0) == lens.size(0),
                "decode_attention: rows, slots and lens must be contiguous int64 of one length");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4 && out.sizes() == q.sizes(), "decode_attention: bad ranks");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "decode_attention: each head's values must be contiguous");
  const int64_t B = lens.size(0), T = q.size(0), H = q.size(1), D = q.size(2), kvh = k.size(1);
  TORCH_CHECK(kvh >= 1 && H % kvh == 0 && v.sizes() == k.sizes() && k.size(3) == D,
              "decode_attention: shapes disagree");
  const int64_t G = H / kvh;
  TORCH_CHECK(G <= 16, "decode_attention: 1 to 16 query heads per KV head");
  const int64_t *rw = rows.data_ptr<int64_t>(), *sl = slots.data_ptr<int64_t>(), *ln = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(rw[b] >= 0 && rw[b] < T, "decode_attention: row out of range");
    TORCH_CHECK(sl[b] >= 0 && sl[b] < k.size(0), "decode_attention: slot out of range");
    TORCH_CHECK(ln[b] >= 1 && ln[b] <= k.size(2), "decode_attention: length out of range");
  }
  const float sc = static_cast<float>(scale);
#define OUTLAST_RUN(DD)                                                                                               \
  run<DD, 16>(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(), rw, sl, ln, B, \
              kvh, G, q.stride(0), q.stride(1), out.stride(0), out.stride(1), k.stride(0), k.stride(1), k.stride(2), \
              v.stride(0), v.stride(1), v.stride(2), sc)
  switch (D) {
    case 8: OUTLAST_RUN(8); break;
    case 16: OUTLAST_RUN(16); break;
    case 32: OUTLAST_RUN(32); break;
    case 64: OUTLAST_RUN(64); break;
    case 128: OUTLAST_RUN(128); break;
    case 256: OUTLAST_RUN(256); break;
    default: TORCH_CHECK(false, "decode_attention: head_dim must be 8, 16, 32, 64, 128 or 256");
  }
#undef OUTLAST_RUN
}

// layer_ops.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor add_rms_norm(at::Tensor& x, const at::Tensor& d, const at::Tensor& w, double eps);
at::Tensor silu_mul(const at::Tensor& gu);
void rope_kv_write(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                   int64_t H, int64_t kvh, at::Tensor& kpool, at::Tensor& vpool, const at::Tensor& slot_mapping,
                   at::Tensor& dk, at::Tensor& dv, const at::Tensor& drows, const at::Tensor& dslots,
                   const at::Tensor& dpos);
at::Tensor pack_panels(const at::Tensor& w);
at::Tensor panel_mm(const at::Tensor& x, const at::Tensor& wp, int64_t n);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // None of them touches a Python object: the GIL is released while they run.
  using nogil = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("decode_attention", &decode_attention, "Decode attention over contiguous per-slot K/V (fp32)", nogil());
  m.def("rms_norm", &rms_norm, "RMSNorm of each row, as a new tensor", nogil());
  m.def("add_rms_norm", &add_rms_norm, "x += d in place, then RMSNorm of each row, as a new tensor", nogil());
  m.def("silu_mul", &silu_mul, "silu(gate) * up of [rows, 2 * inter]", nogil());
  m.def("pack_panels", &pack_panels, "A [in, out] matrix as panels of 32 columns, for panel_mm", nogil());
  m.def("panel_mm", &panel_mm, "x @ w on panels packed by pack_panels", nogil());
  m.def("rope_kv_write", &rope_kv_write, "RoPE on the fused QKV's query and key heads in place, then the K/V writes",
        nogil());
}
