// What the kernels in this directory share besides work sharing (parallel.h): the vector
// instruction set they build for, and bfloat16 bits as float32.
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

}  // namespace grok1

#endif  // GROK1_KERNELS_COMMON_H_
