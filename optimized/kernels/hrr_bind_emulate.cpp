// hrr_bind.cu's kernel compiled for the CPU, for tests on machines without a GPU (as Triton's interpreter runs the
// Triton kernels in CI): every CUDA thread of a block is a std::thread, __syncthreads a std::barrier over them,
// shared memory a per-block buffer. The kernel's source is included unchanged; only the CUDA names it uses are
// defined here. hrr_bind.py builds it with the C++ compiler (`emulated_bind`). Slow (threads per block), exact in
// indexing and synchronisation, not in timing or in FMA contraction.

#include <barrier>
#include <thread>
#include <vector>

struct float2 {
  float x, y;
};

namespace {
struct Index {
  unsigned x = 0;
};
thread_local Index threadIdx, blockIdx;
thread_local std::barrier<>* hrr_emulated_barrier = nullptr;
thread_local float2* hrr_emulated_shared = nullptr;
}  // namespace

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define HRR_EMULATE 1

inline float2 make_float2(float x, float y) { return {x, y}; }
template <class T>
inline T __ldg(const T* p) { return *p; }
inline void __syncthreads() { hrr_emulated_barrier->arrive_and_wait(); }

#include "hrr_bind.cu"

namespace {
template <int D, bool CONJ>
void emulate(const float* a, const float* b, float* c, long long rows, const float2* tw) {
  constexpr int threads = D / values_for<D>;
  std::vector<float2> shared(shared_floats<D> / 2);
  for (long long block = 0; block < (rows + 1) / 2; ++block) {
    std::barrier<> barrier(threads);
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        threadIdx.x = static_cast<unsigned>(t);
        blockIdx.x = static_cast<unsigned>(block);
        hrr_emulated_barrier = &barrier;
        hrr_emulated_shared = shared.data();
        hrr_bind_pair_kernel<D, CONJ>(a, b, c, tw, rows, 0);
      });
    }
    for (auto& thread : pool) thread.join();
  }
}

template <int D>
void emulate(const float* a, const float* b, float* c, long long rows, const float2* tw, int conj_a) {
  if (conj_a) {
    emulate<D, true>(a, b, c, rows, tw);
  } else {
    emulate<D, false>(a, b, c, rows, tw);
  }
}
}  // namespace

// memarch_hrr_bind's contract on host pointers (twiddles included); returns 0, or -1 for an unsupported D
extern "C" int memarch_hrr_bind_emulated(const float* a, const float* b, float* c, long long rows, int D,
                                         int conj_a, const void* tw) {
  const auto* w = static_cast<const float2*>(tw);
  switch (D) {
    case 512: emulate<512>(a, b, c, rows, w, conj_a); return 0;
    case 1024: emulate<1024>(a, b, c, rows, w, conj_a); return 0;
    case 2048: emulate<2048>(a, b, c, rows, w, conj_a); return 0;
    case 4096: emulate<4096>(a, b, c, rows, w, conj_a); return 0;
    case 8192: emulate<8192>(a, b, c, rows, w, conj_a); return 0;
    default: return -1;
  }
}
