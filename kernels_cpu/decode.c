/* Decode attention over a layer's tiers in one pass: (out, lse) of one query per query head over
   every tier's keys (full-precision tiers as stored, the packed 2/4/8-bit tier read from its words,
   scales and zeros; OTT's traced slots hidden), merged with extra partials (CaliDrop's), exactly the
   log-sum-exp merge of kvrt/cache/attention.py. One task per (batch row, KV head) holds that head's G query
   rows (GQA: each key is read once); a row's padding past its length is never read.

   Reference twin: merge_partials over each tier's partial (LayerCache's per-tier path). */
#include "common.h"

#include <stdlib.h>

typedef struct {
    int32_t packed; /* 0: dense k/v; 1: the packed format of kvrt/cache/quant.py */
    int32_t bits, group, vgroup, n_slots, dtype; /* dtype: of dense k/v, or of packed scales/zeros */
    int64_t extent;                              /* S: tokens the arrays span (per row, before lengths) */
    const int32_t *lengths;                      /* [B]: tokens row b holds (<= S), or NULL */
    const float *bias;                           /* [B, Hkv, S] token-contiguous, or NULL */
    int64_t bias_b, bias_h;
    /* dense: k, v [B, Hkv, S, D]; packed: key words [B, Hkv, S/P, D], value words [B, Hkv, S, D/P] */
    const void *k, *v;
    int64_t k_b, k_h, k_t, v_b, v_h, v_t;
    /* packed: key scale/zero [B, Hkv, S/G, D], value scale/zero [B, Hkv, S, D/gv] */
    const void *ks, *kz;
    int64_t ks_b, ks_h, ks_g;
    const void *vs, *vz;
    int64_t vs_b, vs_h, vs_t;
    const int32_t *slots; /* OTT: [B, Hkv, S/G, O] slots hidden per group (-1: none), or NULL */
    int64_t sl_b, sl_h, sl_g;
} kvrt_segment;

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* The codes of one int32 word as floats: code i sits at bits [i·bits, (i+1)·bits). `bits` is a
   constant where this inlines, so the loop over the word's codes vectorizes. */
ALWAYS_INLINE void word_codes(float *restrict codes, uint32_t word, const int bits) {
    const int per = 32 / bits;
    const uint32_t mask = (1u << bits) - 1u;
    for (int i = 0; i < per; i++) codes[i] = (float)((word >> (i * bits)) & mask);
}

typedef uint32_t vu8 __attribute__((vector_size(32)));

/* Codes first..first+7 of one int32 word (`bits` wide each, a constant where this inlines) as floats. */
ALWAYS_INLINE vf8 codes8(uint32_t word, int first, const int bits) {
    const vu8 lanes = {0, 1, 2, 3, 4, 5, 6, 7};
    const vu8 shifts = (lanes + (uint32_t)first) * (uint32_t)bits;
    const vu8 broadcast = (vu8){0, 0, 0, 0, 0, 0, 0, 0} + word;
    return __builtin_convertvector((vi8)((broadcast >> shifts) & ((1u << bits) - 1u)), vf8);
}

/* Scores of the query rows for nw word rows of packed 2/4-bit keys (per·nw tokens of one group), from
   a scale and zero of float32: q·(code·s + z) = (q∘s)·code + q·z, so each word's codes are decoded once
   for four rows at a time and the dot runs over the word's tokens in vector lanes (no horizontal sum).
   qs [rows rounded up to 4, D] = q∘s (zero rows pad), qz [rows] = q·z of the group. */
ALWAYS_INLINE void packed_key_scores(float *restrict scores, const float *restrict qs, const float *restrict qz,
                                     const int32_t *words, int64_t word_stride, int nw, int d, int rows,
                                     float scale, const int bits) {
    const int per = 32 / bits; /* 16 or 8: one or two vectors of tokens */
    for (int w = 0; w < nw; w++) {
        const uint32_t *row = (const uint32_t *)(words + w * word_stride);
        for (int r0 = 0; r0 < rows; r0 += 4) {
            vf8 lo[4] = {{0}}, hi[4] = {{0}};
            for (int c = 0; c < d; c++) {
                const vf8 low = codes8(row[c], 0, bits);
                const vf8 high = per == 16 ? codes8(row[c], 8, bits) : low;
                for (int r = 0; r < 4; r++) {
                    const float a = qs[(size_t)(r0 + r) * d + c];
                    lo[r] += a * low;
                    if (per == 16) hi[r] += a * high;
                }
            }
            for (int r = 0; r < 4 && r0 + r < rows; r++) {
                float *out = scores + (r0 + r) * KVRT_BLOCK + w * per;
                store8(out, (lo[r] + qz[r0 + r]) * scale);
                if (per == 16) store8(out + 8, (hi[r] + qz[r0 + r]) * scale);
            }
        }
    }
}

/* Dequantize nw word rows of packed keys into rows kf [per·nw, D], as kvrt.cache.quant.dequantize_keys
   computes them (float32, then rounded to the scales' dtype): the exact path for 16-bit scales. */
ALWAYS_INLINE void dequantize_keys(float *restrict kf, const int32_t *words, int64_t word_stride, int nw,
                                   const float *restrict s, const float *restrict z, int d, int dtype,
                                   float *restrict codes, const int bits) {
    const int per = 32 / bits;
    for (int w = 0; w < nw; w++) {
        const int32_t *row = words + w * word_stride;
        for (int c = 0; c < d; c++) word_codes(codes + c * per, (uint32_t)row[c], bits);
        for (int i = 0; i < per; i++) {
            float *restrict out = kf + (size_t)(w * per + i) * d;
            for (int c = 0; c < d; c++) out[c] = codes[c * per + i] * s[c] + z[c];
            round_row(out, d, dtype);
        }
    }
}

/* Dequantize one token's packed value row into vf [D], as kvrt.cache.quant.dequantize_values does. */
ALWAYS_INLINE void dequantize_value(float *restrict vf, const int32_t *words, const float *restrict s,
                                    const float *restrict z, int d, int gv, int dtype, const int bits) {
    const int per = 32 / bits;
    for (int w = 0; w < d / per; w++) {
        float *restrict out = vf + w * per;
        if (bits < 8 && gv % per == 0) { /* the word's channels share one scale and zero: vector lanes */
            const float sc = s[w * per / gv], zz = z[w * per / gv];
            store8(out, codes8((uint32_t)words[w], 0, bits) * sc + zz);
            if (per == 16) store8(out + 8, codes8((uint32_t)words[w], 8, bits) * sc + zz);
        } else {
            float codes[16];
            word_codes(codes, (uint32_t)words[w], bits);
            for (int i = 0; i < per; i++) out[i] = codes[i] * s[(w * per + i) / gv] + z[(w * per + i) / gv];
        }
    }
    round_row(vf, d, dtype);
}

/* Stream the n packed tokens of (row b, KV head h) through the state, a block of up to KVRT_BLOCK
   tokens of one group at a time. `bits` is a constant where this inlines (attend_packed below). */
ALWAYS_INLINE void attend_packed_bits(softmax_state *st, const float *q, float scale, const kvrt_segment *sg,
                                      int64_t b, int64_t h, int n, int d, float *scores, float *kf, float *vf,
                                      float *qs, const int bits) {
    const int es = dtype_size(sg->dtype), rows = st->rows, per = 32 / bits, gv = sg->vgroup;
    const int32_t *kwords = (const int32_t *)sg->k + b * sg->k_b + h * sg->k_h;
    const int32_t *vwords = (const int32_t *)sg->v + b * sg->v_b + h * sg->v_h;
    const char *ks = (const char *)sg->ks + (b * sg->ks_b + h * sg->ks_h) * es;
    const char *kz = (const char *)sg->kz + (b * sg->ks_b + h * sg->ks_h) * es;
    const char *vs = (const char *)sg->vs + (b * sg->vs_b + h * sg->vs_h) * es;
    const char *vz = (const char *)sg->vz + (b * sg->vs_b + h * sg->vs_h) * es;
    const float *bias = sg->bias ? sg->bias + b * sg->bias_b + h * sg->bias_h : NULL;
    const int32_t *slots = sg->slots ? sg->slots + b * sg->sl_b + h * sg->sl_h : NULL;
    const float *values[KVRT_BLOCK];
    float s[256], z[256], qz[KVRT_MAX_ROWS], codes[256 * 16];
    const int fast = bits < 8 && sg->dtype == KVRT_F32; /* the factored scores: float32 scales, 2 or 4 bits */
    const int block = sg->group < KVRT_BLOCK ? sg->group : KVRT_BLOCK; /* a multiple of per: whole words */
    int64_t group = -1;
    for (int64_t t0 = 0; t0 < n; t0 += block) {
        const int nb = n - t0 < block ? (int)(n - t0) : block;
        const int64_t g = t0 / sg->group;
        if (g != group) { /* a new group: its key scale and zero, and the rows' products with them */
            group = g;
            load_row(s, ks + g * sg->ks_g * es, d, sg->dtype);
            load_row(z, kz + g * sg->ks_g * es, d, sg->dtype);
            for (int r = 0; r < rows; r++) {
                for (int c = 0; c < d; c++) qs[(size_t)r * d + c] = q[(size_t)r * d + c] * s[c];
                qz[r] = dot(q + (size_t)r * d, z, d);
            }
            memset(qs + (size_t)rows * d, 0, sizeof(float) * (size_t)((4 - rows % 4) % 4) * d); /* pad rows */
        }
        const int32_t *words = kwords + (t0 / per) * sg->k_t;
        if (fast) {
            packed_key_scores(scores, qs, qz, words, sg->k_t, nb / per, d, rows, scale, bits);
        } else {
            dequantize_keys(kf, words, sg->k_t, nb / per, s, z, d, sg->dtype, codes, bits);
            for (int j = 0; j < nb; j++)
                for (int r = 0; r < rows; r++)
                    scores[r * KVRT_BLOCK + j] = dot(q + (size_t)r * d, kf + (size_t)j * d, d) * scale;
        }
        if (bias)
            for (int r = 0; r < rows; r++)
                for (int j = 0; j < nb; j++) scores[r * KVRT_BLOCK + j] += bias[t0 + j];
        if (slots) { /* OTT: a traced token is read from its pool, never from its group slot */
            const int64_t first = t0 - g * sg->group;
            for (int o = 0; o < sg->n_slots; o++) {
                const int64_t slot = slots[g * sg->sl_g + o] - first;
                if (slot >= 0 && slot < nb)
                    for (int r = 0; r < rows; r++) scores[r * KVRT_BLOCK + slot] = -INFINITY;
            }
        }
        softmax_weigh(st, scores, nb, sg->dtype);
        for (int j = 0; j < nb; j++) {
            const int64_t t = t0 + j;
            float vs_row[256], vz_row[256];
            load_row(vs_row, vs + t * sg->vs_t * es, d / gv, sg->dtype);
            load_row(vz_row, vz + t * sg->vs_t * es, d / gv, sg->dtype);
            dequantize_value(vf + (size_t)j * d, vwords + t * sg->v_t, vs_row, vz_row, d, gv, sg->dtype, bits);
            values[j] = vf + (size_t)j * d;
        }
        accumulate_values(st, scores, values, nb);
    }
}

static void attend_packed(softmax_state *st, const float *q, float scale, const kvrt_segment *sg, int64_t b,
                          int64_t h, int n, int d, float *scores, float *kf, float *vf, float *qs) {
    switch (sg->bits) { /* one specialization per width: the codes of a word unpack in one vector */
        case 2: attend_packed_bits(st, q, scale, sg, b, h, n, d, scores, kf, vf, qs, 2); break;
        case 4: attend_packed_bits(st, q, scale, sg, b, h, n, d, scores, kf, vf, qs, 4); break;
        default: attend_packed_bits(st, q, scale, sg, b, h, n, d, scores, kf, vf, qs, 8); break;
    }
}

/* out [B, Hq, DV] (q's dtype, rows at out + b*out_b + h*out_h) and lse [B, Hq] of q [B, Hq, D] over the
   segments, merged with the extra partial (x_out [B, Hq, DV] of x_dtype, x_lse [B, Hq]) when given.
   DV: the values' width, D but for CaliDrop's pairs (keys beside values: 2D); packed segments need D. */
int kvrt_decode(const void *q, int q_dtype, int64_t q_b, int64_t q_h, int B, int Hq, int Hkv, int D, int DV,
                float scale, const kvrt_segment *segs, int nseg, const void *x_out, int x_dtype, int64_t x_b,
                int64_t x_h, const float *x_lse, void *out, int64_t out_b, int64_t out_h, float *lse, int threads) {
    const int G = Hq / Hkv;
    if (G > KVRT_MAX_ROWS || D > 256 || DV > 512 || Hq % Hkv) return 1;
    for (int i = 0; i < nseg; i++)
        if (segs[i].packed && DV != D) return 1;
    const int tasks = B * Hkv, wide = DV > D ? DV : D;
    int failed = 0;
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1 && tasks > 1)
    for (int task = 0; task < tasks; task++) {
        const int64_t b = task / Hkv, h = task % Hkv;
        float *work = malloc(sizeof(float) * ((size_t)G * (D + DV) + DV + (size_t)(G + 3) * D +
                                              (size_t)G * KVRT_BLOCK + 3 * (size_t)KVRT_BLOCK * wide));
        if (!work) {
            failed = 1;
            continue;
        }
        float *qf = work, *acc = qf + (size_t)G * D, *row = acc + (size_t)G * DV, *qs = row + DV;
        float *scores = qs + (size_t)(G + 3) * D, *kf = scores + (size_t)G * KVRT_BLOCK;
        float *vf = kf + (size_t)KVRT_BLOCK * wide, *kbuf = vf + (size_t)KVRT_BLOCK * wide;
        const int q_size = dtype_size(q_dtype), x_size = dtype_size(x_dtype);
        for (int r = 0; r < G; r++)
            load_row(qf + (size_t)r * D, (const char *)q + (b * q_b + (h * G + r) * q_h) * q_size, D, q_dtype);
        softmax_state st;
        softmax_start(&st, G, DV, acc);
        for (int i = 0; i < nseg; i++) {
            const kvrt_segment *sg = &segs[i];
            int64_t n = sg->extent;
            if (sg->lengths && sg->lengths[b] < n) n = sg->lengths[b];
            if (n <= 0) continue;
            if (sg->packed) {
                attend_packed(&st, qf, scale, sg, b, h, (int)n, D, scores, kf, vf, qs);
            } else {
                const int es = dtype_size(sg->dtype);
                dense_rows src = {(const char *)sg->k + (b * sg->k_b + h * sg->k_h) * es,
                                  (const char *)sg->v + (b * sg->v_b + h * sg->v_h) * es,
                                  sg->k_t * es, sg->v_t * es, sg->dtype, D, DV};
                const float *bias = sg->bias ? sg->bias + b * sg->bias_b + h * sg->bias_h : NULL;
                attend_dense(&st, qf, scale, &src, (int)n, bias, scores, kbuf, vf);
            }
        }
        for (int r = 0; r < G; r++) {
            const int64_t hq = h * G + r;
            float l = softmax_finish(&st, r, row);
            if (x_lse) {
                load_row(kbuf, (const char *)x_out + (b * x_b + hq * x_h) * x_size, DV, x_dtype);
                l = merge_into(row, l, kbuf, x_lse[b * Hq + hq], DV);
            }
            store_row((char *)out + (b * out_b + hq * out_h) * q_size, row, DV, q_dtype);
            lse[b * Hq + hq] = l;
        }
        free(work);
    }
    return failed;
}
