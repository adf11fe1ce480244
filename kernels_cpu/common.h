/* Shared pieces of kvrt's CPU kernels: element types, a vectorizable exp, and the online softmax
   that every tier's keys stream through (the same (out, lse) merge as kvrt/cache/attention.py, one
   block of keys at a time). Written so that gcc/clang -O3 vectorize the loops over channels. */
#ifndef KVRT_CPU_COMMON_H
#define KVRT_CPU_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

enum { KVRT_F32 = 0, KVRT_BF16 = 1, KVRT_F16 = 2 };
#define KVRT_BLOCK 64 /* keys scored at once: the scores and dequantized rows stay in L1 */
#define KVRT_MAX_ROWS 64 /* query heads per KV head (GQA group) a task holds */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch rounds */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* n elements of `dtype` at src[0..n) as float32 */
static inline void load_row(float *restrict dst, const void *src, int n, int dtype) {
    if (dtype == KVRT_F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (dtype == KVRT_BF16) {
        const uint16_t *s = (const uint16_t *)src;
        for (int i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        const _Float16 *s = (const _Float16 *)src;
        for (int i = 0; i < n; i++) dst[i] = (float)s[i];
    }
}

/* float32 row stored as `dtype` */
static inline void store_row(void *dst, const float *restrict src, int n, int dtype) {
    if (dtype == KVRT_F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (dtype == KVRT_BF16) {
        uint16_t *d = (uint16_t *)dst;
        for (int i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]);
    } else {
        _Float16 *d = (_Float16 *)dst;
        for (int i = 0; i < n; i++) d[i] = (_Float16)src[i];
    }
}

/* round float32 values to `dtype` and back, as a tensor cast to the model dtype would */
static inline void round_row(float *restrict x, int n, int dtype) {
    if (dtype == KVRT_BF16) {
        for (int i = 0; i < n; i++) x[i] = bf16_to_f32(f32_to_bf16(x[i]));
    } else if (dtype == KVRT_F16) {
        for (int i = 0; i < n; i++) x[i] = (float)(_Float16)x[i];
    }
}

static inline int dtype_size(int dtype) { return dtype == KVRT_F32 ? 4 : 2; }

/* Eight floats in one vector (GCC/clang vector extensions: AVX on x86, NEON pairs on ARM, plain
   code elsewhere), for the loops the compiler will not vectorize on its own. */
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));

static inline vf8 load8(const float *p) {
    vf8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, vf8 v) { memcpy(p, &v, sizeof v); }

static inline float sum8(vf8 v) { return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7])); }

/* exp(x) to about 1 ulp for x <= 88 (Cephes' polynomial on x − n·ln 2, |x − n·ln 2| <= ln 2 / 2),
   exactly 0 below −87.3 and at −inf. libm's expf does not vectorize without -ffast-math, which would
   also break the −inf arithmetic hidden keys rely on; and gcc will not if-convert the clamp itself. */
static inline vf8 exp8(vf8 x) {
    const vi8 below = x < -87.3f;
    const vf8 t = (vf8)(((vi8)x & ~below) | ((vi8)(x * 0.0f - 87.3f) & below)); /* -inf * 0 is nan: masked */
    const vf8 scaled = t * 1.44269504088896341f;
    const vf8 half = (vf8)(((vi8)scaled & (int32_t)0x80000000) | (vi8)(t * 0.0f + 0.5f)); /* ±0.5: round */
    const vi8 n = __builtin_convertvector(scaled + half, vi8);
    const vf8 nf = __builtin_convertvector(n, vf8);
    const vf8 r = t - nf * 0.693359375f + nf * 2.12194440e-4f;
    vf8 p = r * 0.0f + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const vf8 y = p * (vf8)((n + 127) << 23); /* 2^n, built in the exponent bits */
    return (vf8)((vi8)y & ~below);
}

static inline float exp_approx(float x) {
    vf8 v = {x, x, x, x, x, x, x, x};
    return exp8(v)[0];
}

static inline float dot(const float *restrict a, const float *restrict b, int n) {
    vf8 acc0 = {0}, acc1 = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 += load8(a + i) * load8(b + i);
        acc1 += load8(a + i + 8) * load8(b + i + 8);
    }
    for (; i + 8 <= n; i += 8) acc0 += load8(a + i) * load8(b + i);
    float s = sum8(acc0 + acc1);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* One task's softmax state: R query rows, each with its running max m, sum l and output acc [R, Dv]. */
typedef struct {
    int rows, dv;
    float m[KVRT_MAX_ROWS], l[KVRT_MAX_ROWS];
    float *acc; /* [rows, dv] */
} softmax_state;

static inline void softmax_start(softmax_state *st, int rows, int dv, float *acc) {
    st->rows = rows;
    st->dv = dv;
    st->acc = acc;
    for (int r = 0; r < rows; r++) {
        st->m[r] = -INFINITY;
        st->l[r] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * (size_t)rows * dv);
}

/* Turn one block's scores [rows, KVRT_BLOCK] (n keys, −inf hides one) into weights in place: per row
   the new running max, the earlier sum and output scaled down to it, p = exp(s − m) (0 for a hidden
   key, and for every key of a row whose block is all hidden), rounded to `p_dtype` as the reference's
   probs.to(v.dtype) rounds, and the sum updated. The caller then adds Σ p·v to st->acc. */
static inline void softmax_weigh(softmax_state *st, float *restrict scores, int n, int p_dtype) {
    for (int r = 0; r < st->rows; r++) {
        float *restrict s = scores + r * KVRT_BLOCK;
        float top = -INFINITY;
#pragma omp simd reduction(max : top)
        for (int j = 0; j < n; j++) top = s[j] > top ? s[j] : top;
        if (top == -INFINITY) {
            memset(s, 0, sizeof(float) * n);
            continue;
        }
        const float m_new = top > st->m[r] ? top : st->m[r];
        const float correction = st->m[r] == -INFINITY ? 0.0f : exp_approx(st->m[r] - m_new);
        vf8 total = {0};
        int j = 0;
        for (; j + 8 <= n; j += 8) {
            const vf8 p = exp8(load8(s + j) - m_new);
            store8(s + j, p);
            total += p;
        }
        float sum = sum8(total);
        for (; j < n; j++) {
            s[j] = exp_approx(s[j] - m_new);
            sum += s[j];
        }
        round_row(s, n, p_dtype);
        if (correction != 1.0f) {
            float *restrict acc = st->acc + (size_t)r * st->dv;
            for (int d = 0; d < st->dv; d++) acc[d] *= correction;
        }
        st->l[r] = st->l[r] * correction + sum;
        st->m[r] = m_new;
    }
}

/* st->acc += Σ_j p[r][j] · values[j] for the block's weights p [rows, KVRT_BLOCK] (softmax_weigh): per
   row, 64 channels at a time held in eight vector registers over the block's keys. */
static inline void accumulate_values(softmax_state *st, const float *restrict p, const float *const *values, int n) {
    const int dv = st->dv;
    for (int r = 0; r < st->rows; r++) {
        const float *restrict w = p + r * KVRT_BLOCK;
        float *restrict acc = st->acc + (size_t)r * dv;
        int c0 = 0;
        for (; c0 + 64 <= dv; c0 += 64) {
            vf8 a[8];
            for (int k = 0; k < 8; k++) a[k] = load8(acc + c0 + 8 * k);
            for (int j = 0; j < n; j++) {
                const float *v = values[j] + c0;
                for (int k = 0; k < 8; k++) a[k] += w[j] * load8(v + 8 * k);
            }
            for (int k = 0; k < 8; k++) store8(acc + c0 + 8 * k, a[k]);
        }
        for (int j = 0; j < n && c0 < dv; j++)
            for (int c = c0; c < dv; c++) acc[c] += w[j] * values[j][c];
    }
}

/* The state's (out row r [dv], lse r): a row that saw no key gets out 0 and lse −inf. */
static inline float softmax_finish(const softmax_state *st, int r, float *restrict out) {
    const float *acc = st->acc + (size_t)r * st->dv;
    if (st->l[r] == 0.0f) {
        memset(out, 0, sizeof(float) * st->dv);
        return -INFINITY;
    }
    const float inv = 1.0f / st->l[r];
    for (int d = 0; d < st->dv; d++) out[d] = acc[d] * inv;
    return st->m[r] + logf(st->l[r]);
}

/* Merge partial (b_out, b_lse) into (a_out, a_lse) over disjoint keys, as merge_partials does. */
static inline float merge_into(float *restrict a_out, float a_lse, const float *restrict b_out, float b_lse, int n) {
    float hi = a_lse > b_lse ? a_lse : b_lse;
    if (hi == -INFINITY) {
        memset(a_out, 0, sizeof(float) * n);
        return -INFINITY;
    }
    float wa = expf(a_lse - hi), wb = expf(b_lse - hi);
    float total = hi + logf(wa + wb);
    wa = expf(a_lse - total);
    wb = expf(b_lse - total);
    for (int d = 0; d < n; d++) a_out[d] = wa * a_out[d] + wb * b_out[d];
    return total;
}

/* Dense keys/values of one (batch row, KV head): token t's key at k + t*k_t, value at v + t*v_t
   (elements of `dtype`, channels contiguous). */
typedef struct {
    const char *k, *v;
    int64_t k_t, v_t; /* bytes between tokens */
    int dtype, d, dv;
} dense_rows;

/* Stream tokens [0, n) of a dense source through the state, query rows q [rows, d] (float32, already
   scaled by nothing: scores = q·k · scale + bias). bias: float32 [n] or NULL. */
static inline void attend_dense(softmax_state *st, const float *q, float scale, const dense_rows *src, int n,
                                const float *bias, float *scores, float *kbuf, float *vbuf) {
    const int d = src->d, dv = src->dv, rows = st->rows;
    const float *values[KVRT_BLOCK];
    for (int n0 = 0; n0 < n; n0 += KVRT_BLOCK) {
        const int nb = n - n0 < KVRT_BLOCK ? n - n0 : KVRT_BLOCK;
        for (int j = 0; j < nb; j++) {
            const char *kp = src->k + (int64_t)(n0 + j) * src->k_t;
            const float *key = (const float *)kp;
            if (src->dtype != KVRT_F32) {
                load_row(kbuf, kp, d, src->dtype);
                key = kbuf;
            }
            for (int r = 0; r < rows; r++) scores[r * KVRT_BLOCK + j] = dot(q + (size_t)r * d, key, d) * scale;
            const char *vp = src->v + (int64_t)(n0 + j) * src->v_t;
            if (src->dtype == KVRT_F32) {
                values[j] = (const float *)vp;
            } else {
                load_row(vbuf + (size_t)j * dv, vp, dv, src->dtype);
                values[j] = vbuf + (size_t)j * dv;
            }
        }
        if (bias)
            for (int r = 0; r < rows; r++)
                for (int j = 0; j < nb; j++) scores[r * KVRT_BLOCK + j] += bias[n0 + j];
        softmax_weigh(st, scores, nb, src->dtype);
        accumulate_values(st, scores, values, nb);
    }
}

#endif
