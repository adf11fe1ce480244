/* CaliDrop's decode step for one layer (arXiv 2507.19906; kvrt/cache/methods/calidrop.py), one call: per
   query head ρ = cos(q, proxy) (per head, KV-head mean or layer minimum), the branch, the evicted
   tier's partial recomputed only for the heads with ρ < θ1 (keys beside values, so one pass gives
   the output and rule=taylor's mean key), the stored lse moved to first order toward q where a head
   reuses (taylor), and the calibration tier's (out, lse) with −inf where a head skips. The new state
   (proxy, partial, lse, mean key) and the branch counts go to fresh arrays: the caller's stay as they
   were, as the reference's where() leaves them.

   Reference twin: CalibrationTier.partial's ops path. */
#include "common.h"

#include <stdlib.h>

enum { BY_HEAD = 0, BY_KV_HEAD = 1, BY_LAYER = 2 };

typedef struct {
    const float *proxy, *lse, *mean_key; /* [B, Hq, D], [B, Hq], [B, Hq, D] (mean_key NULL: rule=paper) */
    const void *out;                     /* [B, Hq, D] in the model dtype (q's) */
    const void *pairs;                   /* evicted tier [B, Hkv, E, 2D]: each key beside its value, or NULL */
    int64_t p_b, p_h, p_t, extent;
    const int32_t *lengths; /* [B] evicted tokens row b holds, or NULL */
    const int32_t *active;  /* [B] 1 where the row has a partial (its branches are counted) */
    const int32_t *counts;  /* [B, 3]: calibrate, recompute, skip so far */
} calidrop_state;

typedef struct {
    float *proxy, *lse, *mean_key;
    void *out;
    int32_t *counts;
} calidrop_next;

int kvrt_calidrop(const void *q, int dtype, int64_t q_b, int64_t q_h, int B, int Hq, int Hkv, int D, float scale,
                  float theta1, float theta2, int granularity, const calidrop_state *in, calidrop_next *next,
                  void *out, float *lse, int threads) {
    const int G = Hq / Hkv, es = dtype_size(dtype);
    if (G > KVRT_MAX_ROWS || D > 256 || Hq % Hkv) return 1;
    float *rho = malloc(sizeof(float) * (size_t)B * Hq);
    if (!rho) return 1;
    for (int64_t b = 0; b < B; b++) {
        float row[256];
        for (int h = 0; h < Hq; h++) {
            load_row(row, (const char *)q + (b * q_b + h * q_h) * es, D, dtype);
            const float *p = in->proxy + (b * Hq + h) * D;
            const float norms = sqrtf(dot(row, row, D)) * sqrtf(dot(p, p, D));
            rho[b * Hq + h] = dot(row, p, D) / (norms + 1e-12f);
        }
        if (granularity == BY_KV_HEAD) {
            for (int h = 0; h < Hkv; h++) {
                float sum = 0.0f;
                for (int r = 0; r < G; r++) sum += rho[b * Hq + h * G + r];
                for (int r = 0; r < G; r++) rho[b * Hq + h * G + r] = sum / G;
            }
        } else if (granularity == BY_LAYER) {
            float low = INFINITY;
            for (int h = 0; h < Hq; h++) low = rho[b * Hq + h] < low ? rho[b * Hq + h] : low;
            for (int h = 0; h < Hq; h++) rho[b * Hq + h] = low;
        }
    }
    int32_t *tally = calloc((size_t)B * Hkv * 2, sizeof(int32_t)); /* per task: calibrated, recomputed */
    const int tasks = B * Hkv;
    int failed = !tally;
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1 && tasks > 1)
    for (int task = 0; task < tasks; task++) {
        if (failed) continue;
        const int64_t b = task / Hkv, kvh = task % Hkv;
        float *work = malloc(sizeof(float) * ((size_t)G * D * 3 + 4 * (size_t)D + (size_t)G * KVRT_BLOCK +
                                              (size_t)KVRT_BLOCK * 2 * D));
        if (!work) {
            failed = 1;
            continue;
        }
        float *qf = work, *acc = qf + (size_t)G * D, *fresh = acc + (size_t)G * 2 * D, *row = fresh + 2 * D;
        float *kbuf = row + D, *scores = kbuf + D, *vbuf = scores + (size_t)G * KVRT_BLOCK;
        int asks[KVRT_MAX_ROWS], n_ask = 0;
        for (int r = 0; r < G; r++) {
            const int64_t h = kvh * G + r;
            asks[r] = in->pairs != NULL && in->extent > 0 && rho[b * Hq + h] < theta1;
            if (asks[r]) load_row(qf + (size_t)n_ask++ * D, (const char *)q + (b * q_b + h * q_h) * es, D, dtype);
        }
        softmax_state st = {0};
        if (n_ask) { /* the recompute: keys are the pairs' first D channels, values the whole pairs */
            softmax_start(&st, n_ask, 2 * D, acc);
            int64_t n = in->extent;
            if (in->lengths && in->lengths[b] < n) n = in->lengths[b];
            dense_rows src = {(const char *)in->pairs + (b * in->p_b + kvh * in->p_h) * es,
                              (const char *)in->pairs + (b * in->p_b + kvh * in->p_h) * es,
                              in->p_t * es, in->p_t * es, dtype, D, 2 * D};
            attend_dense(&st, qf, scale, &src, (int)n, NULL, scores, kbuf, vbuf);
        }
        int asked = 0, calibrated = 0;
        for (int r = 0; r < G; r++) {
            const int64_t h = kvh * G + r, at = b * Hq + h;
            const char *q_row = (const char *)q + (b * q_b + h * q_h) * es;
            float part_lse;
            if (asks[r]) { /* the fresh partial becomes the state, q the new proxy */
                part_lse = softmax_finish(&st, asked++, fresh);
                round_row(fresh, 2 * D, dtype); /* the reference's partial comes back in q's dtype */
                store_row((char *)next->out + at * D * es, fresh + D, D, dtype);
                store_row((char *)out + at * D * es, fresh + D, D, dtype);
                load_row(next->proxy + at * D, q_row, D, dtype);
                if (next->mean_key) memcpy(next->mean_key + at * D, fresh, sizeof(float) * D);
                next->lse[at] = part_lse;
            } else { /* the stored partial, its lse moved toward q where taylor reuses it */
                memcpy((char *)next->out + at * D * es, (const char *)in->out + at * D * es, (size_t)D * es);
                memcpy((char *)out + at * D * es, (const char *)in->out + at * D * es, (size_t)D * es);
                memcpy(next->proxy + at * D, in->proxy + at * D, sizeof(float) * D);
                if (next->mean_key) memcpy(next->mean_key + at * D, in->mean_key + at * D, sizeof(float) * D);
                next->lse[at] = in->lse[at];
                part_lse = in->lse[at];
                const int reuses = rho[at] > theta2;
                if (reuses && in->mean_key) {
                    load_row(row, q_row, D, dtype);
                    const float *p = in->proxy + at * D, *k = in->mean_key + at * D;
                    float step = 0.0f;
                    for (int c = 0; c < D; c++) step += (row[c] - p[c]) * k[c];
                    part_lse += step * scale;
                }
                calibrated += reuses;
                if (!reuses) part_lse = -INFINITY; /* between the thresholds: no calibration */
            }
            lse[at] = part_lse;
        }
        tally[task * 2] = calibrated;
        tally[task * 2 + 1] = asked;
        free(work);
    }
    if (!failed) {
        for (int64_t b = 0; b < B; b++) {
            int32_t cal = 0, rec = 0;
            for (int h = 0; h < Hkv; h++) {
                cal += tally[(b * Hkv + h) * 2];
                rec += tally[(b * Hkv + h) * 2 + 1];
            }
            const int on = in->active[b] != 0;
            next->counts[b * 3] = in->counts[b * 3] + on * cal;
            next->counts[b * 3 + 1] = in->counts[b * 3 + 1] + on * rec;
            next->counts[b * 3 + 2] = in->counts[b * 3 + 2] + on * (Hq - cal - rec);
        }
    }
    free(tally);
    free(rho);
    return failed;
}
