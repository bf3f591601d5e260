// What the kernels in this directory share besides work sharing (parallel.h): the vector
// instruction set they build for, bfloat16 bits as float32, and how eight lanes are summed.
#ifndef GROK1_KERNELS_COMMON_H_
#define GROK1_KERNELS_COMMON_H_

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GROK1_AVX2 1
#endif

namespace grok1 {

inline float Bf16ToF32(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Eight partial sums added in one fixed tree, ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)):
// the order in which every eight-lane sum of these kernels is finished.
inline float SumLanes8(const float* l) {
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

#ifdef GROK1_AVX2
inline float SumLanes(__m256 v) {
  alignas(32) float l[8];
  _mm256_store_ps(l, v);
  return SumLanes8(l);
}
#endif

}  // namespace grok1

#endif  // GROK1_KERNELS_COMMON_H_
