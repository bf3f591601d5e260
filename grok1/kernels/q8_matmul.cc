// int8 weight x float32 activation matrix products for XLA:CPU, as an XLA FFI custom call.
//
//   y[r, :] = x[r, :] @ W[sel[r]],   W[m] = bf16(q[m] * scales[m][group])   (or unrounded)
//
// x: [R, I] f32; q: [M, I, O] int8; scales: [M * G, O] bf16, matrix m's G groups in rows
// [m * G, (m + 1) * G), G dividing I (row i uses group i / (I / G)); sel: [R] int32 below M (a
// row with sel < 0 is zero); y: [R, O] f32. Each output sums over i in order, whatever the other
// rows are, so a row's result depends on that row alone. Attribute `rounded`: round each dequantised weight to bfloat16 (round to
// nearest even), as the release does (SPEC.md §4).
//
// XLA:CPU does not fuse the int8 -> float conversion into its dot kernels, so without this kernel
// every selected matrix is first written out in float32 and read back (several bytes moved per
// one-byte weight). Here each weight is loaded once as int8, dequantised and rounded in registers
// and multiplied into float32 accumulators (unrounded weights skip the dequantisation: the scales
// multiply the sums of each group instead). Rows that select the same matrix share one pass over
// it. Products of bf16-exact values are exact in float32, so only the summation order differs
// from a float32 dot. Work is split into (matrix, column block) tasks run on XLA's intra-op
// thread pool; the calling thread takes tasks too, so it never waits for a task nobody runs.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using grok1::Bf16ToF32;

namespace {

constexpr int64_t kMaxTaskCols = 1024;  // columns per task, at most (wide tasks stream best)

struct Problem {
  const float* x;
  const int8_t* q;
  const uint16_t* scales;
  float* y;
  int64_t I, O, G;
  bool rounded;
};

struct Task {
  int64_t matrix;       // index into q's leading axis
  int64_t row_begin;    // the sorted rows [row_begin, row_end) select `matrix`
  int64_t row_end;
  int64_t col_begin;
  int64_t col_end;
};

inline float RoundBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

// Columns [c0, c1) of rows `rows` of y, one scalar column at a time (tails, non-AVX2 builds).
void ScalarColumns(const Problem& p, const int8_t* q, const uint16_t* s, const int64_t* rows,
                   int64_t n_rows, int64_t c0, int64_t c1) {
  const int64_t per_group = p.I / p.G;
  std::vector<float> acc(n_rows);
  for (int64_t c = c0; c < c1; ++c) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t g = 0; g < p.G; ++g) {
      const float scale = Bf16ToF32(s[g * p.O + c]);
      for (int64_t i = g * per_group; i < (g + 1) * per_group; ++i) {
        float w = static_cast<float>(q[i * p.O + c]) * scale;
        if (p.rounded) w = RoundBf16(w);
        for (int64_t r = 0; r < n_rows; ++r) acc[r] += p.x[rows[r] * p.I + i] * w;
      }
    }
    for (int64_t r = 0; r < n_rows; ++r) p.y[rows[r] * p.O + c] = acc[r];
  }
}

#ifdef GROK1_AVX2
constexpr int64_t kTileRows = 16;  // matrix rows per tile (see Columns)

// Eight int8 weights as float32.
inline __m256 Int8x8(const int8_t* q) {
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

// Eight int8 weights times their scales `s`, rounded to bfloat16 (kept in float32). The
// rounding is Veltkamp's split of w = q * s (exact in float32: at most 16 significant bits):
// c = fl(w * (2^16 + 1)), hi = fl(c - fl(c - w)) is w rounded to 24 - 16 = 8 significant bits,
// to nearest; over every int8 value and every bf16 significand it equals round-to-nearest-even
// (tests/test_kernels.py checks all of them). Here w is never formed on its own:
// `sc` = s * (2^16 + 1) is exact in float32 (8 + 16 bits), so fl(q * sc) = fl(w * (2^16 + 1)),
// and one fused multiply-subtract gives fl(q * s - c) = -fl(c - w). Four float ops per eight
// weights. Built with -ffp-contract=off: a compiler that fused c's multiply into the add
// would skip the rounding of c and return w unrounded.
inline __m256 Dequant8Rounded(const int8_t* q, const float* s, const float* sc) {
  const __m256 qf = Int8x8(q);
  const __m256 c = _mm256_mul_ps(qf, _mm256_loadu_ps(sc));
  const __m256 d = _mm256_fmsub_ps(qf, _mm256_loadu_ps(s), c);
  return _mm256_add_ps(c, d);
}

// Rows [i0, i1) of the matrix times columns [c, c + 8 * NV), for RB rows of x (`rows`), into
// their accumulators (`acc` + r * width). Rounded: the weights are dequantised and rounded
// (scales `sg`, `sgc` = sg * (2^16 + 1)); otherwise the int8 values themselves are multiplied
// in and the caller applies the group's scales to the sums (see Columns). Each weight is
// converted once per call and the RB x NV accumulators stay in registers.
template <int NV, int RB, bool kRounded>
__attribute__((always_inline)) inline void Tile(const Problem& p, const int8_t* q, const float* sg,
                                                const float* sgc, const int64_t* rows, int64_t i0,
                                                int64_t i1, int64_t off, int64_t c, int64_t width,
                                                float* acc) {
  __m256 a[RB][NV];
  const float* x[RB];
  for (int r = 0; r < RB; ++r) {
    x[r] = p.x + rows[r] * p.I;
    for (int v = 0; v < NV; ++v) a[r][v] = _mm256_loadu_ps(acc + r * width + off + 8 * v);
  }
  for (int64_t i = i0; i < i1; ++i) {
    const int8_t* qi = q + i * p.O + c;
    if (i + kTileRows < p.I) {
      _mm_prefetch(reinterpret_cast<const char*>(qi + kTileRows * p.O), _MM_HINT_T0);
    }
    __m256 w[NV];
    for (int v = 0; v < NV; ++v) {
      w[v] = kRounded ? Dequant8Rounded(qi + 8 * v, sg + off + 8 * v, sgc + off + 8 * v)
                      : Int8x8(qi + 8 * v);
    }
    for (int r = 0; r < RB; ++r) {
      const __m256 xi = _mm256_set1_ps(x[r][i]);
      for (int v = 0; v < NV; ++v) a[r][v] = _mm256_fmadd_ps(xi, w[v], a[r][v]);
    }
  }
  for (int r = 0; r < RB; ++r) {
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(acc + r * width + off + 8 * v, a[r][v]);
  }
}

// Columns [c0, c1) of RB rows over matrix rows [i0, i1): register blocks of NV vectors, as wide
// as the RB x NV accumulators, NV weights and the dequantisation's temporaries allow in sixteen
// registers, then single vectors.
template <int RB, bool kRounded>
inline void RowGroup(const Problem& p, const int8_t* q, const float* sg, const float* sgc,
                     const int64_t* rows, int64_t i0, int64_t i1, int64_t c0, int64_t c1,
                     float* acc) {
  constexpr int NV = RB <= 2 ? 4 : (RB == 3 ? 3 : 2);
  const int64_t width = c1 - c0;
  int64_t c = c0;
  for (; c + 8 * NV <= c1; c += 8 * NV) {
    Tile<NV, RB, kRounded>(p, q, sg, sgc, rows, i0, i1, c - c0, c, width, acc);
  }
  for (; c < c1; c += 8) Tile<1, RB, kRounded>(p, q, sg, sgc, rows, i0, i1, c - c0, c, width, acc);
}

// Columns [c0, c1) (a multiple of 8 wide) of `n_rows` rows that share one matrix. The matrix is
// walked in tiles of kTileRows rows: within a tile, each group of up to four rows accumulates
// register blocks of columns (RowGroup), so the tile's few pages and lines are reused across
// blocks and row groups while the next tile's lines are prefetched. `sf`: this range's scales
// in float32, [G][c1 - c0]; `sfc`: the same times 2^16 + 1 (rounded only). `acc`, `part`:
// float32 scratch, [n_rows][c1 - c0] each.
//
// Unrounded weights q * s need no conversion of their own: within a scale group the sum
// x . (q * s) is accumulated as (x . q) * s, one multiply per group and column instead of one
// per weight (the same products, rounded in a different order).
template <bool kRounded>
void Columns(const Problem& p, const int8_t* q, const float* sf, const float* sfc,
             const int64_t* rows, int64_t n_rows, int64_t c0, int64_t c1, float* acc,
             float* part) {
  const int64_t per_group = p.I / p.G;
  const int64_t width = c1 - c0;
  const int64_t n = n_rows * width;
  std::fill(acc, acc + n, 0.0f);
  for (int64_t g = 0; g < p.G; ++g) {
    const float* sg = sf + g * width;
    const float* sgc = kRounded ? sfc + g * width : nullptr;
    float* sums = kRounded ? acc : part;
    if (!kRounded) std::fill(part, part + n, 0.0f);
    for (int64_t i0 = g * per_group; i0 < (g + 1) * per_group; i0 += kTileRows) {
      const int64_t i1 = std::min(i0 + kTileRows, (g + 1) * per_group);
      for (int64_t r = 0; r < n_rows; r += 4) {  // rows in groups of up to four
        float* a = sums + r * width;
        switch (std::min<int64_t>(4, n_rows - r)) {
          case 1: RowGroup<1, kRounded>(p, q, sg, sgc, rows + r, i0, i1, c0, c1, a); break;
          case 2: RowGroup<2, kRounded>(p, q, sg, sgc, rows + r, i0, i1, c0, c1, a); break;
          case 3: RowGroup<3, kRounded>(p, q, sg, sgc, rows + r, i0, i1, c0, c1, a); break;
          default: RowGroup<4, kRounded>(p, q, sg, sgc, rows + r, i0, i1, c0, c1, a); break;
        }
      }
    }
    if (!kRounded) {
      for (int64_t r = 0; r < n_rows; ++r) {
        for (int64_t j = 0; j < width; ++j) acc[r * width + j] += part[r * width + j] * sg[j];
      }
    }
  }
  for (int64_t r = 0; r < n_rows; ++r) {
    std::memcpy(p.y + rows[r] * p.O + c0, acc + r * width, width * sizeof(float));
  }
}
#endif  // GROK1_AVX2

void RunTask(const Problem& p, const Task& t, const int64_t* rows) {
  const int8_t* q = p.q + t.matrix * p.I * p.O;
  const uint16_t* s = p.scales + t.matrix * p.G * p.O;
  const int64_t* task_rows = rows + t.row_begin;
  const int64_t n_rows = t.row_end - t.row_begin;
  int64_t c = t.col_begin;
#ifdef GROK1_AVX2
  const int64_t width = (t.col_end - t.col_begin) / 8 * 8;  // vector columns; the rest: scalar
  if (width > 0) {
    // this range's scales in float32 ([G][width]), then (rounded) times 2^16 + 1, and scratch
    std::unique_ptr<float[]> buf(new float[2 * p.G * width + 2 * n_rows * width]);
    float* sf = buf.get();
    float* sfc = sf + p.G * width;
    float* acc = sfc + p.G * width;
    for (int64_t g = 0; g < p.G; ++g) {
      for (int64_t j = 0; j < width; ++j) {
        sf[g * width + j] = Bf16ToF32(s[g * p.O + c + j]);
        if (p.rounded) sfc[g * width + j] = sf[g * width + j] * 65537.0f;  // exact: 8 + 16 bits
      }
    }
    if (p.rounded) {
      Columns<true>(p, q, sf, sfc, task_rows, n_rows, c, c + width, acc, acc + n_rows * width);
    } else {
      Columns<false>(p, q, sf, sfc, task_rows, n_rows, c, c + width, acc, acc + n_rows * width);
    }
    c += width;
  }
#endif
  if (c < t.col_end) ScalarColumns(p, q, s, task_rows, n_rows, c, t.col_end);
}

ffi::Error Q8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                        ffi::AnyBuffer scales, ffi::Buffer<ffi::S32> sel,
                        ffi::ResultBuffer<ffi::F32> y, bool rounded) {
  auto xd = x.dimensions();
  auto qd = q.dimensions();
  auto sd = scales.dimensions();
  auto seld = sel.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || qd.size() != 3 || sd.size() != 2 || seld.size() != 1 || yd.size() != 2) {
    return ffi::Error::InvalidArgument("grok1_q8_matmul: expected x [R,I], q [M,I,O], "
                                       "scales [M*G,O], sel [R], y [R,O]");
  }
  if (scales.element_type() != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument("grok1_q8_matmul: scales must be bfloat16");
  }
  const int64_t R = xd[0], I = xd[1], M = qd[0], O = qd[2];
  const int64_t G = M > 0 ? sd[0] / M : 0;
  if (qd[1] != I || sd[0] != M * G || sd[1] != O || seld[0] != R || yd[0] != R || yd[1] != O ||
      G <= 0 || I % G != 0) {
    return ffi::Error::InvalidArgument("grok1_q8_matmul: inconsistent shapes");
  }
  const Problem problem{x.typed_data(), q.typed_data(),
                        static_cast<const uint16_t*>(scales.untyped_data()), y->typed_data(),
                        I, O, G, rounded};
  const int32_t* selected = sel.typed_data();
  std::vector<int64_t> rows;  // row ids sorted by selected matrix
  for (int64_t r = 0; r < R; ++r) {
    if (selected[r] >= M) {
      return ffi::Error::InvalidArgument("grok1_q8_matmul: sel[" + std::to_string(r) + "] = " +
                                         std::to_string(selected[r]) + " is not below " +
                                         std::to_string(M));
    }
    if (selected[r] < 0) {  // no matrix: a zero row
      std::fill(problem.y + r * O, problem.y + (r + 1) * O, 0.0f);
      continue;
    }
    rows.push_back(r);
  }
  const int64_t kept = static_cast<int64_t>(rows.size());
  std::stable_sort(rows.begin(), rows.end(),
                   [&](int64_t a, int64_t b) { return selected[a] < selected[b]; });
  std::vector<int64_t> group_begin;  // runs of rows that select the same matrix
  for (int64_t r = 0; r < kept; ++r) {
    if (r == 0 || selected[rows[r]] != selected[rows[r - 1]]) group_begin.push_back(r);
  }
  group_begin.push_back(kept);
  const int64_t groups = static_cast<int64_t>(group_begin.size()) - 1;
  // Wide column ranges stream best; split the columns into more ranges until every thread has
  // two tasks to take, in equal widths (multiples of 8) so that no thread is left with a long
  // last task.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t ranges = (O + kMaxTaskCols - 1) / kMaxTaskCols;
  while (groups * ranges < 2 * threads && O / (2 * ranges) >= 64) ranges *= 2;
  const int64_t task_cols = ((O + ranges - 1) / ranges + 7) / 8 * 8;
  std::vector<Task> tasks;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t begin = group_begin[g], end = group_begin[g + 1];
    for (int64_t c = 0; c < O; c += task_cols) {
      tasks.push_back(Task{selected[rows[begin]], begin, end, c, std::min(O, c + task_cols)});
    }
  }
  grok1::ParallelFor(pool, static_cast<int64_t>(tasks.size()), threads,
                     [&](int64_t t) { RunTask(problem, tasks[t], rows.data()); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Grok1Q8Matmul, Q8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("rounded"));
