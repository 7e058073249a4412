// Decode attention over the decode copy, one call per layer (outlast.serve.kernels).
//
// For every (sequence slot, KV head): scores of its G query heads against the slot's first n
// positions, softmax, and the weighted sum of values; the slots' K/V are read once for all G
// query heads (grouped-query attention) and at their exact length (no padding, no mask).
// Parallel over (slot, head) pairs on ATen's thread pool (torch's OpenMP threads).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

// exp(x) for the softmax's x <= 0 (scores minus their maximum): Cody-Waite range reduction and a
// degree-6 polynomial (Cephes' expf), written so that `omp simd` vectorizes it; within ~2 ulp of
// expf. Inputs below -87 give exp(-87) ~ 1.6e-38 instead of a denormal or 0.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof scale);
  return p * scale;
}

template <int D, int GMAX>
void run(const float* q, const float* k, const float* v, const int64_t* lens, float* out, int64_t slots,
         int64_t kvh, int64_t G, int64_t ks0, int64_t ks1, int64_t ks2, int64_t vs0, int64_t vs1, int64_t vs2,
         float scale) {
  // (slot, head) pairs dealt out round robin, not in halves: lengths differ, and neighbouring
  // slots tend to be alike (they started together), so halves could give one thread the long ones.
  const int64_t items = slots * kvh;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  at::parallel_for(0, parts, 1, [&](int64_t pbegin, int64_t pend) {
    std::vector<float> s;
    float acc[GMAX][D];
    float mx[GMAX], inv[GMAX];
    for (int64_t part = pbegin; part < pend; ++part)
    for (int64_t i = part; i < items; i += parts) {
      const int64_t slot = i / kvh, h = i % kvh, n = lens[slot];
      const float* kb = k + slot * ks0 + h * ks1;
      const float* vb = v + slot * vs0 + h * vs1;
      const float* qi = q + i * G * D;
      float* oi = out + i * G * D;
      s.resize(static_cast<size_t>(G * n));
      for (int64_t g = 0; g < G; ++g) mx[g] = -INFINITY;
      for (int64_t l = 0; l < n; ++l) {
        const float* __restrict__ kr = kb + l * ks2;
        for (int64_t g = 0; g < G; ++g) {
          const float* __restrict__ qg = qi + g * D;
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
          const float e = exp_nonpositive(sg[l] - m);
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
        for (int d = 0; d < D; ++d) oi[g * D + d] = acc[g][d] * inv[g];
    }
  });
}

}  // namespace

// q [slots * kvh, G, D] contiguous fp32; k, v [slots, kvh, >= max(lens), D] fp32 with the last dim
// contiguous; lens [slots] int64, each >= 1; out [slots * kvh, G, D] contiguous fp32.
void decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                      const torch::Tensor& lens, double scale, torch::Tensor& out) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k.dtype() == torch::kFloat32 && v.dtype() == torch::kFloat32 &&
              out.dtype() == torch::kFloat32, "decode_attention: fp32 tensors only");
  TORCH_CHECK(lens.dtype() == torch::kInt64 && lens.is_contiguous(), "decode_attention: lens must be contiguous int64");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4 && out.sizes() == q.sizes(), "decode_attention: bad ranks");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous(), "decode_attention: q and out must be contiguous");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: K/V rows must be contiguous");
  const int64_t slots = lens.size(0), kvh = k.size(1), G = q.size(1), D = q.size(2);
  TORCH_CHECK(k.size(0) >= slots && v.size(0) >= slots && v.size(1) == kvh && k.size(3) == D && v.size(3) == D &&
              q.size(0) == slots * kvh, "decode_attention: shapes disagree");
  const int64_t* ln = lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < slots; ++i)
    TORCH_CHECK(ln[i] >= 1 && ln[i] <= k.size(2) && ln[i] <= v.size(2), "decode_attention: length out of range");
  TORCH_CHECK(G >= 1 && G <= 16, "decode_attention: 1 to 16 query heads per KV head");
  const float sc = static_cast<float>(scale);
#define OUTLAST_RUN(DD)                                                                                          \
  run<DD, 16>(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), ln, out.data_ptr<float>(), slots, \
              kvh, G, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), sc)
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "Decode attention over contiguous per-slot K/V (fp32)");
}
