// Row reductions and float32-weight matrix products for XLA:CPU (XLA FFI), computed so that each
// row's result depends on that row alone: not on how many rows there are, on which other rows
// share the call, or on trailing zeros.
//
//   grok1_row_sums:    y[r] = sum_j x[r, j]
//   grok1_rms_norm:    y[r, j] = scale[j] * (x[r, j] * (1 / sqrt(sum_j x[r, j]^2 / N + eps)))
//   grok1_softmax:     y[r, :] = softmax(x[r, :])
//   grok1_log_softmax: y[r, :] = x[r, :] - max - log(sum(exp(x[r, :] - max)))
//   grok1_attend_probs: attention's probabilities from its raw scores (below)
//   grok1_f32_matmul: y[r, :] = x[r, :] @ W[sel[r]]       (W[m] float32, used as bf16(W) when
//                                                          `rounded`; a row with sel < 0 is 0)
//
// x: [R, N] or [R, I] float32; W: [M, I, O] float32; sel: [R] int32; y float32.
//
// XLA's own reductions and dots pick their summation order from the shapes of the whole call
// (vector width, tiling, threads), so a row's sum can change with the batch around it. Here the
// order is fixed: a row sum adds element j into lane j mod 8 and finishes the eight lanes in one
// fixed tree (SumLanes8), so zeros appended to a row change nothing; a product accumulates over
// i in order for every output. The RMSNorm is whole here because XLA:CPU contracts a multiply
// into the addition that consumes it (a fused multiply-add) only where it fuses the two, which
// depends on the shapes of the program: the residual add that reads the norm's output must get
// it rounded, as written.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
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

float RowSumOfSquares(const float* x, int64_t n) {  // RowSum of x * x, the same lanes and tree
  alignas(32) float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
#ifdef GROK1_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
  }
  _mm256_store_ps(lanes, acc);
#endif
  for (; j < n; ++j) lanes[j % 8] += x[j] * x[j];
  return grok1::SumLanes8(lanes);
}

ffi::Error RmsNormImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                       ffi::ResultBuffer<ffi::F32> y, float eps) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || scale.dimensions().size() != 1 || scale.dimensions()[0] != xd[1] ||
      y->dimensions().size() != 2 || y->dimensions()[0] != xd[0] ||
      y->dimensions()[1] != xd[1]) {
    return ffi::Error::InvalidArgument("grok1_rms_norm: expected x [R, N], scale [N], y [R, N]");
  }
  const int64_t R = xd[0], N = xd[1];
  const int64_t per_task = std::max<int64_t>(1, kTaskElements / std::max<int64_t>(1, N));
  const int64_t tasks = (R + per_task - 1) / per_task;
  const float* xp = x.typed_data();
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  grok1::ParallelFor(pool, tasks, pool.num_threads(), [&](int64_t t) {
    for (int64_t r = t * per_task; r < std::min(R, (t + 1) * per_task); ++r) {
      const float* xr = xp + r * N;
      const float mean = RowSumOfSquares(xr, N) / static_cast<float>(N);
      const float inv = 1.0f / std::sqrt(mean + eps);
      for (int64_t j = 0; j < N; ++j) yp[r * N + j] = sp[j] * (xr[j] * inv);
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

// exp and tanh, elementwise over arrays, in one fixed sequence of float operations for every
// element (eight at a time; a tail goes through the same eight-lane code, padded), so that an
// element's result does not depend on where it sits. Accurate to a few ulp; exp of anything
// below -88 is exactly 0 (masked attention keys add exact zeros).
#ifdef GROK1_AVX2
inline __m256 Exp8(__m256 x) {
  const __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(-88.0f), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.0f)), _mm256_set1_ps(88.0f));
  // x = n * ln2 + r, |r| <= ln2 / 2, ln2 split in two for an exact n * ln2_hi
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
  r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f,
                        5.0000001201e-1f}) {
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(c));
  }
  y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(y, _mm256_mul_ps(r, r)), r),
                    _mm256_set1_ps(1.0f));
  // times 2^n, built in the exponent field
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(under, y);
}

inline __m256 Tanh8(__m256 x) {
  const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);  // |x|
  // |x| < 0.625: x + x^3 p(x^2); otherwise 1 - 2 / (exp(2|x|) + 1), saturating at 1
  const __m256 z = _mm256_mul_ps(a, a);
  __m256 p = _mm256_set1_ps(-5.70498872745e-3f);
  for (const float c : {2.06390887954e-2f, -5.37397155531e-2f, 1.33314422036e-1f,
                        -3.33332819422e-1f}) {
    p = _mm256_add_ps(_mm256_mul_ps(p, z), _mm256_set1_ps(c));
  }
  const __m256 small = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, z), a), a);
  const __m256 e = Exp8(_mm256_min_ps(_mm256_add_ps(a, a), _mm256_set1_ps(40.0f)));
  const __m256 large = _mm256_sub_ps(
      _mm256_set1_ps(1.0f),
      _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
  const __m256 is_small = _mm256_cmp_ps(a, _mm256_set1_ps(0.625f), _CMP_LT_OQ);
  return _mm256_or_ps(_mm256_blendv_ps(large, small, is_small), sign);
}

// fn(x[0:n)) in place, eight at a time; the tail padded into eight lanes.
template <__m256 (*Fn)(__m256)>
void Apply8(float* x, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, Fn(_mm256_loadu_ps(x + j)));
  if (j < n) {
    alignas(32) float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::copy(x + j, x + n, tail);
    _mm256_store_ps(tail, Fn(_mm256_load_ps(tail)));
    std::copy(tail, tail + (n - j), x + j);
  }
}
inline void ExpInPlace(float* x, int64_t n) { Apply8<Exp8>(x, n); }
inline void TanhInPlace(float* x, int64_t n) { Apply8<Tanh8>(x, n); }
#else
inline void ExpInPlace(float* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = x[j] < -88.0f ? 0.0f : std::exp(x[j]);
}
inline void TanhInPlace(float* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = std::tanh(x[j]);
}
#endif

// x[0:n) <- softmax(x[0:n)) in place: exp(x - max) / sum, the sum in RowSum's order (so that
// entries of exp 0 appended to a row change nothing). `round` rounds each result to bf16.
void SoftmaxInPlace(float* x, int64_t n, bool round) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) top = std::max(top, x[j]);
  for (int64_t j = 0; j < n; ++j) x[j] -= top;
  ExpInPlace(x, n);
  const float total = RowSum(x, n);
  for (int64_t j = 0; j < n; ++j) x[j] = round ? RoundBf16(x[j] / total) : x[j] / total;
}

// x[0:n) <- x - max - log(sum(exp(x - max))) in place (the sum in RowSum's order).
void LogSoftmaxInPlace(float* x, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) top = std::max(top, x[j]);
  std::vector<float> e(n);
  for (int64_t j = 0; j < n; ++j) e[j] = x[j] - top;
  ExpInPlace(e.data(), n);
  const float log_total = std::log(RowSum(e.data(), n));
  for (int64_t j = 0; j < n; ++j) x[j] = (x[j] - top) - log_total;
}

// One row function over x [R, N] into y [R, N], rows split between the pool's threads.
template <void (*RowFn)(float*, int64_t)>
ffi::Error EachRow(const char* name, ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> x,
                   ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || y->dimensions().size() != 2 || y->dimensions()[0] != xd[0] ||
      y->dimensions()[1] != xd[1]) {
    return ffi::Error::InvalidArgument(std::string(name) + ": expected x [R, N] and y [R, N]");
  }
  const int64_t R = xd[0], N = xd[1];
  const int64_t per_task = std::max<int64_t>(1, kTaskElements / std::max<int64_t>(1, N));
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  grok1::ParallelFor(pool, (R + per_task - 1) / per_task, pool.num_threads(), [&](int64_t t) {
    for (int64_t r = t * per_task; r < std::min(R, (t + 1) * per_task); ++r) {
      std::copy(xp + r * N, xp + (r + 1) * N, yp + r * N);
      RowFn(yp + r * N, N);
    }
  });
  return ffi::Error::Success();
}

void SoftmaxRow(float* x, int64_t n) { SoftmaxInPlace(x, n, false); }

ffi::Error SoftmaxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::ResultBuffer<ffi::F32> y) {
  return EachRow<SoftmaxRow>("grok1_softmax", pool, x, y);
}

ffi::Error LogSoftmaxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::ResultBuffer<ffi::F32> y) {
  return EachRow<LogSoftmaxInPlace>("grok1_log_softmax", pool, x, y);
}

// Attention's probabilities (SPEC.md §2) from raw scores s [B, Kv, R, S] (rows r = t * G + g:
// query token t, head g of the KV head's group) and the mask [B, T, S] (true: key j is seen):
//   v = bf16(s) if round, else s;  v = v * mult;  v = cap * tanh(v / cap);  v = -1e30 if masked;
//   p = softmax(v) over j, rounded to bf16 if round.
ffi::Error AttendProbsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> s,
                           ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> p,
                           float mult, float cap, bool round, int64_t group) {
  auto sd = s.dimensions();
  auto md = mask.dimensions();
  if (sd.size() != 4 || md.size() != 3 || md[0] != sd[0] || md[2] != sd[3] || group <= 0 ||
      sd[2] != md[1] * group || p->dimensions().size() != 4) {
    return ffi::Error::InvalidArgument("grok1_attend_probs: expected s [B, Kv, T * G, S] and "
                                       "mask [B, T, S]");
  }
  const int64_t B = sd[0], Kv = sd[1], R = sd[2], S = sd[3], T = md[1];
  const float* sp = s.typed_data();
  const bool* mp = mask.typed_data();
  float* pp = p->typed_data();
  const int64_t rows = B * Kv * R;
  const int64_t per_task = std::max<int64_t>(1, kTaskElements / std::max<int64_t>(1, S));
  grok1::ParallelFor(pool, (rows + per_task - 1) / per_task, pool.num_threads(), [&](int64_t t) {
    for (int64_t i = t * per_task; i < std::min(rows, (t + 1) * per_task); ++i) {
      const int64_t b = i / (Kv * R), tok = (i % R) / group;
      const bool* seen = mp + (b * T + tok) * S;
      const float* in = sp + i * S;
      float* out = pp + i * S;
      for (int64_t j = 0; j < S; ++j) out[j] = ((round ? RoundBf16(in[j]) : in[j]) * mult) / cap;
      TanhInPlace(out, S);
      for (int64_t j = 0; j < S; ++j) out[j] = seen[j] ? cap * out[j] : -1e30f;
      SoftmaxInPlace(out, S, round);
    }
  });
  return ffi::Error::Success();
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(Grok1RmsNorm, RmsNormImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Grok1Softmax, SoftmaxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Grok1AttendProbs, AttendProbsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("mult")
                                  .Attr<float>("cap")
                                  .Attr<bool>("round")
                                  .Attr<int64_t>("group"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Grok1LogSoftmax, LogSoftmaxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
