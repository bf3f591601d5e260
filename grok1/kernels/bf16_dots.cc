// float32 x bfloat16 products over arrays of bf16 stored as uint16 bits, for XLA:CPU (XLA FFI):
// attention's two products over one layer of the stacked KV cache, and the tied unembedding.
//
//   grok1_attend_scores:  s[b, k, r, j] = sum_d q[b, k, r, d] * K[layer, rows[b], k, j, d]
//   grok1_attend_values:  o[b, k, r, d] = sum_j p[b, k, r, j] * V[layer, rows[b], k, j, d]
//   grok1_dot_rows:       y[r, v]       = sum_d x[r, d] * T[v, d]
//
// q, p, s, o, x, y: float32; K, V: the whole cache [L, Bc, Kv, Sc, Dh] (grok1.cache.storage_dtype);
// layer: int32 scalar; rows: [B] int32, the cache row of each batch row; T: a [V, D] table. j runs over the first S slots, S being the last
// dimension of s (scores) or of p (values), S <= Sc. Rows r of q and p are the query heads of
// one KV head for each query token.
//
// Without these, XLA:CPU slices the layer out of the cache and widens it to float32 (and, for
// the values, transposes it) before each product, and reads a float32 copy of the embedding
// table (twice the bytes). Here each bf16 is read once, widened in registers or in a small
// buffer, and multiplied in float32. Products of bf16 values are exact in float32, so only the
// summation order differs from XLA's dots. Attention runs one task per (b, k) pair; the
// unembedding one per block of table rows.

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using grok1::Bf16ToF32;

namespace {

constexpr int64_t kChunkBytes = 16 << 10;  // rows widened to float32 at a time: half of L1
constexpr int64_t kTableRows = 256;        // table rows per unembedding task

// Elements of the stored arrays as float32: bf16 bits (uint16) or float32 itself.
inline float ToF32(uint16_t b) { return Bf16ToF32(b); }
inline float ToF32(float f) { return f; }

#ifdef GROK1_AVX2
inline __m256 Widen8(const uint16_t* bits) {  // eight bf16 (as bits) to float32
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bits));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
}
inline __m256 Widen8(const float* f) { return _mm256_loadu_ps(f); }
#endif

// y[r, j] = x[r] . rows[j] for r < R, j < N: x [R, D] float32, rows [N, D] (bf16 bits or
// float32), y rows `y_stride` apart. Each dot product's sum runs over d in the same order
// whatever R and N are (eight lanes, then a fixed tree), so a row's results do not depend on
// the other rows or on how many there are.
template <typename T>
void DotRows(const float* x, const T* rows, float* y, int64_t R, int64_t N, int64_t D,
             int64_t y_stride) {
  // a chunk of rows in float32, reused from L1 by every row of x
  const int64_t chunk = std::max<int64_t>(8, kChunkBytes / (4 * D) / 8 * 8);
  std::vector<float> wide(chunk * D);
  for (int64_t j0 = 0; j0 < N; j0 += chunk) {
    const int64_t n = std::min(chunk, N - j0);
    int64_t i = 0;
#ifdef GROK1_AVX2
    for (; i + 8 <= n * D; i += 8) _mm256_storeu_ps(wide.data() + i, Widen8(rows + j0 * D + i));
#endif
    for (; i < n * D; ++i) wide[i] = ToF32(rows[j0 * D + i]);
    for (int64_t r = 0; r < R; ++r) {
      const float* xr = x + r * D;
      float* yr = y + r * y_stride + j0;
      int64_t j = 0;
#ifdef GROK1_AVX2
      if (D % 8 == 0) {
        // eight dot products at once (eight independent FMA chains keep both FMA pipes busy),
        // summed across lanes together
        for (; j + 8 <= n; j += 8) {
          const float* w = wide.data() + j * D;
          __m256 a[8];
          for (auto& v : a) v = _mm256_setzero_ps();
          for (int64_t d = 0; d < D; d += 8) {
            const __m256 xv = _mm256_loadu_ps(xr + d);
            for (int k = 0; k < 8; ++k) {
              a[k] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + k * D + d), a[k]);
            }
          }
          const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
          const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
          _mm256_storeu_ps(yr + j, _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20),
                                                 _mm256_permute2f128_ps(h0, h1, 0x31)));
        }
      }
#endif
      for (; j < n; ++j) {  // the same sums as the vector path's, one product at a time
        const float* wj = wide.data() + j * D;
#ifdef GROK1_AVX2
        if (D % 8 == 0) {
          __m256 a = _mm256_setzero_ps();
          for (int64_t d = 0; d < D; d += 8) {
            a = _mm256_fmadd_ps(_mm256_loadu_ps(xr + d), _mm256_loadu_ps(wj + d), a);
          }
          yr[j] = grok1::SumLanes(a);
          continue;
        }
#endif
        float acc = 0.0f;
        for (int64_t d = 0; d < D; ++d) acc += xr[d] * wj[d];
        yr[j] = acc;
      }
    }
  }
}

#ifdef GROK1_AVX2
// Columns [d0, d0 + 16) of NR rows of o: 2 x NR accumulators in registers over all S slots.
template <int NR, typename T>
inline void ValuesBlock(const float* p, const T* cached, float* o, int64_t S, int64_t Dh,
                        int64_t d0) {
  __m256 a[NR][2];
  for (int r = 0; r < NR; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
  for (int64_t j = 0; j < S; ++j) {
    const __m256 v0 = Widen8(cached + j * Dh + d0);
    const __m256 v1 = Widen8(cached + j * Dh + d0 + 8);
    for (int r = 0; r < NR; ++r) {
      const __m256 pr = _mm256_set1_ps(p[r * S + j]);
      a[r][0] = _mm256_fmadd_ps(pr, v0, a[r][0]);
      a[r][1] = _mm256_fmadd_ps(pr, v1, a[r][1]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    _mm256_storeu_ps(o + r * Dh + d0, a[r][0]);
    _mm256_storeu_ps(o + r * Dh + d0 + 8, a[r][1]);
  }
}
#endif

// One (b, k) pair: p [R, S], cached rows [S, Dh] (bf16 bits or float32), o [R, Dh]. Each
// output sums over the slots in order, so slots past the context (p = 0) add exact zeros.
template <typename T>
void Values(const float* p, const T* cached, float* o, int64_t R, int64_t S, int64_t Dh) {
  int64_t d0 = 0;
#ifdef GROK1_AVX2
  // blocks of 16 columns by up to 4 rows, each cached row widened once per block
  for (; d0 + 16 <= Dh; d0 += 16) {
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      const float* pr = p + r0 * S;
      float* orow = o + r0 * Dh;
      switch (std::min<int64_t>(4, R - r0)) {
        case 1: ValuesBlock<1>(pr, cached, orow, S, Dh, d0); break;
        case 2: ValuesBlock<2>(pr, cached, orow, S, Dh, d0); break;
        case 3: ValuesBlock<3>(pr, cached, orow, S, Dh, d0); break;
        default: ValuesBlock<4>(pr, cached, orow, S, Dh, d0); break;
      }
    }
  }
#endif
  for (int64_t r = 0; r < R; ++r) {  // the remaining columns (all of them without AVX2)
    for (int64_t d = d0; d < Dh; ++d) {
      float acc = 0.0f;
      for (int64_t j = 0; j < S; ++j) acc += p[r * S + j] * ToF32(cached[j * Dh + d]);
      o[r * Dh + d] = acc;
    }
  }
}

// Checks shapes: x [B, Kv, R, X], cache [L, Bc, Kv, Sc, Dh], layer in [0, L), rows [B] in
// [0, Bc), S <= Sc. Fills the sizes and the offset of this layer in the cache.
ffi::Error Check(const char* name, ffi::Span<const int64_t> xd, ffi::Span<const int64_t> cd,
                 ffi::Span<const int64_t> yd, int32_t layer, const int32_t* rows,
                 ffi::Span<const int64_t> rd, int64_t S, int64_t* B, int64_t* Kv, int64_t* R,
                 int64_t* Bc, int64_t* Sc, int64_t* Dh, int64_t* offset) {
  const std::string prefix = std::string(name) + ": ";
  if (xd.size() != 4 || cd.size() != 5 || yd.size() != 4 || rd.size() != 1) {
    return ffi::Error::InvalidArgument(prefix + "expected rank-4 operands, a rank-5 cache and "
                                       "rank-1 rows");
  }
  *B = xd[0], *Kv = xd[1], *R = xd[2], *Bc = cd[1], *Sc = cd[3], *Dh = cd[4];
  if (rd[0] != *B || cd[2] != *Kv || yd[0] != *B || yd[1] != *Kv || yd[2] != *R || S > *Sc) {
    return ffi::Error::InvalidArgument(prefix + "inconsistent shapes");
  }
  if (layer < 0 || layer >= cd[0]) {
    return ffi::Error::InvalidArgument(prefix + "layer " + std::to_string(layer) +
                                       " is outside [0, " + std::to_string(cd[0]) + ")");
  }
  for (int64_t b = 0; b < *B; ++b) {
    if (rows[b] < 0 || rows[b] >= *Bc) {
      return ffi::Error::InvalidArgument(prefix + "rows[" + std::to_string(b) + "] = " +
                                         std::to_string(rows[b]) + " is outside [0, " +
                                         std::to_string(*Bc) + ")");
    }
  }
  *offset = layer * (*Bc) * (*Kv) * (*Sc) * (*Dh);
  return ffi::Error::Success();
}

// Threads for `bytes` of cache: small reads are not worth waking the pool.
int64_t ThreadsFor(const ffi::ThreadPool& pool, int64_t bytes) {
  return bytes < (256 << 10) ? 1 : std::max<int64_t>(1, pool.num_threads());
}

// Attention's two products, one task per (b, k) pair over this layer of the cache. Scores:
// `in` is q [B, Kv, R, Dh], `out` s [B, Kv, R, S]; values: `in` is p [B, Kv, R, S], `out`
// o [B, Kv, R, Dh].
template <bool kScores, typename T>
ffi::Error Attend(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> in, ffi::AnyBuffer cache,
                  ffi::BufferR0<ffi::S32> layer, ffi::Buffer<ffi::S32> rows,
                  ffi::ResultBuffer<ffi::F32> out) {
  const char* name = kScores ? "grok1_attend_scores" : "grok1_attend_values";
  int64_t B, Kv, R, Bc, Sc, Dh, offset;
  const int64_t S = (kScores ? out->dimensions() : in.dimensions()).back();
  const int32_t* row = rows.typed_data();
  if (auto e = Check(name, in.dimensions(), cache.dimensions(), out->dimensions(),
                     layer.typed_data()[0], row, rows.dimensions(), S, &B, &Kv, &R, &Bc, &Sc,
                     &Dh, &offset);
      e.failure()) {
    return e;
  }
  if ((kScores ? in.dimensions() : out->dimensions())[3] != Dh) {
    return ffi::Error::InvalidArgument(std::string(name) + ": the head size is not the cache's");
  }
  const float* x = in.typed_data();
  const T* layer_cache = static_cast<const T*>(cache.untyped_data()) + offset;
  float* y = out->typed_data();
  grok1::ParallelFor(pool, B * Kv, ThreadsFor(pool, B * Kv * S * Dh * sizeof(T)), [&](int64_t t) {
    const int64_t b = t / Kv, k = t % Kv;
    const T* cached = layer_cache + (row[b] * Kv + k) * Sc * Dh;
    if (kScores) {
      DotRows(x + t * R * Dh, cached, y + t * R * S, R, S, Dh, S);
    } else {
      Values(x + t * R * S, cached, y + t * R * Dh, R, S, Dh);
    }
  });
  return ffi::Error::Success();
}

// The cache holds bf16 bits (uint16) or float32.
template <bool kScores>
ffi::Error AttendImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> in, ffi::AnyBuffer cache,
                      ffi::BufferR0<ffi::S32> layer, ffi::Buffer<ffi::S32> rows,
                      ffi::ResultBuffer<ffi::F32> out) {
  switch (cache.element_type()) {
    case ffi::DataType::U16: return Attend<kScores, uint16_t>(pool, in, cache, layer, rows, out);
    case ffi::DataType::F32: return Attend<kScores, float>(pool, in, cache, layer, rows, out);
    default:
      return ffi::Error::InvalidArgument("grok1_attend: the cache must be uint16 or float32");
  }
}

template <typename T>
void DotTable(ffi::ThreadPool& pool, const float* xp, const T* tp, float* yp, int64_t R,
              int64_t D, int64_t V) {
  const int64_t tasks = (V + kTableRows - 1) / kTableRows;
  grok1::ParallelFor(pool, tasks, ThreadsFor(pool, V * D * sizeof(T)), [&](int64_t t) {
    const int64_t v0 = t * kTableRows;
    DotRows(xp, tp + v0 * D, yp + v0, R, std::min(kTableRows, V - v0), D, V);
  });
}

ffi::Error DotRowsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer table,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto td = table.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || td.size() != 2 || yd.size() != 2 || td[1] != xd[1] || yd[0] != xd[0] ||
      yd[1] != td[0]) {
    return ffi::Error::InvalidArgument("grok1_dot_rows: expected x [R, D], table [V, D], y [R, V]");
  }
  const int64_t R = xd[0], D = xd[1], V = td[0];
  switch (table.element_type()) {
    case ffi::DataType::U16:
      DotTable(pool, x.typed_data(), static_cast<const uint16_t*>(table.untyped_data()),
               y->typed_data(), R, D, V);
      return ffi::Error::Success();
    case ffi::DataType::F32:
      DotTable(pool, x.typed_data(), static_cast<const float*>(table.untyped_data()),
               y->typed_data(), R, D, V);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("grok1_dot_rows: the table must be uint16 or float32");
  }
}

}  // namespace

// Both attention products: (in, cache, layer, rows) -> out.
#define GROK1_ATTEND_BINDING                 \
  ffi::Ffi::Bind()                           \
      .Ctx<ffi::ThreadPool>()                \
      .Arg<ffi::Buffer<ffi::F32>>()          \
      .Arg<ffi::AnyBuffer>()                 \
      .Arg<ffi::BufferR0<ffi::S32>>()        \
      .Arg<ffi::Buffer<ffi::S32>>()          \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(Grok1AttendScores, AttendImpl<true>, GROK1_ATTEND_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(Grok1AttendValues, AttendImpl<false>, GROK1_ATTEND_BINDING);

XLA_FFI_DEFINE_HANDLER_SYMBOL(Grok1DotRows, DotRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
