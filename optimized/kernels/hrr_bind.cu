// Fused HRR binding on CUDA: c = irfft(op(rfft(a)) · rfft(b)) per row of D float32 values, op = identity
// (circular convolution, `bind`) or complex conjugation (circular correlation, `unbind`), in one kernel that reads
// a and b once and writes c once. specs/vsa.md ("The fused CUDA kernel") states the algorithm; hrr_bind.py
// builds this file with nvcc and calls `memarch_hrr_bind` through ctypes.
//
// One thread block per two rows, D/V threads (V values per thread: `values_for`). A row's two real operands travel
// as one complex sequence z = a + i·b: one complex FFT of length D gives both spectra (A_k = (Z_k + conj Z_{D-k})/2,
// B_k = (Z_k - conj Z_{D-k})/2i). Their product C_k is Hermitian, so the two rows' products are packed as
// W = C0 + i·C1, whose one inverse FFT is c0 + i·c1: three FFTs per two rows, in one shared FFT workspace plus half
// of row 0's product. Each FFT is a Stockham autosort FFT (Govindaraju et al., SC 2008): radix-V stages (then one
// smaller radix for the rest of D), each thread holding V values in registers per stage and doing its small DFTs
// there (radix-2 decimation in frequency), shared memory between stages (complex values as float2, one pad slot
// per V). The forward FFTs' first stage reads a and b straight from global memory, the inverse's last stage
// writes c straight to it, both coalesced. Twiddles W_D^m: per item and stage, log2(radix) of them from a table
// the caller computes in float64 and rounds to float32, the rest their products in registers (a load per twiddle
// made the L1 the bottleneck).

#ifdef HRR_EMULATE
// compiled for the CPU by hrr_bind_emulate.cpp (tests): it defines the CUDA names used below
#define HRR_SHARED(name) float2* name = hrr_emulated_shared
#else
#include <cuda_runtime.h>
#define HRR_SHARED(name) extern __shared__ float2 name[]
#endif

namespace {

// Values each thread holds per stage (the largest radix), per D: 16, and 32 at D = 8192 (the fastest on an H200,
// `scripts/bench.py --op bind_sweep`). Fewer values, fewer registers and more threads per row, but more stages
// through shared memory. HRR_VALUES (4, 8, 16 or 32) builds every D with that many, for the sweep.
#ifdef HRR_VALUES
template <int D>
constexpr int values_for = HRR_VALUES;
#else
template <int D>
constexpr int values_for = D >= 8192 ? 32 : 16;
#endif

// W_32^q = exp(-2 pi i q / 32) = cos(2 pi q / 32) - i sin(2 pi q / 32), q < 16 (the small DFTs need no more)
__host__ __device__ constexpr float w32_re(int q) {
  switch (q) {
    case 0: return 1.0f;
    case 1: return 0.98078528040323043f;
    case 2: return 0.92387953251128674f;
    case 3: return 0.83146961230254524f;
    case 4: return 0.70710678118654752f;
    case 5: return 0.55557023301960218f;
    case 6: return 0.38268343236508977f;
    case 7: return 0.19509032201612826f;
    case 8: return 0.0f;
    case 9: return -0.19509032201612826f;
    case 10: return -0.38268343236508977f;
    case 11: return -0.55557023301960218f;
    case 12: return -0.70710678118654752f;
    case 13: return -0.83146961230254524f;
    case 14: return -0.92387953251128674f;
    default: return -0.98078528040323043f;
  }
}

__host__ __device__ constexpr float w32_im(int q) {  // the imaginary part of W_32^q (forward sign): -sin
  return q <= 8 ? -w32_re(8 - q) : -w32_re(q - 8);
}

// Closed forms (no loops, no recursion) so that nvcc folds them once the loops around them are unrolled: a loop
// or a recursive call here stays in the machine code, executed per store (seen: a third of the instructions).
__host__ __device__ constexpr int log2i(int n) {  // floor(log2 n), 1 <= n < 64
  return n >= 32 ? 5 : n >= 16 ? 4 : n >= 8 ? 3 : n >= 4 ? 2 : n >= 2 ? 1 : 0;
}

__host__ __device__ constexpr int high_bit(int n) { return 1 << log2i(n); }  // the largest 2^e <= n, n < 64

__host__ __device__ constexpr int bit_reverse(int i, int bits) {  // i < 2^bits <= 32
  return (((i & 1) << 4) | ((i & 2) << 2) | (i & 4) | ((i & 8) >> 2) | ((i & 16) >> 4)) >> (5 - bits);
}

// Shared-memory slot of complex element i: one pad slot per P, P = V (16 for the 4- and 8-value builds, and where
// D/V is not a multiple of V). A warp's 8-byte accesses go in two halves of 16 threads; the first stage's stores
// at stride R = V elements then fall into 16 different bank pairs (with P = 16 at R = 32: two-way conflicts).
// Where x % P == 0, pad(x + y) = pad(x) + pad(y): a thread's slots are a base plus compile-time offsets.
template <int D, int V>
constexpr int pad_period = V >= 16 && (D / V) % V == 0 ? V : 16;

template <int P>
__host__ __device__ constexpr int pad(int i) { return i + (i >> log2i(P)); }

// floats of dynamic shared memory for one block: an FFT workspace (D float2, padded) and half a spectrum
// (D/2 + 1 float2; hrr_bind_pair_kernel)
template <int D>
constexpr int shared_floats = 2 * (pad<pad_period<D, values_for<D>>>(D) + D / 2 + 1);

__device__ __forceinline__ float2 cmul(float2 p, float2 q) {
  return make_float2(p.x * q.x - p.y * q.y, p.x * q.y + p.y * q.x);
}

// In-register DFT of length R (2 … 32) of v[OFF .. OFF + R), radix-2 decimation in frequency (Gentleman-Sande),
// INV: exp(+...), one butterfly level of span M per call. The result is left in bit-reversed order
// (X[bit_reverse(i)] in slot OFF + i): the stores undo that in their addresses. M is a template constant so that
// nvcc unrolls the loops fully and every register index is a compile-time constant (no local memory).
template <int V, int R, bool INV, int OFF, int M>
__device__ __forceinline__ void dif_level(float (&re)[V], float (&im)[V]) {
  if constexpr (M >= 2) {
#pragma unroll
    for (int k = 0; k < R; k += M) {
#pragma unroll
      for (int j = 0; j < M / 2; ++j) {
        const int q = j * (32 / M);  // W_M^j = W_32^q
        const int lo = OFF + k + j, hi = OFF + k + j + M / 2;
        const float ur = re[lo], ui = im[lo], xr = re[hi], xi = im[hi];
        re[lo] = ur + xr;
        im[lo] = ui + xi;
        const float dr = ur - xr, di = ui - xi;
        if (q == 0) {
          re[hi] = dr;
          im[hi] = di;
        } else if (q == 8) {  // W = -i forward, +i inverse
          re[hi] = INV ? -di : di;
          im[hi] = INV ? dr : -dr;
        } else {
          const float wr = w32_re(q), wi = INV ? -w32_im(q) : w32_im(q);
          re[hi] = dr * wr - di * wi;
          im[hi] = dr * wi + di * wr;
        }
      }
    }
    dif_level<V, R, INV, OFF, M / 2>(re, im);
  }
}

template <int V, int R, bool INV, int IT>
__device__ __forceinline__ void small_dfts(float (&re)[V], float (&im)[V]) {
  if constexpr (IT < V / R) {
    dif_level<V, R, INV, IT * R, R>(re, im);
    small_dfts<V, R, INV, IT + 1>(re, im);
  }
}

// Each item's inputs x[IT R + r] *= w^r (r = 1 … R-1) for w = W_D^m, m = (item mod NS)·D/(NS R). The powers of
// two w^(2^e) come from the table (log2 R loads), the rest as products of those (w^r = w^h · w^(r-h), h the
// highest power of two <= r): every twiddle is a product of at most log2 R correctly rounded table values, so
// the error stays that of a table lookup (powers of w alone grew it r-fold: 5e-6 at D = 8192), at a fraction of
// the loads (one per twiddle made the L1 the bottleneck).
template <int D, int V, int NS, int R, bool INV, int IT>
__device__ __forceinline__ void twiddles(float (&re)[V], float (&im)[V], const float2* __restrict__ tw, int tid) {
  if constexpr (IT < V / R) {
    const int m = ((tid + IT * (D / V)) & (NS - 1)) * (D / (NS * R));
    float2 w[R];
#pragma unroll
    for (int e = 0; e < log2i(R); ++e) {  // m 2^e < NS (D / (NS R)) R = D
      w[1 << e] = __ldg(tw + (m << e));
      if (INV) w[1 << e].y = -w[1 << e].y;
    }
#pragma unroll
    for (int r = 1; r < R; ++r) {  // each w^r applied at once; those above R/2 are needed by no later one
      if (high_bit(r) != r) w[r] = cmul(w[high_bit(r)], w[r - high_bit(r)]);
      const float2 wr = w[r];
      const float2 x = cmul(make_float2(re[IT * R + r], im[IT * R + r]), wr);
      re[IT * R + r] = x.x;
      im[IT * R + r] = x.y;
    }
    twiddles<D, V, NS, R, INV, IT + 1>(re, im, tw, tid);
  }
}

// One Stockham stage of the length-D FFT: NS = the product of the earlier stages' radices, R this stage's radix.
// Thread `tid` owns V/R items j = tid + it·D/V; item j's inputs x[j + r D/R] (r < R) sit in re/im[it R + r].
// SRC_GLOBAL: the inputs come from a (real part) and b (imaginary part), else from shared memory s; DST_GLOBAL:
// the outputs' real parts go to c (and their imaginary parts to c1 unless it is null), else to s. SYNC: a
// barrier after the global loads, before the first store to s (whose last contents others still read).
template <int D, int V, int NS, int R, bool INV, bool DST_GLOBAL, bool BARRIER>
__device__ __forceinline__ void stage_body(float (&re)[V], float (&im)[V], float2* s, float* __restrict__ c,
                                           float* __restrict__ c1, const float2* __restrict__ tw, int tid);

template <int D, int V, int NS, int R, bool INV, bool SRC_GLOBAL, bool DST_GLOBAL, bool SYNC>
__device__ __forceinline__ void stage(float2* s, const float* __restrict__ a, const float* __restrict__ b,
                                      float* __restrict__ c, float* __restrict__ c1, const float2* __restrict__ tw,
                                      int tid) {
  constexpr int T = D / V;
  constexpr int ITEMS = V / R;
  constexpr int P = pad_period<D, V>;
  static_assert(T % P == 0, "the padded offsets below need D/V to be a multiple of P");
  float re[V], im[V];
  const float2* src = s + pad<P>(tid);
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int off = it * T + r * (D / R);  // a multiple of P
      if constexpr (SRC_GLOBAL) {
        re[it * R + r] = __ldg(a + tid + off);
        im[it * R + r] = __ldg(b + tid + off);
      } else {
        const float2 x = src[pad<P>(off)];
        re[it * R + r] = x.x;
        im[it * R + r] = x.y;
      }
    }
  }
  stage_body<D, V, NS, R, INV, DST_GLOBAL, !SRC_GLOBAL || SYNC>(re, im, s, c, c1, tw, tid);
}

// `stage` from its inputs in registers on: BARRIER first (every read of s before any write), then twiddles, the
// small DFTs and the stores
template <int D, int V, int NS, int R, bool INV, bool DST_GLOBAL, bool BARRIER>
__device__ __forceinline__ void stage_body(float (&re)[V], float (&im)[V], float2* s, float* __restrict__ c,
                                           float* __restrict__ c1, const float2* __restrict__ tw, int tid) {
  constexpr int T = D / V;
  constexpr int ITEMS = V / R;
  constexpr int P = pad_period<D, V>;
  if constexpr (BARRIER) __syncthreads();
  if constexpr (NS > 1) twiddles<D, V, NS, R, INV, 0>(re, im, tw, tid);
  small_dfts<V, R, INV, 0>(re, im);
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int j = tid + it * T;
    // in the last stage (the only one with several items: its radix is the remainder) j < D/R = NS
    const int base = NS * R == D ? j : (j / NS) * NS * R + (j & (NS - 1));
#pragma unroll
    for (int i = 0; i < R; ++i) {  // slot i holds the DFT's output bit_reverse(i)
      const int off = bit_reverse(i, log2i(R)) * NS;
      if constexpr (DST_GLOBAL) {  // the last stage: base = j, so these stores are coalesced
        c[base + off] = re[it * R + i];
        if (c1 != nullptr) c1[base + off] = im[it * R + i];
      } else if constexpr (NS == 1 || NS % P == 0) {  // base % P == 0 or off % P == 0, or no P crossed
        s[pad<P>(base) + pad<P>(off)] = make_float2(re[it * R + i], im[it * R + i]);
      } else {
        s[pad<P>(base + off)] = make_float2(re[it * R + i], im[it * R + i]);
      }
    }
  }
  if constexpr (!DST_GLOBAL) __syncthreads();
}

// The stages from NS on (radix V while V divides what is left, then the remainder); SYNC as `stage`'s, for the first
template <int D, int V, int NS, bool INV, bool SYNC>
__device__ __forceinline__ void stages(float2* s, const float* a, const float* b, float* c, float* c1,
                                       const float2* tw, int tid) {
  if constexpr (NS < D) {
    constexpr int R = (D / NS) >= V ? V : D / NS;
    constexpr bool first = !INV && NS == 1;
    constexpr bool last = INV && NS * R == D;
    stage<D, V, NS, R, INV, first, last, SYNC && first>(s, a, b, c, c1, tw, tid);
    stages<D, V, NS * R, INV, false>(s, a, b, c, c1, tw, tid);
  }
}

// 4 C_k = 4 op(A_k) B_k from z = Z_k and zm = Z_{D-k} (2 A_k = Z_k + conj Z_m, 2 B_k = (Z_k - conj Z_m)/i)
template <bool CONJ>
__device__ __forceinline__ float2 spectra_product(float2 z, float2 zm) {
  const float ar = z.x + zm.x, ai = CONJ ? zm.y - z.y : z.y - zm.y;
  const float br = z.y + zm.y, bi = zm.x - z.x;
  return make_float2(ar * br - ai * bi, ar * bi + ai * br);
}

// fn(k, pad(k), pad(D - k mod D)) for this thread's k <= D/2: k = tid + i D/V (i < V/2), and D/2 on thread 0, so
// that each pair (k, D - k) belongs to one thread
template <int D, int V, class Fn>
__device__ __forceinline__ void for_each_pair(int tid, Fn fn) {
  constexpr int T = D / V;
  constexpr int P = pad_period<D, V>;
  fn(tid, pad<P>(tid), pad<P>((D - tid) & (D - 1)));
  const int pm = pad<P>(D - tid);  // pad(D - tid - i T) = pm - pad(i T), T a multiple of P
#pragma unroll
  for (int i = 1; i < V / 2; ++i) fn(tid + i * T, pad<P>(tid) + pad<P>(i * T), pm - pad<P>(i * T));
  if (tid == 0) fn(D / 2, pad<P>(D / 2), pad<P>(D / 2));
}

// Whether a block prefetches, into L2, the two rows of the block `ahead` places after it (hrr_bind_pair_kernel):
// at D = 8192, where a block's loads of a and b otherwise wait on DRAM with only two blocks on an SM to hide it
// (0.387 against 0.403 ms on an H200; slower at 1024, no gain at 4096: specs/vsa.md). HRR_PREFETCH (0 or 1) sets
// it for every D.
#ifndef HRR_PREFETCH
#define HRR_PREFETCH -1  // -1: per D, as below
#endif
template <int D>
constexpr bool prefetches = HRR_PREFETCH < 0 ? D >= 8192 : HRR_PREFETCH != 0;

// rows [row, row + n) of a and b, clipped to `rows`, into L2 by one bulk prefetch each (sm_90's TMA unit; a no-op
// before sm_90 and in the emulator); called by one thread
template <int D>
__device__ __forceinline__ void prefetch_rows(const float* a, const float* b, long long row, long long n,
                                              long long rows) {
#if !defined(HRR_EMULATE) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (row < rows) {
    const unsigned bytes = static_cast<unsigned>((row + n <= rows ? n : rows - row) * D * sizeof(float));
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(a + row * D), "r"(bytes) : "memory");
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(b + row * D), "r"(bytes) : "memory");
  }
#else
  (void)a, (void)b, (void)row, (void)n, (void)rows;
#endif
}

// Two rows per block: their spectra products C0, C1 (each Hermitian) are packed as W = C0 + i C1, whose inverse
// FFT is c0 + i c1 — three FFTs per two rows instead of four. Shared memory: one FFT workspace f (D values) and
// row 0's 4 C0_k for k <= D/2 in h (D/2 + 1 values; the rest is conj C0_{D-k}), 1.5 D values in all, not 2 D:
// at D = 8192 two blocks fit an SM. An odd last row goes alone (C1 = 0, no second store). `ahead`: the blocks
// that fit the device at once; where `prefetches`, the block that will follow this one on its SM is about `ahead`
// blocks on, and its rows go to L2 while this block's inverse FFT runs.
template <int D, bool CONJ>
__global__ void __launch_bounds__(D / values_for<D>) hrr_bind_pair_kernel(const float* __restrict__ a,
                                                                          const float* __restrict__ b,
                                                                          float* __restrict__ c,
                                                                          const float2* __restrict__ tw,
                                                                          long long rows, long long ahead) {
  constexpr int V = values_for<D>;
  constexpr float scale = 0.25f / D;  // the products' factor 4 and the inverse FFT's 1/D
  HRR_SHARED(smem);
  float2* f = smem;
  float2* h = smem + pad<pad_period<D, V>>(D);
  const long long row0 = 2LL * blockIdx.x;
  const bool two = row0 + 1 < rows;  // uniform over the block, so the barriers inside the branches are safe
  const int tid = threadIdx.x;
  stages<D, V, 1, false, false>(f, a + row0 * D, b + row0 * D, nullptr, nullptr, tw, tid);
  const auto product0 = [&](int k, int pk, int pm) { h[k] = spectra_product<CONJ>(f[pk], f[pm]); };
  if (two) {  // row 1's first-stage loads are issued before row 0's product pass, whose work hides their latency
    float re[V], im[V];
    const float* a1 = a + (row0 + 1) * D + tid;
    const float* b1 = b + (row0 + 1) * D + tid;
#pragma unroll
    for (int r = 0; r < V; ++r) {  // the first stage's inputs: radix V (V <= D), one item j = tid
      re[r] = __ldg(a1 + r * (D / V));
      im[r] = __ldg(b1 + r * (D / V));
    }
    for_each_pair<D, V>(tid, product0);
    // a barrier (h written, f read), then row 1's FFT in f
    stage_body<D, V, 1, V, false, false, true>(re, im, f, nullptr, nullptr, tw, tid);
    stages<D, V, V, false, false>(f, nullptr, nullptr, nullptr, nullptr, tw, tid);
  } else {
    for_each_pair<D, V>(tid, product0);
    __syncthreads();
  }
  if (prefetches<D> && ahead > 0 && tid == 0) prefetch_rows<D>(a, b, row0 + 2 * ahead, 2, rows);
  for_each_pair<D, V>(tid, [&](int k, int pk, int pm) {
    const float2 p0 = h[k];  // W_k = C0_k + i C1_k, W_m = conj C0_k + i conj C1_k
    const float2 p1 = two ? spectra_product<CONJ>(f[pk], f[pm]) : make_float2(0.0f, 0.0f);
    f[pk] = make_float2((p0.x - p1.y) * scale, (p0.y + p1.x) * scale);
    f[pm] = make_float2((p0.x + p1.y) * scale, (p1.x - p0.y) * scale);
  });
  __syncthreads();
  stages<D, V, 1, true, false>(f, nullptr, nullptr, c + row0 * D, two ? c + (row0 + 1) * D : nullptr, tw, tid);
}

#ifndef HRR_EMULATE
// The blocks of hrr_bind_pair_kernel<D, CONJ> that fit the current device at once (its SMs times the blocks per
// SM), found once per device; 0 when the query fails (then no block prefetches; the query's error is cleared so
// that the launch reports its own)
template <int D, bool CONJ>
long long resident_blocks(size_t smem) {
  constexpr int max_devices = 64;
  static long long resident[max_devices] = {};  // 0: not yet asked
  int dev = 0, sms = 0, per_sm = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return 0;
  if (dev < max_devices && resident[dev] > 0) return resident[dev];
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, hrr_bind_pair_kernel<D, CONJ>, D / values_for<D>,
                                                    smem) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  const long long blocks = static_cast<long long>(sms) * per_sm;
  if (dev < max_devices) resident[dev] = blocks;
  return blocks;
}

template <int D, bool CONJ>
int launch_one(const float* a, const float* b, float* c, long long rows, const void* tw, void* stream) {
  const size_t smem = shared_floats<D> * sizeof(float);
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(hrr_bind_pair_kernel<D, CONJ>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  const long long ahead = prefetches<D> ? resident_blocks<D, CONJ>(smem) : 0;
  hrr_bind_pair_kernel<D, CONJ><<<static_cast<unsigned>((rows + 1) / 2), D / values_for<D>, smem,
                                  static_cast<cudaStream_t>(stream)>>>(a, b, c, static_cast<const float2*>(tw), rows,
                                                                       ahead);
  return static_cast<int>(cudaGetLastError());
}

template <int D>
int launch(const float* a, const float* b, float* c, long long rows, const void* tw, int conj_a, void* stream) {
  return conj_a ? launch_one<D, true>(a, b, c, rows, tw, stream) : launch_one<D, false>(a, b, c, rows, tw, stream);
}
#endif

}  // namespace

// the values per thread the kernel for D uses (for the benchmark's notes), 0 for an unsupported D
extern "C" int memarch_hrr_values(int D) {
  switch (D) {
    case 512: return values_for<512>;
    case 1024: return values_for<1024>;
    case 2048: return values_for<2048>;
    case 4096: return values_for<4096>;
    case 8192: return values_for<8192>;
    default: return 0;
  }
}

#ifndef HRR_EMULATE

// c[row] = irfft(op(rfft(a[row])) · rfft(b[row])) for `rows` contiguous rows of D floats; op = conj when conj_a.
// D in {512, 1024, 2048, 4096, 8192}; tw: D float2 twiddles exp(-2 pi i m / D) on the device; stream: a
// cudaStream_t. Returns 0, -1 for an unsupported D, or the CUDA error code of the launch.
extern "C" int memarch_hrr_bind(const float* a, const float* b, float* c, long long rows, int D, int conj_a,
                                const void* tw, void* stream) {
  if (rows <= 0) return 0;
  switch (D) {
    case 512: return launch<512>(a, b, c, rows, tw, conj_a, stream);
    case 1024: return launch<1024>(a, b, c, rows, tw, conj_a, stream);
    case 2048: return launch<2048>(a, b, c, rows, tw, conj_a, stream);
    case 4096: return launch<4096>(a, b, c, rows, tw, conj_a, stream);
    case 8192: return launch<8192>(a, b, c, rows, tw, conj_a, stream);
    default: return -1;
  }
}
#endif
