// Fused HRR binding on CUDA: c = irfft(op(rfft(a)) · rfft(b)) per row of D float32 values, op = identity
// (circular convolution, `bind`) or complex conjugation (circular correlation, `unbind`), in one kernel that reads
// a and b once and writes c once. specs/vsa.md ("The fused CUDA kernel") states the algorithm; hrr_bind.py
// builds this file with nvcc and calls `memarch_hrr_bind` through ctypes.
//
// One thread block per two rows, D/V threads (V = HRR_VALUES values per thread, 16 by default). A row's two real
// operands travel as one complex sequence z = a + i·b: one complex FFT of length D gives both spectra
// (A_k = (Z_k + conj Z_{D-k})/2, B_k = (Z_k - conj Z_{D-k})/2i). Their product C_k is Hermitian, so the two rows'
// products are packed as W = C0 + i·C1, whose one inverse FFT is c0 + i·c1: three FFTs per two rows. Each FFT is
// a Stockham autosort FFT (Govindaraju et al., SC 2008): radix-V stages (then one smaller radix for the rest of
// D), each thread holding V values in registers per stage and doing its small DFTs there (radix-2 decimation in
// frequency), shared memory between stages. The forward FFTs' first stage reads a and b straight from global
// memory, the inverse's last stage writes c straight to it, both coalesced. Twiddles W_D^m = exp(-2 pi i m / D)
// come from a table the caller computes in float64 and rounds to float32.

#ifdef HRR_EMULATE
// compiled for the CPU by hrr_bind_emulate.cpp (tests): it defines the CUDA names used below
#define HRR_SHARED(name) float* name = hrr_emulated_shared
#else
#include <cuda_runtime.h>
#define HRR_SHARED(name) extern __shared__ float name[]
#endif

namespace {

// Values each thread holds per stage (the largest radix): 4, 8 or 16. Fewer values, fewer registers and more
// threads per row, but more stages through shared memory; `scripts/bench.py --op bind_sweep` times the three.
#ifndef HRR_VALUES
#define HRR_VALUES 16
#endif
constexpr int V = HRR_VALUES;
static_assert(V == 4 || V == 8 || V == 16, "HRR_VALUES must be 4, 8 or 16");

// W_16^q = exp(-2 pi i q / 16) = cos(2 pi q / 16) - i sin(2 pi q / 16), q < 8 (the small DFTs need no more)
__device__ __forceinline__ float w16_re(int q) {
  switch (q) {
    case 0: return 1.0f;
    case 1: return 0.92387953251128674f;
    case 2: return 0.70710678118654752f;
    case 3: return 0.38268343236508977f;
    case 4: return 0.0f;
    case 5: return -0.38268343236508977f;
    case 6: return -0.70710678118654752f;
    default: return -0.92387953251128674f;
  }
}

__device__ __forceinline__ float w16_im(int q) {  // the imaginary part of W_16^q (forward sign)
  switch (q) {
    case 0: return 0.0f;
    case 1: return -0.38268343236508977f;
    case 2: return -0.70710678118654752f;
    case 3: return -0.92387953251128674f;
    case 4: return -1.0f;
    case 5: return -0.92387953251128674f;
    case 6: return -0.70710678118654752f;
    default: return -0.38268343236508977f;
  }
}

__host__ __device__ constexpr int bit_reverse(int i, int bits) {
  int r = 0;
  for (int b = 0; b < bits; ++b) r |= ((i >> b) & 1) << (bits - 1 - b);
  return r;
}

__host__ __device__ constexpr int log2i(int n) { return n <= 1 ? 0 : 1 + log2i(n / 2); }

// shared-memory index with one pad word per 32: the strided stores of a stage spread over the banks
__device__ __forceinline__ int pad(int i) { return i + (i >> 5); }

// In-register DFT of length R (2, 4, 8 or 16) of v[OFF .. OFF + R), radix-2 decimation in frequency (Gentleman-
// Sande), INV: exp(+...), one butterfly level of span M per call. The result is left in bit-reversed order
// (X[bit_reverse(i)] in slot OFF + i): the stores undo that in their addresses. M is a template constant so that
// nvcc unrolls the loops fully and every register index is a compile-time constant (no local memory).
template <int R, bool INV, int OFF, int M>
__device__ __forceinline__ void dif_level(float (&re)[V], float (&im)[V]) {
  if constexpr (M >= 2) {
#pragma unroll
    for (int k = 0; k < R; k += M) {
#pragma unroll
      for (int j = 0; j < M / 2; ++j) {
        const int q = j * (16 / M);  // W_M^j = W_16^q
        const int lo = OFF + k + j, hi = OFF + k + j + M / 2;
        const float ur = re[lo], ui = im[lo], xr = re[hi], xi = im[hi];
        re[lo] = ur + xr;
        im[lo] = ui + xi;
        const float dr = ur - xr, di = ui - xi;
        if (q == 0) {
          re[hi] = dr;
          im[hi] = di;
        } else if (q == 4) {  // W = -i forward, +i inverse
          re[hi] = INV ? -di : di;
          im[hi] = INV ? dr : -dr;
        } else {
          const float wr = w16_re(q), wi = INV ? -w16_im(q) : w16_im(q);
          re[hi] = dr * wr - di * wi;
          im[hi] = dr * wi + di * wr;
        }
      }
    }
    dif_level<R, INV, OFF, M / 2>(re, im);
  }
}

template <int R, bool INV, int OFF>
__device__ __forceinline__ void small_dft(float (&re)[V], float (&im)[V]) {
  dif_level<R, INV, OFF, R>(re, im);
}

template <int R, bool INV, int IT>
__device__ __forceinline__ void small_dfts(float (&re)[V], float (&im)[V]) {
  if constexpr (IT < V / R) {
    small_dft<R, INV, IT * R>(re, im);
    small_dfts<R, INV, IT + 1>(re, im);
  }
}

// One Stockham stage of the length-D FFT: NS = the product of the earlier stages' radices, R this stage's radix.
// Thread `tid` owns items j = tid + it * D/V (V/R of them), item j's inputs x[j + r D/R] (r < R) sit in
// re/im[it R + r]. SRC_GLOBAL: the inputs come from a (real part) and b (imaginary part), else from shared memory;
// DST_GLOBAL: the outputs' real parts / D go to c (and their imaginary parts / D to c1 unless it is null), else
// to shared memory.
template <int D, int NS, int R, bool INV, bool SRC_GLOBAL, bool DST_GLOBAL>
__device__ __forceinline__ void stage(float* sre, float* sim, const float* __restrict__ a, const float* __restrict__ b,
                                      float* __restrict__ c, float* __restrict__ c1, const float2* __restrict__ tw,
                                      int tid) {
  constexpr int T = D / V;
  constexpr int ITEMS = V / R;
  float re[V], im[V];
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int j = tid + it * T;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int src = j + r * (D / R);
      if constexpr (SRC_GLOBAL) {
        re[it * R + r] = __ldg(a + src);
        im[it * R + r] = __ldg(b + src);
      } else {
        re[it * R + r] = sre[pad(src)];
        im[it * R + r] = sim[pad(src)];
      }
    }
  }
  if constexpr (!SRC_GLOBAL) __syncthreads();  // every read of this stage before any write
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int k = (tid + it * T) & (NS - 1);
    if constexpr (NS > 1) {
#pragma unroll
      for (int r = 1; r < R; ++r) {
        const float2 w = __ldg(tw + ((k * r * (D / (NS * R))) & (D - 1)));
        const float wi = INV ? -w.y : w.y;
        const float xr = re[it * R + r], xi = im[it * R + r];
        re[it * R + r] = xr * w.x - xi * wi;
        im[it * R + r] = xr * wi + xi * w.x;
      }
    }
  }
  small_dfts<R, INV, 0>(re, im);
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int j = tid + it * T;
    const int base = (j / NS) * NS * R + (j & (NS - 1));
#pragma unroll
    for (int i = 0; i < R; ++i) {  // slot i holds the DFT's output bit_reverse(i)
      const int dst = base + bit_reverse(i, log2i(R)) * NS;
      if constexpr (DST_GLOBAL) {
        c[dst] = re[it * R + i] * (1.0f / D);  // the last stage: base = j, so these stores are coalesced
        if (c1 != nullptr) c1[dst] = im[it * R + i] * (1.0f / D);
      } else {
        sre[pad(dst)] = re[it * R + i];
        sim[pad(dst)] = im[it * R + i];
      }
    }
  }
  __syncthreads();
}

// The stages from NS on (radix V while V divides what is left, then the remainder)
template <int D, int NS, bool INV>
__device__ __forceinline__ void stages(float* sre, float* sim, const float* a, const float* b, float* c, float* c1,
                                       const float2* tw, int tid) {
  if constexpr (NS < D) {
    constexpr int R = (D / NS) >= V ? V : D / NS;
    constexpr bool first = !INV && NS == 1;
    constexpr bool last = INV && NS * R == D;
    stage<D, NS, R, INV, first, last>(sre, sim, a, b, c, c1, tw, tid);
    stages<D, NS * R, INV>(sre, sim, a, b, c, c1, tw, tid);
  }
}

// C_k = op(A_k) B_k from the spectrum Z of a + i b in shared memory (A_k = (Z_k + conj Z_m)/2,
// B_k = (Z_k - conj Z_m)/2i, m = D - k mod D)
__device__ __forceinline__ float2 spectra_product(const float* sre, const float* sim, int k, int m, int conj_a) {
  const float zr = sre[pad(k)], zi = sim[pad(k)];
  const float mr = sre[pad(m)], mi = -sim[pad(m)];  // conj Z_m
  const float ar = 0.5f * (zr + mr), ai = 0.5f * (zi + mi) * (conj_a ? -1.0f : 1.0f);
  const float br = 0.5f * (zi - mi), bi = -0.5f * (zr - mr);
  return make_float2(ar * br - ai * bi, ar * bi + ai * br);
}

// Two rows per block: their spectra C0, C1 (each Hermitian) are packed as W = C0 + i C1, whose inverse FFT is
// c0 + i c1 — three FFTs per two rows instead of four. An odd last row goes alone (C1 = 0, no second store).
template <int D>
__global__ void __launch_bounds__(D / V) hrr_bind_pair_kernel(const float* __restrict__ a,
                                                               const float* __restrict__ b, float* __restrict__ c,
                                                               const float2* __restrict__ tw, int conj_a,
                                                               long long rows) {
  HRR_SHARED(smem);
  constexpr int P = D + D / 32;
  float* re0 = smem;
  float* im0 = smem + P;
  float* re1 = smem + 2 * P;
  float* im1 = smem + 3 * P;
  const long long row0 = 2LL * blockIdx.x;
  const bool two = row0 + 1 < rows;  // uniform over the block, so the barriers inside the branch are safe
  const int tid = threadIdx.x;
  stages<D, 1, false>(re0, im0, a + row0 * D, b + row0 * D, nullptr, nullptr, tw, tid);
  if (two) stages<D, 1, false>(re1, im1, a + (row0 + 1) * D, b + (row0 + 1) * D, nullptr, nullptr, tw, tid);
  for (int k = tid; k <= D / 2; k += D / V) {
    const int m = (D - k) & (D - 1);
    const float2 p0 = spectra_product(re0, im0, k, m, conj_a);
    const float2 p1 = two ? spectra_product(re1, im1, k, m, conj_a) : make_float2(0.0f, 0.0f);
    re0[pad(k)] = p0.x - p1.y;  // W_k = C0_k + i C1_k
    im0[pad(k)] = p0.y + p1.x;
    re0[pad(m)] = p0.x + p1.y;  // W_m = conj C0_k + i conj C1_k
    im0[pad(m)] = p1.x - p0.y;
  }
  __syncthreads();
  stages<D, 1, true>(re0, im0, nullptr, nullptr, c + row0 * D, two ? c + (row0 + 1) * D : nullptr, tw, tid);
}

#ifndef HRR_EMULATE
template <int D>
int launch(const float* a, const float* b, float* c, long long rows, const void* tw, int conj_a, void* stream) {
  const size_t smem = 4 * (D + D / 32) * sizeof(float);  // two rows' spectra, re and im planes
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(hrr_bind_pair_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  hrr_bind_pair_kernel<D><<<static_cast<unsigned>((rows + 1) / 2), D / V, smem, static_cast<cudaStream_t>(stream)>>>(
      a, b, c, static_cast<const float2*>(tw), conj_a, rows);
  return static_cast<int>(cudaGetLastError());
}

#endif

}  // namespace

#ifndef HRR_EMULATE

// c[row] = irfft(op(rfft(a[row])) · rfft(b[row])) for `rows` contiguous rows of D floats; op = conj when conj_a.
// D in {512, 1024, 2048, 4096}; tw: D float2 twiddles exp(-2 pi i m / D) on the device; stream: a
// cudaStream_t. Returns 0, -1 for an unsupported D, or the CUDA error code of the launch.
extern "C" int memarch_hrr_bind(const float* a, const float* b, float* c, long long rows, int D, int conj_a,
                                const void* tw, void* stream) {
  if (rows <= 0) return 0;
  switch (D) {
    case 512: return launch<512>(a, b, c, rows, tw, conj_a, stream);
    case 1024: return launch<1024>(a, b, c, rows, tw, conj_a, stream);
    case 2048: return launch<2048>(a, b, c, rows, tw, conj_a, stream);
    case 4096: return launch<4096>(a, b, c, rows, tw, conj_a, stream);
    default: return -1;
  }
}
#endif
