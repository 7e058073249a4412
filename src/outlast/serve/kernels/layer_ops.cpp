// The element-wise parts of a decoder layer, fused (outlast.serve.kernels): RMSNorm (with the
// residual add before it), RoPE with the K/V cache writes after it, and SwiGLU's SiLU-and-multiply;
// and the layers' GEMMs on weights packed in panels of 32 columns (panel_mm).
//
// Each replaces 3 to 12 torch ops per layer. At the row counts of a decode step (1 to 64 rows of a
// few hundred values) every torch op costs more in dispatch, allocation and OpenMP hand-off than
// in arithmetic: 30 layers of ~40 small ops were 19 ms of a 16-sequence step and 34 ms of a
// 32-sequence one on the 2-core EPYC. Rows are split over ATen's threads only when there are
// enough of them to pay for it (prefill chunks).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "vexp.h"

namespace {

constexpr int64_t kGrainValues = 1 << 16;  // values per thread below which a call stays on one thread

int64_t grain_rows(int64_t row_values) { return std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, row_values)); }

using outlast_kernels::exp_clamped;

typedef float v16 __attribute__((vector_size(64)));  // 16 floats (two AVX2 registers where there is no AVX-512)

constexpr int kPanel = 32;  // columns per packed panel
constexpr int kRows = 8;    // rows per register block: 8 rows x 32 columns = 16 vector accumulators

// out[m, 0..32) = x[m, :] @ panel for MB rows: the panel ([K][32], contiguous) is streamed once per
// block, each value of x broadcast against two vectors of it. `cols` < 32 writes only that many.
template <int MB>
inline void panel_block(const float* __restrict__ x, int64_t xs, const float* __restrict__ wp, int64_t K,
                        float* __restrict__ out, int64_t os, int cols) {
  v16 a0[MB], a1[MB];
  for (int m = 0; m < MB; ++m) a0[m] = a1[m] = v16{};
  for (int64_t k = 0; k < K; ++k) {
    v16 w0, w1;
    std::memcpy(&w0, wp + k * kPanel, sizeof w0);
    std::memcpy(&w1, wp + k * kPanel + 16, sizeof w1);
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const float xv = x[m * xs + k];
      a0[m] += xv * w0;
      a1[m] += xv * w1;
    }
  }
  for (int m = 0; m < MB; ++m) {
    if (cols == kPanel) {
      std::memcpy(out + m * os, &a0[m], sizeof a0[m]);
      std::memcpy(out + m * os + 16, &a1[m], sizeof a1[m]);
    } else {
      float tmp[kPanel];
      std::memcpy(tmp, &a0[m], sizeof a0[m]);
      std::memcpy(tmp + 16, &a1[m], sizeof a1[m]);
      std::memcpy(out + m * os, tmp, cols * sizeof(float));
    }
  }
}

void panel_rows(const float* x, int64_t xs, const float* wp, int64_t K, float* out, int64_t os, int64_t M, int cols) {
  int64_t m = 0;
  for (; m + kRows <= M; m += kRows) panel_block<kRows>(x + m * xs, xs, wp, K, out + m * os, os, cols);
  x += m * xs;
  out += m * os;
  switch (M - m) {
    case 1: panel_block<1>(x, xs, wp, K, out, os, cols); break;
    case 2: panel_block<2>(x, xs, wp, K, out, os, cols); break;
    case 3: panel_block<3>(x, xs, wp, K, out, os, cols); break;
    case 4: panel_block<4>(x, xs, wp, K, out, os, cols); break;
    case 5: panel_block<5>(x, xs, wp, K, out, os, cols); break;
    case 6: panel_block<6>(x, xs, wp, K, out, os, cols); break;
    case 7: panel_block<7>(x, xs, wp, K, out, os, cols); break;
    default: break;
  }
}

inline void rms_row(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ out, int64_t n,
                    float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

void check_rows(const at::Tensor& x, const at::Tensor& w, const char* what) {
  TORCH_CHECK(x.dtype() == at::kFloat && w.dtype() == at::kFloat, what, ": fp32 tensors only");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, what, ": x must be [rows, hidden] with contiguous rows");
  TORCH_CHECK(w.dim() == 1 && w.is_contiguous() && w.size(0) == x.size(1), what, ": weight must be [hidden]");
}

void check_index(const at::Tensor& t, int64_t n, const char* what, const char* name) {
  TORCH_CHECK(t.dtype() == at::kLong && t.dim() == 1 && t.is_contiguous() && t.size(0) == n, what, ": ", name,
              " must be contiguous int64 of length ", n);
}

}  // namespace

// RMSNorm of each row of x ([rows, hidden] fp32): w * x / sqrt(mean(x^2) + eps), as a new tensor.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_rows(x, w, "rms_norm");
  const int64_t T = x.size(0), C = x.size(1), xs = x.stride(0);
  at::Tensor out = at::empty({T, C}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, T, grain_rows(C), [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) rms_row(xp + t * xs, wp, op + t * C, C, e);
  });
  return out;
}

// x += d in place (the residual add), then RMSNorm of the result, as a new tensor.
at::Tensor add_rms_norm(at::Tensor& x, const at::Tensor& d, const at::Tensor& w, double eps) {
  check_rows(x, w, "add_rms_norm");
  TORCH_CHECK(d.dtype() == at::kFloat && d.sizes() == x.sizes() && d.stride(1) == 1,
              "add_rms_norm: d must be fp32 of x's shape with contiguous rows");
  const int64_t T = x.size(0), C = x.size(1), xs = x.stride(0), ds = d.stride(0);
  at::Tensor out = at::empty({T, C}, x.options());
  float* xp = x.data_ptr<float>();
  const float *dp = d.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, T, grain_rows(C), [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) {
      float* __restrict__ xr = xp + t * xs;
      const float* __restrict__ dr = dp + t * ds;
#pragma omp simd
      for (int64_t i = 0; i < C; ++i) xr[i] += dr[i];
      rms_row(xr, wp, op + t * C, C, e);
    }
  });
  return out;
}

// SwiGLU's activation: gu is [rows, 2 * inter] (gate, then up); returns silu(gate) * up, [rows, inter].
at::Tensor silu_mul(const at::Tensor& gu) {
  TORCH_CHECK(gu.dtype() == at::kFloat && gu.dim() == 2 && gu.stride(1) == 1 && gu.size(1) % 2 == 0,
              "silu_mul: gu must be fp32 [rows, 2 * inter] with contiguous rows");
  const int64_t T = gu.size(0), I = gu.size(1) / 2, gs = gu.stride(0);
  at::Tensor out = at::empty({T, I}, gu.options());
  const float* gp = gu.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, grain_rows(I), [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) {
      const float* __restrict__ g = gp + t * gs;
      const float* __restrict__ u = g + I;
      float* __restrict__ o = op + t * I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) o[i] = g[i] / (1.f + exp_clamped(-g[i])) * u[i];
    }
  });
  return out;
}

// RoPE on the query and key heads of the step's fused QKV, in place, then the K/V writes:
// every row's key and value heads to its slot of the paged pool, and each decode's to its place
// in the decode copy.
//   qkv: [T, (H + 2 * kvh) * D] fp32, rows contiguous: H query heads, kvh key heads, kvh value heads.
//   cos, sin: [max_position, D] tables; positions: [T] int64.
//   kpool, vpool: one layer's pool, [kvh, blocks, block_size, D] contiguous; slot_mapping: [T] int64,
//     block * block_size + offset.
//   dk, dv: one layer's decode copy, [slots, kvh, capacity, D] (rows contiguous), or empty tensors;
//     drows, dslots, dpos: [B] int64, decode b's row of the step, slot, and position in its slot.
void rope_kv_write(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                   int64_t H, int64_t kvh, at::Tensor& kpool, at::Tensor& vpool, const at::Tensor& slot_mapping,
                   at::Tensor& dk, at::Tensor& dv, const at::Tensor& drows, const at::Tensor& dslots,
                   const at::Tensor& dpos) {
  const char* what = "rope_kv_write";
  TORCH_CHECK(qkv.dtype() == at::kFloat && cos.dtype() == at::kFloat && sin.dtype() == at::kFloat &&
              kpool.dtype() == at::kFloat && vpool.dtype() == at::kFloat, what, ": fp32 tensors only");
  TORCH_CHECK(H >= 1 && kvh >= 1 && qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) % (H + 2 * kvh) == 0, what,
              ": qkv must be [tokens, (H + 2 * kv_heads) * head_dim] with contiguous rows");
  const int64_t T = qkv.size(0), D = qkv.size(1) / (H + 2 * kvh), half = D / 2, qs = qkv.stride(0);
  TORCH_CHECK(D % 2 == 0, what, ": head_dim must be even");
  TORCH_CHECK(cos.dim() == 2 && cos.is_contiguous() && sin.sizes() == cos.sizes() && sin.is_contiguous() &&
              cos.size(1) == D, what, ": cos and sin must be contiguous [max_position, head_dim]");
  check_index(positions, T, what, "positions");
  check_index(slot_mapping, T, what, "slot_mapping");
  TORCH_CHECK(kpool.dim() == 4 && kpool.is_contiguous() && vpool.sizes() == kpool.sizes() && vpool.is_contiguous() &&
              kpool.size(0) == kvh && kpool.size(3) == D, what, ": pools must be contiguous [kv_heads, blocks, block_size, head_dim]");
  const int64_t B = drows.numel(), pool_slots = kpool.size(1) * kpool.size(2);
  check_index(drows, B, what, "drows");
  check_index(dslots, B, what, "dslots");
  check_index(dpos, B, what, "dpos");
  if (B > 0)
    TORCH_CHECK(dk.dtype() == at::kFloat && dk.dim() == 4 && dv.sizes() == dk.sizes() && dv.dtype() == at::kFloat &&
                dk.size(1) == kvh && dk.size(3) == D && dk.stride(3) == 1 && dv.stride(3) == 1 &&
                dv.strides() == dk.strides(), what, ": decode copies must be [slots, kv_heads, capacity, head_dim]");
  const int64_t *pos = positions.data_ptr<int64_t>(), *sm = slot_mapping.data_ptr<int64_t>();
  const int64_t *dr = drows.data_ptr<int64_t>(), *ds = dslots.data_ptr<int64_t>(), *dp = dpos.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos.size(0), what, ": position ", pos[t], " of row ", t, " is past the tables");
    TORCH_CHECK(sm[t] >= 0 && sm[t] < pool_slots, what, ": slot ", sm[t], " of row ", t, " is outside the pool");
  }
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(dr[b] >= 0 && dr[b] < T, what, ": decode row out of range");
    TORCH_CHECK(ds[b] >= 0 && ds[b] < dk.size(0), what, ": decode slot out of range");
    TORCH_CHECK(dp[b] >= 0 && dp[b] < dk.size(2), what, ": decode position out of range");
  }
  float* q = qkv.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float *kp = kpool.data_ptr<float>(), *vp = vpool.data_ptr<float>();
  const int64_t rows = H + kvh, head_stride = pool_slots * D;
  at::parallel_for(0, T, grain_rows(qkv.size(1)), [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) {
      float* row = q + t * qs;
      const float* __restrict__ c = cp + pos[t] * D;
      const float* __restrict__ s = sp + pos[t] * D;
      for (int64_t h = 0; h < rows; ++h) {  // query heads, then key heads
        float* __restrict__ x = row + h * D;
#pragma omp simd
        for (int64_t j = 0; j < half; ++j) {
          const float x1 = x[j], x2 = x[j + half];
          x[j] = x1 * c[j] - x2 * s[j];
          x[j + half] = x2 * c[j + half] + x1 * s[j + half];
        }
      }
      const float* kr = row + H * D;
      const float* vr = kr + kvh * D;
      for (int64_t h = 0; h < kvh; ++h) {
        std::memcpy(kp + h * head_stride + sm[t] * D, kr + h * D, D * sizeof(float));
        std::memcpy(vp + h * head_stride + sm[t] * D, vr + h * D, D * sizeof(float));
      }
    }
  });
  if (B > 0) {
    float *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
    const int64_t s0 = dk.stride(0), s1 = dk.stride(1), s2 = dk.stride(2);
    for (int64_t b = 0; b < B; ++b) {
      const float* kr = q + dr[b] * qs + H * D;
      const float* vr = kr + kvh * D;
      for (int64_t h = 0; h < kvh; ++h) {
        const int64_t off = ds[b] * s0 + h * s1 + dp[b] * s2;
        std::memcpy(dkp + off, kr + h * D, D * sizeof(float));
        std::memcpy(dvp + off, vr + h * D, D * sizeof(float));
      }
    }
  }
}

// A [K, N] fp32 matrix (the serving layout: inputs by outputs) as panels of 32 columns,
// [ceil(N / 32), K, 32], the last one padded with zeros: what panel_mm reads.
at::Tensor pack_panels(const at::Tensor& w) {
  TORCH_CHECK(w.dtype() == at::kFloat && w.dim() == 2, "pack_panels: w must be fp32 [in, out]");
  const int64_t K = w.size(0), N = w.size(1), P = (N + kPanel - 1) / kPanel;
  at::Tensor padded = N == P * kPanel ? w : at::constant_pad_nd(w, {0, P * kPanel - N});
  return padded.view({K, P, kPanel}).permute({1, 0, 2}).contiguous();
}

// x @ w for x [M, K] fp32 (rows contiguous) and w packed by pack_panels from a [K, n] matrix; a
// new [M, n] tensor. Panels are shared out over ATen's threads; each streams its panel once per 8
// rows. Measured on the 2-core EPYC (AVX-512), SmolLM2-135M's 120 layer matrices from DRAM:
// 1.2-2.3x oneDNN's packed GEMMs from 1 to 32 rows, even at 512.
at::Tensor panel_mm(const at::Tensor& x, const at::Tensor& wp, int64_t n) {
  TORCH_CHECK(x.dtype() == at::kFloat && wp.dtype() == at::kFloat, "panel_mm: fp32 tensors only");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "panel_mm: x must be [rows, in] with contiguous rows");
  TORCH_CHECK(wp.dim() == 3 && wp.is_contiguous() && wp.size(2) == kPanel && wp.size(1) == x.size(1), "panel_mm: w must be "
              "packed by pack_panels from a matrix of ", x.size(1), " rows, got shape ", wp.sizes());
  const int64_t M = x.size(0), K = x.size(1), P = wp.size(0);
  TORCH_CHECK(n > (P - 1) * kPanel && n <= P * kPanel, "panel_mm: n does not match the packed panels");
  at::Tensor out = at::empty({M, n}, x.options());
  if (M == 0) return out;
  const float *xp = x.data_ptr<float>(), *w = wp.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t xs = x.stride(0);
  at::parallel_for(0, P, 1, [&](int64_t a, int64_t b) {
    for (int64_t p = a; p < b; ++p)
      panel_rows(xp, xs, w + p * K * kPanel, K, o + p * kPanel, n, M,
                 static_cast<int>(std::min<int64_t>(kPanel, n - p * kPanel)));
  });
  return out;
}
