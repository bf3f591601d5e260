// Row reductions and float32-weight matrix products for XLA:CPU (XLA FFI), computed so that each
// row's result depends on that row alone: not on how many rows there are, on which other rows
// share the call, or on trailing zeros.
//
//   grok1_row_sums:   y[r] = sum_j x[r, j]
//   grok1_f32_matmul: y[r, :] = x[r, :] @ W[sel[r]]       (W[m] float32, used as bf16(W) when
//                                                          `rounded`; a row with sel < 0 is 0)
//
// x: [R, N] or [R, I] float32; W: [M, I, O] float32; sel: [R] int32; y float32.
//
// XLA's own reductions and dots pick their summation order from the shapes of the whole call
// (vector width, tiling, threads), so a row's sum can change with the batch around it. Here the
// order is fixed: a row sum adds element j into lane j mod 8 and finishes the eight lanes in one
// fixed tree (SumLanes8), so zeros appended to a row change nothing; a product accumulates over
// i in order for every output.

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTaskElements = 1 << 16;  // elements per task, at least (row sums)

float RowSum(const float* x, int64_t n) {
  alignas(32) float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
#ifdef GROK1_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + j));
  _mm256_store_ps(lanes, acc);
#endif
  for (; j < n; ++j) lanes[j % 8] += x[j];  // the same lanes as the vector loop's
  return grok1::SumLanes8(lanes);
}

ffi::Error RowSumsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 1 || yd[0] != xd[0]) {
    return ffi::Error::InvalidArgument("grok1_row_sums: expected x [R, N] and y [R]");
  }
  const int64_t R = xd[0], N = xd[1];
  const int64_t per_task = std::max<int64_t>(1, kTaskElements / std::max<int64_t>(1, N));
  const int64_t tasks = (R + per_task - 1) / per_task;
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  grok1::ParallelFor(pool, tasks, pool.num_threads(), [&](int64_t t) {
    for (int64_t r = t * per_task; r < std::min(R, (t + 1) * per_task); ++r) {
      yp[r] = RowSum(xp + r * N, N);
    }
  });
  return ffi::Error::Success();
}

inline float RoundBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

#ifdef GROK1_AVX2
inline __m256 RoundBf16x8(__m256 w) {  // RoundBf16 on eight lanes
  const __m256i u = _mm256_castps_si256(w);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i up = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd);
  return _mm256_castsi256_ps(_mm256_and_si256(up, _mm256_set1_epi32(0xFFFF0000u)));
}
#endif

// y[r, c0:c1) = x[r] @ w[:, c0:c1) for one row: w [I, O] float32.
void RowTimesMatrix(const float* x, const float* w, float* y, int64_t I, int64_t O, int64_t c0,
                    int64_t c1, bool rounded) {
  int64_t c = c0;
#ifdef GROK1_AVX2
  for (; c + 8 <= c1; c += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < I; ++i) {
      __m256 wi = _mm256_loadu_ps(w + i * O + c);
      if (rounded) wi = RoundBf16x8(wi);
      acc = _mm256_fmadd_ps(_mm256_set1_ps(x[i]), wi, acc);
    }
    _mm256_storeu_ps(y + c, acc);
  }
#endif
  for (; c < c1; ++c) {
    float acc = 0.0f;
    for (int64_t i = 0; i < I; ++i) {
      const float wi = rounded ? RoundBf16(w[i * O + c]) : w[i * O + c];
      acc += x[i] * wi;
    }
    y[c] = acc;
  }
}

ffi::Error F32MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::Buffer<ffi::S32> sel, ffi::ResultBuffer<ffi::F32> y, bool rounded) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto sd = sel.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || sd.size() != 1 || yd.size() != 2 || wd[1] != xd[1] ||
      sd[0] != xd[0] || yd[0] != xd[0] || yd[1] != wd[2]) {
    return ffi::Error::InvalidArgument("grok1_f32_matmul: expected x [R, I], w [M, I, O], "
                                       "sel [R], y [R, O]");
  }
  const int64_t R = xd[0], I = xd[1], M = wd[0], O = wd[2];
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  const int32_t* sp = sel.typed_data();
  float* yp = y->typed_data();
  for (int64_t r = 0; r < R; ++r) {
    if (sp[r] >= M) {
      return ffi::Error::InvalidArgument("grok1_f32_matmul: sel[" + std::to_string(r) + "] = " +
                                         std::to_string(sp[r]) + " is not below " +
                                         std::to_string(M));
    }
  }
  // tasks: (row, column range); column ranges wide enough to stream the matrix
  const int64_t ranges = std::max<int64_t>(1, std::min<int64_t>(O / 64, 2 * pool.num_threads()));
  const int64_t width = ((O + ranges - 1) / ranges + 7) / 8 * 8;
  grok1::ParallelFor(pool, R * ranges, pool.num_threads(), [&](int64_t t) {
    const int64_t r = t / ranges, c0 = (t % ranges) * width, c1 = std::min(O, c0 + width);
    if (c0 >= c1) return;
    float* yr = yp + r * O;
    if (sp[r] < 0) {
      std::fill(yr + c0, yr + c1, 0.0f);
      return;
    }
    RowTimesMatrix(xp + r * I, wp + sp[r] * I * O, yr, I, O, c0, c1, rounded);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Grok1RowSums, RowSumsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Grok1F32Matmul, F32MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("rounded"));
