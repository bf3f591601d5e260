// int8 weight x float32 activation matrix products for XLA:CPU, as an XLA FFI custom call.
//
//   y[r, :] = x[r, :] @ W[sel[r]],   W[m] = bf16(q[m] * scales[m][group])   (or unrounded)
//
// x: [R, I] f32; q: [M, I, O] int8; scales: [M, G, O] bf16 with G dividing I (row i uses group
// i / (I / G)); sel: [R] int32 in [0, M); y: [R, O] f32. Attribute `rounded`: round each
// dequantised weight to bfloat16 (round to nearest even), as the release does (SPEC.md §4).
//
// XLA:CPU does not fuse the int8 -> float conversion into its dot kernels, so without this kernel
// every selected matrix is first written out in float32 and read back (several bytes moved per
// one-byte weight). Here each weight is loaded once as int8, dequantised and rounded in registers
// and multiplied into float32 accumulators. Rows that select the same matrix share one pass over
// it. Products of bf16-exact values are exact in float32, so only the summation order differs
// from a float32 dot. Work is split into (matrix, column block) tasks run on XLA's intra-op
// thread pool; the calling thread takes tasks too, so it never waits for a task nobody runs.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GROK1_AVX2 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

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

inline float Bf16ToF32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

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

// Eight int8 weights times their scales, rounded to bfloat16 (kept in float32) if `rounded`.
// The rounding is Veltkamp's split: c = w * (2^16 + 1), hi = c - (c - w) is w rounded to
// 24 - 16 = 8 significant bits, to nearest. An int8 times a bf16 scale is exact in float32 with
// at most 16 significant bits, and over every int8 value and every bf16 significand the split
// equals round-to-nearest-even (tests/test_kernels.py checks all of them); three float ops
// instead of five integer ones on the bits. Built with -ffp-contract=off: a compiler that
// fused c - w into an FMA would skip the rounding of c and return w unrounded.
inline __m256 Dequant8(const int8_t* q, __m256 scale, bool rounded) {
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q));
  __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), scale);
  if (!rounded) return w;
  const __m256 c = _mm256_mul_ps(w, _mm256_set1_ps(65537.0f));
  return _mm256_sub_ps(c, _mm256_sub_ps(c, w));
}

// Rows [i0, i1) of the matrix times columns [c, c + 8 * NV), for RB rows of x (`rows`), into
// their accumulators (`acc` + r * width). Each weight is dequantised once per call and the
// RB x NV accumulators stay in registers.
template <int NV, int RB>
inline void Tile(const Problem& p, const int8_t* q, const float* sg, const int64_t* rows,
                 int64_t i0, int64_t i1, int64_t c0, int64_t c, int64_t width, float* acc) {
  __m256 scale[NV], a[RB][NV];
  const float* x[RB];
  for (int v = 0; v < NV; ++v) scale[v] = _mm256_loadu_ps(sg + (c - c0) + 8 * v);
  for (int r = 0; r < RB; ++r) {
    x[r] = p.x + rows[r] * p.I;
    for (int v = 0; v < NV; ++v) a[r][v] = _mm256_loadu_ps(acc + r * width + (c - c0) + 8 * v);
  }
  for (int64_t i = i0; i < i1; ++i) {
    const int8_t* qi = q + i * p.O + c;
    if (i + kTileRows < p.I) {
      _mm_prefetch(reinterpret_cast<const char*>(qi + kTileRows * p.O), _MM_HINT_T0);
    }
    __m256 w[NV];
    for (int v = 0; v < NV; ++v) w[v] = Dequant8(qi + 8 * v, scale[v], p.rounded);
    for (int r = 0; r < RB; ++r) {
      const __m256 xi = _mm256_set1_ps(x[r][i]);
      for (int v = 0; v < NV; ++v) a[r][v] = _mm256_fmadd_ps(xi, w[v], a[r][v]);
    }
  }
  for (int r = 0; r < RB; ++r) {
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(acc + r * width + (c - c0) + 8 * v, a[r][v]);
  }
}

// Tile over any number of rows: one row with 64-column register blocks, several in groups of
// up to four rows with 16-column blocks (so that accumulators still fit in registers).
template <int NV1, int NV4>
inline void Tiles(const Problem& p, const int8_t* q, const float* sg, const int64_t* rows,
                  int64_t n_rows, int64_t i0, int64_t i1, int64_t c0, int64_t c, int64_t width,
                  float* acc) {
  if (n_rows == 1) {
    Tile<NV1, 1>(p, q, sg, rows, i0, i1, c0, c, width, acc);
    return;
  }
  for (int64_t cc = c; cc < c + 8 * NV1; cc += 8 * NV4) {
    int64_t r = 0;
    for (; r + 4 <= n_rows; r += 4) {
      Tile<NV4, 4>(p, q, sg, rows + r, i0, i1, c0, cc, width, acc + r * width);
    }
    float* rest = acc + r * width;
    switch (n_rows - r) {
      case 3: Tile<NV4, 3>(p, q, sg, rows + r, i0, i1, c0, cc, width, rest); break;
      case 2: Tile<NV4, 2>(p, q, sg, rows + r, i0, i1, c0, cc, width, rest); break;
      case 1: Tile<NV4, 1>(p, q, sg, rows + r, i0, i1, c0, cc, width, rest); break;
      default: break;
    }
  }
}

// Columns [c0, c1) (a multiple of 8 wide) of `n_rows` rows that share one matrix. The matrix is
// walked in tiles of kTileRows rows: within a tile, 64-column blocks are accumulated in
// registers, so the tile's few pages and lines are reused across blocks while the next tile's
// lines are prefetched. `sf`: this range's scales in float32, [G][c1 - c0]. `acc`: float32
// accumulators, [n_rows][c1 - c0].
void Columns(const Problem& p, const int8_t* q, const float* sf, const int64_t* rows,
             int64_t n_rows, int64_t c0, int64_t c1, float* acc) {
  const int64_t per_group = p.I / p.G;
  const int64_t width = c1 - c0;
  std::fill(acc, acc + n_rows * width, 0.0f);
  for (int64_t g = 0; g < p.G; ++g) {
    const float* sg = sf + g * width;
    for (int64_t i0 = g * per_group; i0 < (g + 1) * per_group; i0 += kTileRows) {
      const int64_t i1 = std::min(i0 + kTileRows, (g + 1) * per_group);
      int64_t c = c0;
      for (; c + 64 <= c1; c += 64) Tiles<8, 2>(p, q, sg, rows, n_rows, i0, i1, c0, c, width, acc);
      for (; c < c1; c += 8) Tiles<1, 1>(p, q, sg, rows, n_rows, i0, i1, c0, c, width, acc);
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
    std::unique_ptr<float[]> sf(new float[p.G * width]);  // their scales in float32, [G][width]
    for (int64_t g = 0; g < p.G; ++g) {
      for (int64_t j = 0; j < width; ++j) sf[g * width + j] = Bf16ToF32(s[g * p.O + c + j]);
    }
    std::unique_ptr<float[]> acc(new float[n_rows * width]);
    Columns(p, q, sf.get(), task_rows, n_rows, c, c + width, acc.get());
    c += width;
  }
#endif
  if (c < t.col_end) ScalarColumns(p, q, s, task_rows, n_rows, c, t.col_end);
}

struct Job {
  Problem problem;
  std::vector<int64_t> rows;  // row ids sorted by selected matrix
  std::vector<Task> tasks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Work() {
    const int64_t n = static_cast<int64_t>(tasks.size());
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      RunTask(problem, tasks[t], rows.data());
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error Q8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                        ffi::AnyBuffer scales, ffi::Buffer<ffi::S32> sel,
                        ffi::ResultBuffer<ffi::F32> y, bool rounded) {
  auto xd = x.dimensions();
  auto qd = q.dimensions();
  auto sd = scales.dimensions();
  auto seld = sel.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || qd.size() != 3 || sd.size() != 3 || seld.size() != 1 || yd.size() != 2) {
    return ffi::Error::InvalidArgument("grok1_q8_matmul: expected x [R,I], q [M,I,O], "
                                       "scales [M,G,O], sel [R], y [R,O]");
  }
  if (scales.element_type() != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument("grok1_q8_matmul: scales must be bfloat16");
  }
  const int64_t R = xd[0], I = xd[1], M = qd[0], O = qd[2], G = sd[1];
  if (qd[1] != I || sd[0] != M || sd[2] != O || seld[0] != R || yd[0] != R || yd[1] != O ||
      G <= 0 || I % G != 0) {
    return ffi::Error::InvalidArgument("grok1_q8_matmul: inconsistent shapes");
  }
  auto job = std::make_shared<Job>();
  job->problem = Problem{x.typed_data(), q.typed_data(),
                         static_cast<const uint16_t*>(scales.untyped_data()), y->typed_data(),
                         I, O, G, rounded};
  const int32_t* selected = sel.typed_data();
  for (int64_t r = 0; r < R; ++r) {
    if (selected[r] < 0 || selected[r] >= M) {
      return ffi::Error::InvalidArgument("grok1_q8_matmul: sel[" + std::to_string(r) + "] = " +
                                         std::to_string(selected[r]) + " is outside [0, " +
                                         std::to_string(M) + ")");
    }
    job->rows.push_back(r);
  }
  std::stable_sort(job->rows.begin(), job->rows.end(),
                   [&](int64_t a, int64_t b) { return selected[a] < selected[b]; });
  std::vector<int64_t> group_begin;  // runs of rows that select the same matrix
  for (int64_t r = 0; r < R; ++r) {
    if (r == 0 || selected[job->rows[r]] != selected[job->rows[r - 1]]) group_begin.push_back(r);
  }
  group_begin.push_back(R);
  const int64_t groups = static_cast<int64_t>(group_begin.size()) - 1;
  // Wide column ranges stream best; narrow them until every thread has two tasks to take.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t task_cols = kMaxTaskCols;
  while (task_cols > 64 && groups * ((O + task_cols - 1) / task_cols) < 2 * threads) {
    task_cols /= 2;
  }
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t begin = group_begin[g], end = group_begin[g + 1];
    for (int64_t c = 0; c < O; c += task_cols) {
      job->tasks.push_back(
          Task{selected[job->rows[begin]], begin, end, c, std::min(O, c + task_cols)});
    }
  }
  const int64_t n_tasks = static_cast<int64_t>(job->tasks.size());
  const int64_t helpers = std::min<int64_t>(threads, n_tasks) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([job] { job->Work(); });
  job->Work();
  while (job->done.load(std::memory_order_acquire) < n_tasks) std::this_thread::yield();
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
