// Work sharing on XLA:CPU's intra-op thread pool, for the custom calls in this directory.
#ifndef GROK1_KERNELS_PARALLEL_H_
#define GROK1_KERNELS_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace grok1 {

// Runs fn(t) for every t in [0, n) on up to `threads` threads: the pool's and the calling one,
// which takes tasks too (so it never waits for a task that nobody runs) and returns when all
// have run. A pool thread that starts late finds no task left and touches only the shared
// counters, never `fn` or what it refers to.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, int64_t threads,
                        std::function<void(int64_t)> fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t n = 0;
    std::function<void(int64_t)> fn;
    void Work() {
      for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
        fn(t);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>();
  state->n = n;
  state->fn = std::move(fn);
  const int64_t helpers = std::min<int64_t>(std::min<int64_t>(threads, pool.num_threads()), n) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([state] { state->Work(); });
  state->Work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace grok1

#endif  // GROK1_KERNELS_PARALLEL_H_
