/* The selective scan's forward on the CPU: the recurrence of specs/ssm.md [SSM-1]..[SSM-5], one time step after
 * another, compiled. `optimized/kernels/cpu_scan.py` builds this file twice (-DSCAN_DOUBLE=0 and =1, giving
 * float and double) with the system C compiler and calls it through ctypes; see that module for when it runs.
 *
 * Work split: a job is one batch row b and a block of `block` consecutive channels d0 .. d0+block-1 that share
 * one B/C group. A job walks time in tiles of TILE steps: it copies the tile's delta, u and z of its channels
 * into local (time, channel) arrays (the inputs are (B, D, L), time-contiguous), computes
 * Δ = softplus(delta + bias) there, and then runs the tile's steps with the state h (N, block) held locally, so
 * that the innermost loop runs over channels: contiguous, and vectorised by the compiler.
 *
 * exp is our own (`exp_r`, range reduction plus a Taylor polynomial, branch-free so that the channel loop
 * vectorises without -ffast-math): within 2 ulp in float and 4 ulp in double over its range; inputs below
 * EXP_UNDER give 0 (the true value is subnormal), above EXP_OVER +inf, NaN gives NaN. No libm call is made.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef SCAN_DOUBLE
#define SCAN_DOUBLE 0
#endif

#if SCAN_DOUBLE
typedef double real;
typedef uint64_t bits_t;
#define ROUND_MAGIC 6755399441055744.0 /* 1.5 * 2^52: adding it rounds to an integer held in the low bits */
#define EXP_BIAS 1023u
#define MANT_BITS 52
#define EXP_LO (-708.0)
#define EXP_HI 709.0
#define EXP_UNDER (-708.39)
#define EXP_OVER 709.78
#define SOFTPLUS_THRESHOLD 20.0
#else
typedef float real;
typedef uint32_t bits_t;
#define ROUND_MAGIC 12582912.0f /* 1.5 * 2^23 */
#define EXP_BIAS 127u
#define MANT_BITS 23
#define EXP_LO (-87.0f)
#define EXP_HI 88.0f
#define EXP_UNDER (-87.33f)
#define EXP_OVER 88.72f
#define SOFTPLUS_THRESHOLD 20.0f
#endif

#define BLOCK_MAX 32 /* channels per job, at most */
#define TILE 64      /* time steps per tile */

static const real LOG2E = (real)1.4426950408889634;
static const real LN2_HI = (real)0.693145751953125;      /* ln 2 split so that k * LN2_HI is exact */
static const real LN2_LO = (real)1.4286068203094172e-06;

static inline real bits_to_real(bits_t b) {
    real r;
    memcpy(&r, &b, sizeof r);
    return r;
}

static inline bits_t real_to_bits(real r) {
    bits_t b;
    memcpy(&b, &r, sizeof b);
    return b;
}

/* e^x = 2^k e^r with k = round(x / ln 2), |r| <= ln 2 / 2; e^r by its Taylor polynomial (degree 7 in float,
 * 13 in double: the truncation error is below half an ulp on that interval). */
static inline real exp_r(real x) {
    real xc = x < EXP_LO ? EXP_LO : x;
    xc = xc > EXP_HI ? EXP_HI : xc;
    real shifted = xc * LOG2E + ROUND_MAGIC; /* its low mantissa bits hold k */
    real k = shifted - ROUND_MAGIC;
    real r = xc - k * LN2_HI;
    r = r - k * LN2_LO;
#if SCAN_DOUBLE
    real p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
#else
    real p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
#endif
    real scale = bits_to_real((bits_t)((real_to_bits(shifted) + EXP_BIAS) << MANT_BITS));
    real result = p * scale;
    result = x < EXP_UNDER ? (real)0 : result;
    result = x > EXP_OVER ? bits_to_real((bits_t)((bits_t)(2 * EXP_BIAS + 1) << MANT_BITS)) : result; /* +inf */
    return x != x ? x : result;
}

/* log(1 + e) for e in [0, 1] as 2 atanh(s), s = e / (2 + e) in [0, 1/3]: no cancellation for small e. */
static inline real log1p_unit(real e) {
    real s = e / (2 + e);
    real s2 = s * s;
#if SCAN_DOUBLE
    real p = 2.0 / 35.0;
    p = p * s2 + 2.0 / 33.0;
    p = p * s2 + 2.0 / 31.0;
    p = p * s2 + 2.0 / 29.0;
    p = p * s2 + 2.0 / 27.0;
    p = p * s2 + 2.0 / 25.0;
    p = p * s2 + 2.0 / 23.0;
    p = p * s2 + 2.0 / 21.0;
    p = p * s2 + 2.0 / 19.0;
    p = p * s2 + 2.0 / 17.0;
    p = p * s2 + 2.0 / 15.0;
    p = p * s2 + 2.0 / 13.0;
    p = p * s2 + 2.0 / 11.0;
    p = p * s2 + 2.0 / 9.0;
    p = p * s2 + 2.0 / 7.0;
    p = p * s2 + 2.0 / 5.0;
    p = p * s2 + 2.0 / 3.0;
    p = p * s2 + 2.0;
#else
    real p = 2.0f / 17.0f;
    p = p * s2 + 2.0f / 15.0f;
    p = p * s2 + 2.0f / 13.0f;
    p = p * s2 + 2.0f / 11.0f;
    p = p * s2 + 2.0f / 9.0f;
    p = p * s2 + 2.0f / 7.0f;
    p = p * s2 + 2.0f / 5.0f;
    p = p * s2 + 2.0f / 3.0f;
    p = p * s2 + 2.0f;
#endif
    return p * s;
}

/* torch.nn.functional.softplus with beta 1, threshold 20: x above the threshold passes through. */
static inline real softplus_r(real x) {
    real negabs = x > 0 ? -x : x;
    real value = (x > 0 ? x : (real)0) + log1p_unit(exp_r(negabs));
    return x > SOFTPLUS_THRESHOLD ? x : value;
}

/* out = (sum_n C_n h_n + D u) * silu(z), h_n = exp(Δ A_n) h_n + Δ u B_n, for the jobs [job_start, job_stop).
 *
 * Shapes (all contiguous): u, delta, z, y (B, D, L); delta_bias, d_skip (D); a_nd (N, D) = A transposed;
 * b_mat, c_mat (B, G, N, L), or (N, D) when *_shared (time-invariant B or C, one row per channel);
 * h0, h_last (B, D, N). delta_bias, d_skip, z and h0 may be NULL. `block` divides D / G and is at most
 * BLOCK_MAX. Returns 0, or 1 when the state buffer cannot be allocated. */
int scan_forward(int64_t batch, int64_t length, int64_t dim, int64_t nstate, int64_t groups, int64_t block,
                 int64_t job_start, int64_t job_stop, const real* u, const real* delta, const real* delta_bias,
                 int softplus, const real* a_nd, const real* b_mat, int b_shared, const real* c_mat,
                 int c_shared, const real* d_skip, const real* z, const real* h0, real* y, real* h_last) {
    if (block < 1 || block > BLOCK_MAX) return 2;
    real* h = (real*)malloc(sizeof(real) * (size_t)(nstate * BLOCK_MAX));
    if (h == NULL) return 1;
    real dt_tile[TILE][BLOCK_MAX], du_tile[TILE][BLOCK_MAX], u_tile[TILE][BLOCK_MAX], gate_tile[TILE][BLOCK_MAX];
    real acc[BLOCK_MAX], dt_line[TILE], gate_line[TILE];
    const int64_t blocks_per_row = dim / block, channels_per_group = dim / groups;
    for (int64_t job = job_start; job < job_stop; ++job) {
        const int64_t b = job / blocks_per_row, d0 = (job % blocks_per_row) * block;
        const int64_t g = d0 / channels_per_group;
        for (int64_t n = 0; n < nstate; ++n)
            for (int64_t j = 0; j < block; ++j)
                h[n * BLOCK_MAX + j] = h0 ? h0[(b * dim + d0 + j) * nstate + n] : (real)0;
        const real* b_row = b_shared ? b_mat + d0 : b_mat + (b * groups + g) * nstate * length;
        const real* c_row = c_shared ? c_mat + d0 : c_mat + (b * groups + g) * nstate * length;
        for (int64_t t0 = 0; t0 < length; t0 += TILE) {
            const int64_t steps = length - t0 < TILE ? length - t0 : TILE;
            for (int64_t j = 0; j < block; ++j) { /* contiguous passes (vectorised), then into the tiles */
                const int64_t offset = (b * dim + d0 + j) * length + t0;
                const real bias = delta_bias ? delta_bias[d0 + j] : (real)0;
                const real* delta_row = delta + offset;
                const real* u_row = u + offset;
                if (softplus)
                    for (int64_t s = 0; s < steps; ++s) dt_line[s] = softplus_r(delta_row[s] + bias);
                else
                    for (int64_t s = 0; s < steps; ++s) dt_line[s] = delta_row[s] + bias;
                if (z) {
                    const real* z_row = z + offset;
                    for (int64_t s = 0; s < steps; ++s) gate_line[s] = z_row[s] / (1 + exp_r(-z_row[s]));
                } else {
                    for (int64_t s = 0; s < steps; ++s) gate_line[s] = 1;
                }
                for (int64_t s = 0; s < steps; ++s) {
                    dt_tile[s][j] = dt_line[s];
                    du_tile[s][j] = dt_line[s] * u_row[s];
                    u_tile[s][j] = u_row[s];
                    gate_tile[s][j] = gate_line[s];
                }
            }
            for (int64_t s = 0; s < steps; ++s) {
                const int64_t t = t0 + s;
                const real* dtv = dt_tile[s];
                const real* duv = du_tile[s];
                for (int64_t j = 0; j < block; ++j) acc[j] = 0;
                for (int64_t n = 0; n < nstate; ++n) {
                    const real* an = a_nd + n * dim + d0;
                    real* hn = h + n * BLOCK_MAX;
                    if (!b_shared && !c_shared) {
                        const real bv = b_row[n * length + t], cv = c_row[n * length + t];
                        for (int64_t j = 0; j < block; ++j) {
                            hn[j] = exp_r(dtv[j] * an[j]) * hn[j] + duv[j] * bv;
                            acc[j] += cv * hn[j];
                        }
                    } else {
                        const real* bn = b_shared ? b_row + n * dim : NULL;
                        const real* cn = c_shared ? c_row + n * dim : NULL;
                        const real bv = b_shared ? (real)0 : b_row[n * length + t];
                        const real cv = c_shared ? (real)0 : c_row[n * length + t];
                        for (int64_t j = 0; j < block; ++j) {
                            hn[j] = exp_r(dtv[j] * an[j]) * hn[j] + duv[j] * (bn ? bn[j] : bv);
                            acc[j] += (cn ? cn[j] : cv) * hn[j];
                        }
                    }
                }
                for (int64_t j = 0; j < block; ++j) {
                    const real skip = d_skip ? d_skip[d0 + j] * u_tile[s][j] : (real)0;
                    dt_tile[s][j] = (acc[j] + skip) * gate_tile[s][j]; /* the tile's outputs, reusing dt_tile */
                }
            }
            for (int64_t j = 0; j < block; ++j) {
                const int64_t offset = (b * dim + d0 + j) * length + t0;
                for (int64_t s = 0; s < steps; ++s) y[offset + s] = dt_tile[s][j];
            }
        }
        for (int64_t n = 0; n < nstate; ++n)
            for (int64_t j = 0; j < block; ++j)
                h_last[(b * dim + d0 + j) * nstate + n] = h[n * BLOCK_MAX + j];
    }
    free(h);
    return 0;
}
