// exp(x) for float that compilers vectorize (outlast.serve.kernels): Cody-Waite range reduction and
// Cephes' degree-6 polynomial for expf, within ~2 ulp of it. x is clamped to [-87, 88], whose
// results stay normal floats. The rounding is the add-and-subtract of 1.5 * 2^23, not floorf,
// which GCC does not vectorize without -fno-trapping-math (a loop calling it ran at ~4 ns a value).
#pragma once

#include <cstdint>

namespace outlast_kernels {

inline float exp_clamped(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // nearest integer
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  return p * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
}

}  // namespace outlast_kernels
