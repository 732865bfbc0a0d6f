/* attnpatch's native ``lines`` kernel (kernels/lines_native.py): exact causal attention over a pattern of whole key
   columns and diagonals (VerticalSlash, Power) that computes each kept score once, on x86-64 CPUs with AVX2 + FMA.

   Per query head, rows in blocks of R: each run of kept offsets [a, b] (gaps under R merged, so runs' key ranges are
   disjoint within a block) is one contiguous key range [p_first - b, p_last - a] for the block, scored against its R
   rows (entries whose offset is not kept masked); a sparse run (few kept offsets for its range's width: the layout's
   DIAG_COST rule) is scored one key per row per offset instead (pairwise products); then the columns (gathered key
   rows) that no kept offset already covers for that row. One softmax per row over all its scores, then the values,
   chunk by chunk so a chunk's key / value rows stay in L1 for every row of the block. The torch kernels pay a block of
   64-256 rows per scattered diagonal (kernels/lines.py); here a run costs R - 1 extra keys per row. Work items (head,
   256 rows) are taken from a shared counter by every calling thread. Block-granular diagonals (Lines.block = T, MInference's
   GPU granularity): rows in blocks of T, every row of one keeping each run's whole range [P_first - b, P_last - a] over
   the T-block's first / last positions (runs merged at gaps up to T, so the ranges hold no hole), causal; the columns
   outside those ranges as before. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <immintrin.h>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "the native lines kernel needs AVX2 and FMA (x86-64)"
#endif

#ifndef R
#define R 8          /* query rows per block: a run of offsets costs R - 1 extra keys per row (8 vs 4: 5-10 % faster at 8K) */
#endif
#ifndef CHUNK
#define CHUNK 32     /* key rows per chunk: its K (or V) rows stay in L1 while every row of the block uses them */
#endif
#define NEG (-INFINITY)

static inline __m256 exp256(__m256 x) {
    /* e^x = 2^n * e^r, n = round(x log2 e), r = x - n ln2 (two-part ln2), Cephes' expf polynomial; -inf (and anything under
       e^-87) gives 0 */
    const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365447504f);
    __m256 isneg = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(isneg, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* the 8 sums of 8 accumulators, one per lane (a horizontal-add tree) */
static inline __m256 sum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
    __m256 t0 = _mm256_hadd_ps(a0, a1), t1 = _mm256_hadd_ps(a2, a3), t2 = _mm256_hadd_ps(a4, a5), t3 = _mm256_hadd_ps(a6, a7);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* 8 scores (q . k[0..7]) with q (D floats, D % 32 == 0) and key rows k[t] = k + t * D (natural layout): per 32 dims
   q in 4 registers, each key's 4 products into its own accumulator, reduced once at the end by a horizontal-add tree */
static inline __m256 dot8(const float *q, const float *k0, const float *k1, const float *k2, const float *k3,
                          const float *k4, const float *k5, const float *k6, const float *k7, int D) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int d = 0; d < D; d += 32) {
        __m256 x0 = _mm256_loadu_ps(q + d), x1 = _mm256_loadu_ps(q + d + 8), x2 = _mm256_loadu_ps(q + d + 16), x3 = _mm256_loadu_ps(q + d + 24);
#define DOT4(a, k) a = _mm256_fmadd_ps(x0, _mm256_loadu_ps(k + d), a); a = _mm256_fmadd_ps(x1, _mm256_loadu_ps(k + d + 8), a); \
                   a = _mm256_fmadd_ps(x2, _mm256_loadu_ps(k + d + 16), a); a = _mm256_fmadd_ps(x3, _mm256_loadu_ps(k + d + 24), a);
        DOT4(a0, k0) DOT4(a1, k1) DOT4(a2, k2) DOT4(a3, k3) DOT4(a4, k4) DOT4(a5, k5) DOT4(a6, k6) DOT4(a7, k7)
#undef DOT4
    }
    return sum8(a0, a1, a2, a3, a4, a5, a6, a7);
}

/* 8 scores (q_t . k_t, t = 0..7): eight rows against eight keys pairwise (a diagonal: row r of a block and key p0 + r - d) */
static inline __m256 dot8p(const float *const *q, const float *const *k, int D) {
    __m256 a[8];
    for (int t = 0; t < 8; t++) a[t] = _mm256_setzero_ps();
    for (int d = 0; d < D; d += 32)
        for (int t = 0; t < 8; t++) {
            a[t] = _mm256_fmadd_ps(_mm256_loadu_ps(q[t] + d), _mm256_loadu_ps(k[t] + d), a[t]);
            a[t] = _mm256_fmadd_ps(_mm256_loadu_ps(q[t] + d + 8), _mm256_loadu_ps(k[t] + d + 8), a[t]);
            a[t] = _mm256_fmadd_ps(_mm256_loadu_ps(q[t] + d + 16), _mm256_loadu_ps(k[t] + d + 16), a[t]);
            a[t] = _mm256_fmadd_ps(_mm256_loadu_ps(q[t] + d + 24), _mm256_loadu_ps(k[t] + d + 24), a[t]);
        }
    return sum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]);
}

/* scores of nr query rows (q: rows of D, pre-scaled) against n contiguous key rows k (natural layout) into s (row stride lds) */
static void qk(const float *q, int nr, const float *k, int D, int n, float *s, int lds) {
    for (int c = 0; c < n; c += CHUNK) {
        int ce = c + CHUNK < n ? c + CHUNK : n;
        for (int r = 0; r < nr; r++) {
            const float *qr = q + r * D;
            for (int x = c; x < ce; x += 8) {
                const float *kp[8];
                for (int t = 0; t < 8; t++) kp[t] = k + (int64_t)(x + t < n ? x + t : n - 1) * D;  /* tail: repeat the last key */
                __m256 v = dot8(qr, kp[0], kp[1], kp[2], kp[3], kp[4], kp[5], kp[6], kp[7], D);
                if (x + 8 <= n) _mm256_storeu_ps(s + r * lds + x, v);
                else { float t8[8]; _mm256_storeu_ps(t8, v); for (int t = 0; x + t < n; t++) s[r * lds + x + t] = t8[t]; }
            }
        }
    }
}

typedef struct {
    const float *q, *k, *v, *kc, *vc;         /* q (BH, Sq, D) unscaled; k, v (BG, Skv, D / Dv); kc, vc (BH, ldc, D / Dv) */
    float *out;                               /* (BH, Sq, Dv) */
    int BH, rep, Sq, Skv, D, Dv, off;         /* rep: query heads per KV head; off: position of query row 0 */
    float scale;
    int64_t ldc;                              /* column rows per head in kc / vc */
    const int32_t *run_ptr, *run_a, *run_b;   /* per head (CSR): runs [a, b] of kept offsets, ascending */
    const uint8_t *run_full;                  /* per run: every offset a .. b kept (no mask table read) */
    const int32_t *col_ptr, *cols;            /* per head (CSR): distinct columns, ascending */
    const int32_t *diag_ptr, *diags;          /* per head (CSR): offsets scored one key per row (sparse runs), ascending */
    const uint8_t *offbits;                   /* (BH, ldb): the head's kept offsets as bits (bit i of byte b: offset 8 b + i);
                                                 Skv / 8 bytes, so they stay in cache; 2 bytes of padding */
    int ldb;
    int rows_per_item, lds;                   /* rows per work item; floats per score row of the scratch */
    int *counter;                             /* next work item, shared by the threads */
    float *scratch;                           /* per thread: R * lds floats of scores, then 2 ints per run */
    int64_t scratch_per_thread;
    int T, tail0;                             /* T > 0: block-granular diagonals, call rows in blocks of T from row 0 (T a
                                                 multiple of R, or one block); tail0: first row of a shorter last block */
    const int32_t *tail_ptr, *tail_a, *tail_b; /* that block's runs (merged at its own length, see block_runs) */
} Args;

static void block(const Args *A, int bh, int i0, int nr, float *S, int32_t *tl) {
    int D = A->D, Dv = A->Dv, kv = bh / A->rep, lds = A->lds;
    const float *q = A->q + ((int64_t)bh * A->Sq + i0) * D;
    const float *kk = A->k + (int64_t)kv * A->Skv * D, *vv = A->v + (int64_t)kv * A->Skv * Dv;
    const uint8_t *ob = A->offbits + (int64_t)bh * A->ldb;
    float qs[R * 256];
    for (int r = 0; r < nr; r++) for (int d = 0; d < D; d++) qs[r * D + d] = q[r * D + d] * A->scale;
    int p0 = i0 + A->off, pl = p0 + nr - 1, n = 0, nt = 0;
    /* exact diagonals: a run [a, b] reaches keys p0 - b .. pl - a of this block. Block-granular ones (A->T): every row
       of the block of T rows holding this one keeps the run's whole range [P0 - b, P1 - a] (the runs were merged so
       that range has no hole), cut to the keys up to this block's last row; causality below */
    int P0 = p0, P1 = pl, gran = A->T;
    const int32_t *rptr = A->run_ptr, *ra = A->run_a, *rb = A->run_b;
    if (gran) {
        int b0 = i0 / gran * gran;
        P0 = b0 + A->off; P1 = (b0 + gran < A->Sq ? b0 + gran : A->Sq) - 1 + A->off;
        if (b0 >= A->tail0) { rptr = A->tail_ptr; ra = A->tail_a; rb = A->tail_b; }
    }
    for (int t = rptr[bh]; t < rptr[bh + 1]; t++) {
        int a = ra[t], b = rb[t];
        if (a > P1) break;  /* runs ascend: the rest start past the last row */
        int lo = P0 - b < 0 ? 0 : P0 - b, hi = (P1 - a < pl ? P1 - a : pl) + 1;
        if (lo >= hi) continue;  /* block-granular: a range past this block's rows (a later run's lies lower) */
        qk(qs, nr, kk + (int64_t)lo * D, D, hi - lo, S + n, lds);
        for (int r = 0; r < nr; r++) {
            float *s = S + r * lds + n - lo; int p = p0 + r;
            if (gran) {  /* the whole range, causal */
                for (int j = p + 1 > lo ? p + 1 : lo; j < hi; j++) s[j] = NEG;
            } else if (A->run_full[t]) {  /* row p keeps exactly keys p - b .. p - a of the range */
                for (int j = lo; j < p - b; j++) s[j] = NEG;
                for (int j = p - a + 1 > lo ? p - a + 1 : lo; j < hi; j++) s[j] = NEG;
            } else {
                for (int j = lo; j < hi; j++) { int d = p - j; if (d < 0 || !(ob[d >> 3] >> (d & 7) & 1)) s[j] = NEG; }
            }
        }
        tl[2 * nt] = lo; tl[2 * nt + 1] = hi; nt++; n += hi - lo;
    }
    /* lone offsets: one key per row each (a range would score R - 1 more per row), pairwise products of 8 rows */
    int nd = 0;
    const int32_t *dg = A->diags + A->diag_ptr[bh];
    while (A->diag_ptr[bh] + nd < A->diag_ptr[bh + 1] && dg[nd] <= pl) nd++;
    for (int x = 0; x < nd; x++) {
        const float *qp[8], *kp[8];
        for (int r = 0; r < 8; r++) {
            int rr = r < nr ? r : nr - 1, j = p0 + rr - dg[x];
            qp[r] = qs + rr * D; kp[r] = kk + (int64_t)(j < 0 ? 0 : j) * D;
        }
        float t8[8]; _mm256_storeu_ps(t8, dot8p(qp, kp, D));
        for (int r = 0; r < nr; r++) S[r * lds + n + x] = p0 + r - dg[x] >= 0 ? t8[r] : NEG;
    }
    /* columns up to the last row's position, each row's only where no kept offset of that row reaches it */
    int nc = 0;
    const int32_t *cols = A->cols + A->col_ptr[bh];
    while (A->col_ptr[bh] + nc < A->col_ptr[bh + 1] && cols[nc] <= pl) nc++;
    const float *kc = A->kc + (int64_t)bh * A->ldc * D, *vc = A->vc + (int64_t)bh * A->ldc * Dv;
    if (nc) {
        qk(qs, nr, kc, D, nc, S + n + nd, lds);
        /* a column's 8 rows have 8 consecutive offsets p0 - c .. p0 - c + 7: one 16-bit read of the head's offset bits
           (cache resident: Skv / 8 bytes) instead of a byte-table read per row and column */
        float *s = S + n + nd;
        if (gran) for (int x = 0, u = nt - 1; x < nc; x++) {  /* block-granular: a column a range holds is scored there */
            while (u >= 0 && tl[2 * u + 1] <= cols[x]) u--;  /* ranges descend in keys as t ascends: skip those below */
            int in = u >= 0 && tl[2 * u] <= cols[x];
            for (int r = 0; r < nr; r++) if (in || p0 + r < cols[x]) s[r * lds + x] = NEG;
        }
        else for (int x = 0; x < nc; x++) {
            int d0 = p0 - cols[x];  /* >= -(R - 1): only columns up to the block's last row are here */
            unsigned m;
            if (d0 >= 0) m = ((unsigned)ob[d0 >> 3] | (unsigned)ob[(d0 >> 3) + 1] << 8) >> (d0 & 7);
            else m = (((unsigned)ob[0] | (unsigned)ob[1] << 8) << -d0) | ((1u << -d0) - 1);  /* rows before the column */
            for (int r = 0; r < nr; r++) if (m >> r & 1) s[r * lds + x] = NEG;
        }
    }
    int ntot = n + nd + nc;
    float inv[R];
    for (int r = 0; r < nr; r++) {  /* softmax numerators in place; rows with no key keep 0 weights */
        float *s = S + r * lds;
        __m256 m8 = _mm256_set1_ps(NEG);
        int x = 0;
        for (; x + 8 <= ntot; x += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + x));
        float tmp[8], mx = NEG; _mm256_storeu_ps(tmp, m8); for (int u = 0; u < 8; u++) mx = tmp[u] > mx ? tmp[u] : mx;
        for (; x < ntot; x++) mx = s[x] > mx ? s[x] : mx;
        if (mx == NEG) { inv[r] = 0.f; for (x = 0; x < ntot; x++) s[x] = 0.f; continue; }
        m8 = _mm256_set1_ps(mx);
        __m256 sum8 = _mm256_setzero_ps();
        for (x = 0; x + 8 <= ntot; x += 8) { __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + x), m8)); _mm256_storeu_ps(s + x, e); sum8 = _mm256_add_ps(sum8, e); }
        float sum = 0.f; _mm256_storeu_ps(tmp, sum8); for (int u = 0; u < 8; u++) sum += tmp[u];
        for (; x < ntot; x++) { s[x] = s[x] == NEG ? 0.f : expf(s[x] - mx); sum += s[x]; }
        inv[r] = 1.f / sum;
    }
    /* PV: per chunk of a segment's value rows (in L1), every row of the block; accumulators kept in out between chunks */
    for (int d0 = 0; d0 < Dv; d0 += 64) {
        for (int r = 0; r < nr; r++) { float *o = A->out + ((int64_t)bh * A->Sq + i0 + r) * Dv + d0; memset(o, 0, 64 * sizeof(float)); }
        int base = 0;
        for (int t = 0; t <= nt; t++) {
            if (t == nt && nd) {  /* the lone offsets (after the ranges, before the columns): each row its own value rows */
                for (int r = 0; r < nr; r++) {
                    float *o = A->out + ((int64_t)bh * A->Sq + i0 + r) * Dv + d0;
                    const float *sw = S + r * lds + base;
                    __m256 c[8];
                    for (int u = 0; u < 8; u++) c[u] = _mm256_loadu_ps(o + 8 * u);
                    for (int x = 0; x < nd; x++) {
                        float w = sw[x]; if (w == 0.f) continue;
                        __m256 wb = _mm256_set1_ps(w); const float *vj = vv + (int64_t)(p0 + r - dg[x]) * Dv + d0;
                        for (int u = 0; u < 8; u++) c[u] = _mm256_fmadd_ps(wb, _mm256_loadu_ps(vj + 8 * u), c[u]);
                    }
                    for (int u = 0; u < 8; u++) _mm256_storeu_ps(o + 8 * u, c[u]);
                }
                base += nd;
            }
            int len = t < nt ? tl[2 * t + 1] - tl[2 * t] : nc;
            const float *vs = t < nt ? vv + (int64_t)tl[2 * t] * Dv : vc;
            for (int c = 0; c < len; c += CHUNK) {
                int ce = c + CHUNK < len ? c + CHUNK : len;
                for (int r = 0; r < nr; r++) {
                    float *o = A->out + ((int64_t)bh * A->Sq + i0 + r) * Dv + d0;
                    const float *sw = S + r * lds + base;
                    __m256 c0 = _mm256_loadu_ps(o), c1 = _mm256_loadu_ps(o + 8), c2 = _mm256_loadu_ps(o + 16), c3 = _mm256_loadu_ps(o + 24),
                           c4 = _mm256_loadu_ps(o + 32), c5 = _mm256_loadu_ps(o + 40), c6 = _mm256_loadu_ps(o + 48), c7 = _mm256_loadu_ps(o + 56);
                    for (int x = c; x < ce; x++) {
                        float w = sw[x]; if (w == 0.f) continue;
                        __m256 wb = _mm256_set1_ps(w); const float *vj = vs + (int64_t)x * Dv + d0;
                        c0 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(vj), c0); c1 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(vj + 8), c1);
                        c2 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(vj + 16), c2); c3 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(vj + 24), c3);
                        c4 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(vj + 32), c4); c5 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(vj + 40), c5);
                        c6 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(vj + 48), c6); c7 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(vj + 56), c7);
                    }
                    _mm256_storeu_ps(o, c0); _mm256_storeu_ps(o + 8, c1); _mm256_storeu_ps(o + 16, c2); _mm256_storeu_ps(o + 24, c3);
                    _mm256_storeu_ps(o + 32, c4); _mm256_storeu_ps(o + 40, c5); _mm256_storeu_ps(o + 48, c6); _mm256_storeu_ps(o + 56, c7);
                }
            }
            base += len;
        }
        for (int r = 0; r < nr; r++) {
            float *o = A->out + ((int64_t)bh * A->Sq + i0 + r) * Dv + d0; __m256 iv = _mm256_set1_ps(inv[r]);
            for (int u = 0; u < 64; u += 8) _mm256_storeu_ps(o + u, _mm256_mul_ps(_mm256_loadu_ps(o + u), iv));
        }
    }
}

void run(const Args *A, int thread) {
    int per = (A->Sq + A->rows_per_item - 1) / A->rows_per_item, items = A->BH * per;
    float *S = A->scratch + thread * A->scratch_per_thread;
    int32_t *tl = (int32_t *)(S + R * A->lds);
    for (;;) {
        int it = __atomic_fetch_add(A->counter, 1, __ATOMIC_RELAXED);
        if (it >= items) break;
        int bh = it % A->BH, c = it / A->BH;
        int r0 = c * A->rows_per_item, r1 = r0 + A->rows_per_item < A->Sq ? r0 + A->rows_per_item : A->Sq;
        for (int i = r0; i < r1; i += R) block(A, bh, i, r1 - i < R ? r1 - i : R, S, tl);
    }
}
