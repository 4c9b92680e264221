/* The selective scan on the CPU, forward and backward: the recurrence of specs/ssm.md [SSM-1]..[SSM-5], one time
 * step after another, compiled. `optimized/kernels/cpu_scan.py` builds this file twice (-DSCAN_DOUBLE=0 and =1,
 * giving float and double) with the system C compiler and calls it through ctypes; see that module for when it
 * runs.
 *
 * Work split: a job is one batch row b and a block of `block` consecutive channels d0 .. d0+block-1 that share
 * one B/C group. A job walks time in tiles of TILE steps: it copies the tile's delta, u and z of its channels
 * into local (time, channel) arrays (the inputs are (B, D, L), time-contiguous), computes
 * Δ = softplus(delta + bias) there, and then runs the tile's steps with the state h (N, block) held locally, so
 * that the innermost loop runs over channels: contiguous, and vectorised by the compiler. With gradients wanted
 * the forward also stores the state entering each tile; the backward walks the tiles in reverse, recomputes a
 * tile's states and decays from that checkpoint, and runs the adjoint recurrence through it.
 *
 * exp is our own (`exp_r`, range reduction plus a Taylor polynomial, branch-free so that the channel loop
 * vectorises without -ffast-math): within 2 ulp in float and 4 ulp in double over its range; inputs below
 * EXP_UNDER give 0 (the true value is at most 1.9e-38 in float, 3.3e-308 in double), above EXP_OVER +inf, NaN
 * gives NaN. No libm call is made.
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
#define EXP_UNDER (-708.0) /* below: 0 (2^(k-1) would not be a normal number; e^x < 3.3e-308) */
#define EXP_OVER 709.78   /* above: +inf */
#define SOFTPLUS_THRESHOLD 20.0
#else
typedef float real;
typedef uint32_t bits_t;
#define ROUND_MAGIC 12582912.0f /* 1.5 * 2^23 */
#define EXP_BIAS 127u
#define MANT_BITS 23
#define EXP_UNDER (-86.9f) /* below: 0 (e^x < 1.9e-38) */
#define EXP_OVER 88.72f   /* above: +inf */
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
 * 13 in double: the truncation error is below half an ulp on that interval), scaled by 2 · 2^(k-1) so that k up
 * to the largest finite result stays a normal exponent. No clamp: NaN propagates through the arithmetic, and
 * the two selects at the end cover x beyond the range where k is exact. */
static inline real exp_r(real x) {
    real shifted = x * LOG2E + ROUND_MAGIC; /* its low mantissa bits hold k */
    real k = shifted - ROUND_MAGIC;
    real r = x - k * LN2_HI;
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
    real half_scale = bits_to_real((bits_t)((real_to_bits(shifted) + (EXP_BIAS - 1)) << MANT_BITS)); /* 2^(k-1) */
    real result = (p + p) * half_scale;
    result = x < EXP_UNDER ? (real)0 : result;
    return x > EXP_OVER ? bits_to_real((bits_t)((bits_t)(2 * EXP_BIAS + 1) << MANT_BITS)) : result; /* +inf */
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

/* d softplus / dx = sigmoid(x) (1 above the threshold, where softplus passes x through). */
static inline real softplus_grad_r(real x) {
    real value = 1 / (1 + exp_r(-x));
    return x > SOFTPLUS_THRESHOLD ? (real)1 : value;
}

/* A job's inputs for TILE steps in (time, channel) layout; `grads` also fills the derivative rows. */
typedef struct {
    real dt[TILE][BLOCK_MAX];   /* Δ = softplus(delta + bias), or delta + bias */
    real du[TILE][BLOCK_MAX];   /* Δ u */
    real u[TILE][BLOCK_MAX];
    real gate[TILE][BLOCK_MAX]; /* silu(z), or 1 without z */
    real ddt[TILE][BLOCK_MAX];  /* dΔ / d delta (grads only) */
    real dgate[TILE][BLOCK_MAX];/* d silu(z) / dz (grads only) */
    real gy[TILE][BLOCK_MAX];   /* the output's gradient (grads only) */
    real out[3][TILE][BLOCK_MAX]; /* results on their way back to (B, D, L) */
    real line[3][TILE];         /* contiguous scratch rows */
} Tile;

/* Copy (B, D, L) rows of the job's channels for steps [t0, t0 + steps) into `tile`: contiguous passes over time
 * (vectorised), then into the (time, channel) arrays. */
static void load_tile(Tile* tile, int grads, const real* u, const real* delta, const real* delta_bias, int softplus,
                      const real* z, const real* grad_y, int64_t b, int64_t dim, int64_t length, int64_t d0,
                      int64_t block, int64_t t0, int64_t steps) {
    real* dt_line = tile->line[0];
    real* gate_line = tile->line[1];
    real* extra_line = tile->line[2];
    for (int64_t j = 0; j < block; ++j) {
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
            tile->dt[s][j] = dt_line[s];
            tile->du[s][j] = dt_line[s] * u_row[s];
            tile->u[s][j] = u_row[s];
            tile->gate[s][j] = gate_line[s];
        }
        if (!grads) continue;
        if (softplus)
            for (int64_t s = 0; s < steps; ++s) extra_line[s] = softplus_grad_r(delta_row[s] + bias);
        else
            for (int64_t s = 0; s < steps; ++s) extra_line[s] = 1;
        for (int64_t s = 0; s < steps; ++s) tile->ddt[s][j] = extra_line[s];
        if (z) {
            const real* z_row = z + offset;
            for (int64_t s = 0; s < steps; ++s) {
                const real sig = 1 / (1 + exp_r(-z_row[s]));
                extra_line[s] = sig * (1 + z_row[s] * (1 - sig));
            }
        } else {
            for (int64_t s = 0; s < steps; ++s) extra_line[s] = 0;
        }
        for (int64_t s = 0; s < steps; ++s) tile->dgate[s][j] = extra_line[s];
        const real* gy_row = grad_y + offset;
        for (int64_t s = 0; s < steps; ++s) tile->gy[s][j] = gy_row[s];
    }
}

/* Write tile->out[k] (time, channel) back to a (B, D, L) tensor. */
static void store_tile(const Tile* tile, int k, real* dst, int64_t b, int64_t dim, int64_t length, int64_t d0,
                       int64_t block, int64_t t0, int64_t steps) {
    for (int64_t j = 0; j < block; ++j) {
        real* row = dst + (b * dim + d0 + j) * length + t0;
        for (int64_t s = 0; s < steps; ++s) row[s] = tile->out[k][s][j];
    }
}

/* Row n of B or C at step t for the job's channels: the shared (N, D) row itself, or the group's value at
 * (n, t) broadcast into `fill` (one loop body for every layout: a select inside the channel loop, by contrast,
 * made the compiler emit masked loads that ran ten times slower). */
static inline const real* matrix_row(const real* row, int shared, int64_t n, int64_t dim, int64_t length, int64_t t,
                                     int64_t block, real* fill) {
    if (shared) return row + n * dim;
    const real value = row[n * length + t];
    for (int64_t j = 0; j < block; ++j) fill[j] = value;
    return fill;
}

/* Σ_j x[j] in eight interleaved partial sums (a loop the compiler vectorises without reassociating). */
static inline real sum_block(const real* x, int64_t block) {
    real lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 8 <= block; j += 8)
        for (int k = 0; k < 8; ++k) lanes[k] += x[j + k];
    real total = 0;
    for (; j < block; ++j) total += x[j];
    for (int k = 0; k < 8; ++k) total += lanes[k];
    return total;
}

/* out = (sum_n C_n h_n + D u) * silu(z), h_n = exp(Δ A_n) h_n + Δ u B_n, for the jobs [job_start, job_stop).
 *
 * Shapes (all contiguous): u, delta, z, y (B, D, L); delta_bias, d_skip (D); a_nd (N, D) = A transposed;
 * b_mat, c_mat (B, G, N, L), or (N, D) when *_shared (time-invariant B or C, one row per channel);
 * h0, h_last (B, D, N); h_ckpt (B, D, ceil(L / TILE), N): the state entering each tile, for the backward.
 * delta_bias, d_skip, z, h0 and h_ckpt may be NULL. `block` divides D / G and is at most BLOCK_MAX.
 * Returns 0, 1 when the work buffers cannot be allocated, 2 for a bad block. */
int scan_forward(int64_t batch, int64_t length, int64_t dim, int64_t nstate, int64_t groups, int64_t block,
                 int64_t job_start, int64_t job_stop, const real* u, const real* delta, const real* delta_bias,
                 int softplus, const real* a_nd, const real* b_mat, int b_shared, const real* c_mat,
                 int c_shared, const real* d_skip, const real* z, const real* h0, real* y, real* h_last,
                 real* h_ckpt) {
    (void)batch; /* the jobs say which rows */
    if (block < 1 || block > BLOCK_MAX) return 2;
    real* h = (real*)malloc(sizeof(real) * (size_t)(nstate * BLOCK_MAX));
    Tile* tile = (Tile*)malloc(sizeof(Tile));
    if (h == NULL || tile == NULL) {
        free(h);
        free(tile);
        return 1;
    }
    real acc[BLOCK_MAX], b_fill[BLOCK_MAX], c_fill[BLOCK_MAX];
    const int64_t blocks_per_row = dim / block, channels_per_group = dim / groups;
    const int64_t n_tiles = (length + TILE - 1) / TILE;
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
            if (h_ckpt)
                for (int64_t j = 0; j < block; ++j)
                    for (int64_t n = 0; n < nstate; ++n)
                        h_ckpt[((b * dim + d0 + j) * n_tiles + t0 / TILE) * nstate + n] = h[n * BLOCK_MAX + j];
            load_tile(tile, 0, u, delta, delta_bias, softplus, z, NULL, b, dim, length, d0, block, t0, steps);
            for (int64_t s = 0; s < steps; ++s) {
                const int64_t t = t0 + s;
                const real* restrict dtv = tile->dt[s];
                const real* restrict duv = tile->du[s];
                for (int64_t j = 0; j < block; ++j) acc[j] = 0;
                for (int64_t n = 0; n < nstate; ++n) {
                    const real* restrict an = a_nd + n * dim + d0;
                    real* restrict hn = h + n * BLOCK_MAX;
                    const real* restrict bn = matrix_row(b_row, b_shared, n, dim, length, t, block, b_fill);
                    const real* restrict cn = matrix_row(c_row, c_shared, n, dim, length, t, block, c_fill);
                    for (int64_t j = 0; j < block; ++j) {
                        hn[j] = exp_r(dtv[j] * an[j]) * hn[j] + duv[j] * bn[j];
                        acc[j] += cn[j] * hn[j];
                    }
                }
                for (int64_t j = 0; j < block; ++j) {
                    const real skip = d_skip ? d_skip[d0 + j] * tile->u[s][j] : (real)0;
                    tile->out[0][s][j] = (acc[j] + skip) * tile->gate[s][j];
                }
            }
            store_tile(tile, 0, y, b, dim, length, d0, block, t0, steps);
        }
        for (int64_t n = 0; n < nstate; ++n)
            for (int64_t j = 0; j < block; ++j)
                h_last[(b * dim + d0 + j) * nstate + n] = h[n * BLOCK_MAX + j];
    }
    free(h);
    free(tile);
    return 0;
}

/* The gradients of `scan_forward`'s outputs for the jobs [job_start, job_stop): tiles in reverse, each one's
 * states recomputed from its checkpoint, then the adjoint recurrence gh_{t-1} = exp(Δ_t A) ⊙ (gh_t + g_t C_t)
 * with g_t = grad_y_t ⊙ silu(z_t).
 *
 * Inputs as in scan_forward plus h_ckpt (filled by it), grad_y (B, D, L) and grad_last (B, D, N) or NULL.
 * Outputs: g_u, g_delta (B, D, L); g_z (B, D, L) when z is given; g_a (B, N, D) per batch row; g_b, g_c per
 * batch row (B, N, D) when shared, else per job (B, D / block, N, L) (the caller sums the blocks of a group);
 * g_dskip (B, D) when d_skip is given; g_h0 (B, D, N). The caller sums over batch rows. Returns as scan_forward. */
int scan_backward(int64_t batch, int64_t length, int64_t dim, int64_t nstate, int64_t groups, int64_t block,
                  int64_t job_start, int64_t job_stop, const real* u, const real* delta, const real* delta_bias,
                  int softplus, const real* a_nd, const real* b_mat, int b_shared, const real* c_mat,
                  int c_shared, const real* d_skip, const real* z, const real* h_ckpt, const real* grad_y,
                  const real* grad_last, real* g_u, real* g_delta, real* g_z, real* g_a, real* g_b, real* g_c,
                  real* g_dskip, real* g_h0) {
    (void)batch;
    if (block < 1 || block > BLOCK_MAX) return 2;
    const size_t state = (size_t)(nstate * BLOCK_MAX);
    Tile* tile = (Tile*)malloc(sizeof(Tile));
    real* hist = (real*)malloc(sizeof(real) * state * TILE);  /* state after each step of the tile */
    real* decay = (real*)malloc(sizeof(real) * state * TILE); /* exp(Δ A) of each step */
    real* work = (real*)malloc(sizeof(real) * state * 6);
    if (tile == NULL || hist == NULL || decay == NULL || work == NULL) {
        free(tile);
        free(hist);
        free(decay);
        free(work);
        return 1;
    }
    real* h_start = work;          /* the state entering the tile */
    real* gh = work + state;       /* ∂/∂h of the current step's state */
    real* ga_acc = work + 2 * state;
    real* gb_acc = work + 3 * state; /* shared B: per channel */
    real* gc_acc = work + 4 * state; /* shared C: per channel */
    real* h = work + 5 * state;
    real y_pre[TILE][BLOCK_MAX];
    real gp[BLOCK_MAX], gu_step[BLOCK_MAX], gdt_step[BLOCK_MAX], gd_acc[BLOCK_MAX], prod_b[BLOCK_MAX],
        prod_c[BLOCK_MAX], b_fill[BLOCK_MAX], c_fill[BLOCK_MAX];
    const int64_t blocks_per_row = dim / block, channels_per_group = dim / groups;
    const int64_t n_tiles = (length + TILE - 1) / TILE;
    for (int64_t job = job_start; job < job_stop; ++job) {
        const int64_t b = job / blocks_per_row, blk = job % blocks_per_row, d0 = blk * block;
        const int64_t g = d0 / channels_per_group;
        const real* b_row = b_shared ? b_mat + d0 : b_mat + (b * groups + g) * nstate * length;
        const real* c_row = c_shared ? c_mat + d0 : c_mat + (b * groups + g) * nstate * length;
        for (int64_t n = 0; n < nstate; ++n)
            for (int64_t j = 0; j < block; ++j) {
                gh[n * BLOCK_MAX + j] = grad_last ? grad_last[(b * dim + d0 + j) * nstate + n] : (real)0;
                ga_acc[n * BLOCK_MAX + j] = gb_acc[n * BLOCK_MAX + j] = gc_acc[n * BLOCK_MAX + j] = 0;
            }
        for (int64_t j = 0; j < block; ++j) gd_acc[j] = 0;
        for (int64_t tile_index = n_tiles - 1; tile_index >= 0; --tile_index) {
            const int64_t t0 = tile_index * TILE;
            const int64_t steps = length - t0 < TILE ? length - t0 : TILE;
            load_tile(tile, 1, u, delta, delta_bias, softplus, z, grad_y, b, dim, length, d0, block, t0, steps);
            for (int64_t n = 0; n < nstate; ++n)
                for (int64_t j = 0; j < block; ++j)
                    h[n * BLOCK_MAX + j] = h_start[n * BLOCK_MAX + j] =
                        h_ckpt[((b * dim + d0 + j) * n_tiles + tile_index) * nstate + n];
            /* recompute the tile's states, decays and pre-gate outputs */
            for (int64_t s = 0; s < steps; ++s) {
                const int64_t t = t0 + s;
                const real* restrict dtv = tile->dt[s];
                const real* restrict duv = tile->du[s];
                real* restrict acc = y_pre[s];
                for (int64_t j = 0; j < block; ++j) acc[j] = d_skip ? d_skip[d0 + j] * tile->u[s][j] : (real)0;
                for (int64_t n = 0; n < nstate; ++n) {
                    const real* restrict an = a_nd + n * dim + d0;
                    real* restrict hn = h + n * BLOCK_MAX;
                    real* restrict dn = decay + ((size_t)s * nstate + n) * BLOCK_MAX;
                    real* restrict kept = hist + ((size_t)s * nstate + n) * BLOCK_MAX;
                    const real* restrict bn = matrix_row(b_row, b_shared, n, dim, length, t, block, b_fill);
                    const real* restrict cn = matrix_row(c_row, c_shared, n, dim, length, t, block, c_fill);
                    for (int64_t j = 0; j < block; ++j) {
                        const real a = exp_r(dtv[j] * an[j]);
                        dn[j] = a;
                        hn[j] = a * hn[j] + duv[j] * bn[j];
                        kept[j] = hn[j];
                        acc[j] += cn[j] * hn[j];
                    }
                }
            }
            /* the adjoint, backwards through the tile */
            for (int64_t s = steps - 1; s >= 0; --s) {
                const int64_t t = t0 + s;
                const real* restrict dtv = tile->dt[s];
                const real* restrict duv = tile->du[s];
                const real* restrict uv = tile->u[s];
                for (int64_t j = 0; j < block; ++j) {
                    gp[j] = tile->gy[s][j] * tile->gate[s][j];
                    tile->out[2][s][j] = tile->gy[s][j] * y_pre[s][j] * tile->dgate[s][j]; /* ∂/∂z */
                    gd_acc[j] += gp[j] * uv[j];
                    gu_step[j] = d_skip ? gp[j] * d_skip[d0 + j] : (real)0;
                    gdt_step[j] = 0;
                }
                for (int64_t n = 0; n < nstate; ++n) {
                    const real* restrict an = a_nd + n * dim + d0;
                    const real* restrict hn = hist + ((size_t)s * nstate + n) * BLOCK_MAX;
                    const real* restrict hp = s ? hist + ((size_t)(s - 1) * nstate + n) * BLOCK_MAX
                                                : h_start + n * BLOCK_MAX;
                    const real* restrict dn = decay + ((size_t)s * nstate + n) * BLOCK_MAX;
                    real* restrict ghn = gh + n * BLOCK_MAX;
                    real* restrict gan = ga_acc + n * BLOCK_MAX;
                    real* restrict gbn = gb_acc + n * BLOCK_MAX;
                    real* restrict gcn = gc_acc + n * BLOCK_MAX;
                    const real* restrict bn = matrix_row(b_row, b_shared, n, dim, length, t, block, b_fill);
                    const real* restrict cn = matrix_row(c_row, c_shared, n, dim, length, t, block, c_fill);
                    for (int64_t j = 0; j < block; ++j) {
                        const real bj = bn[j];
                        prod_c[j] = gp[j] * hn[j];                 /* into ∂/∂C */
                        const real grad_h = ghn[j] + gp[j] * cn[j];
                        const real g_log = grad_h * hp[j] * dn[j]; /* ∂/∂(Δ A) */
                        gdt_step[j] += g_log * an[j] + grad_h * uv[j] * bj;
                        gan[j] += g_log * dtv[j];
                        gu_step[j] += grad_h * dtv[j] * bj;
                        prod_b[j] = grad_h * duv[j];               /* into ∂/∂B */
                        ghn[j] = grad_h * dn[j];                   /* ∂/∂h of the previous step */
                    }
                    if (c_shared)
                        for (int64_t j = 0; j < block; ++j) gcn[j] += prod_c[j];
                    else
                        g_c[((b * blocks_per_row + blk) * nstate + n) * length + t] = sum_block(prod_c, block);
                    if (b_shared)
                        for (int64_t j = 0; j < block; ++j) gbn[j] += prod_b[j];
                    else
                        g_b[((b * blocks_per_row + blk) * nstate + n) * length + t] = sum_block(prod_b, block);
                }
                for (int64_t j = 0; j < block; ++j) {
                    tile->out[0][s][j] = gu_step[j];
                    tile->out[1][s][j] = gdt_step[j] * tile->ddt[s][j];
                }
            }
            store_tile(tile, 0, g_u, b, dim, length, d0, block, t0, steps);
            store_tile(tile, 1, g_delta, b, dim, length, d0, block, t0, steps);
            if (g_z) store_tile(tile, 2, g_z, b, dim, length, d0, block, t0, steps);
        }
        for (int64_t n = 0; n < nstate; ++n)
            for (int64_t j = 0; j < block; ++j) {
                g_h0[(b * dim + d0 + j) * nstate + n] = gh[n * BLOCK_MAX + j];
                g_a[(b * nstate + n) * dim + d0 + j] = ga_acc[n * BLOCK_MAX + j];
                if (b_shared) g_b[(b * nstate + n) * dim + d0 + j] = gb_acc[n * BLOCK_MAX + j];
                if (c_shared) g_c[(b * nstate + n) * dim + d0 + j] = gc_acc[n * BLOCK_MAX + j];
            }
        if (g_dskip)
            for (int64_t j = 0; j < block; ++j) g_dskip[b * dim + d0 + j] = gd_acc[j];
    }
    free(tile);
    free(hist);
    free(decay);
    free(work);
    return 0;
}
