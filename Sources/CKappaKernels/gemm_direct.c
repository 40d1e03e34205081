// Matrix products in Float32 for CPUs with AVX-512: see include/kappa_kernels.h.
//
// Why not OpenBLAS: on the products a ViT or a DINO head makes (K and N of 64 to 1024, M of
// a few hundred to tens of thousands of tokens) OpenBLAS 0.3.21 spends a fifth of its time
// outside its kernel: it copies both operands into packed panels on every call and clears C
// before accumulating into it when beta = 0 (and Kappa's linear layer first wrote the bias
// into C, a pass of its own). Here B is packed, once per call when it fits 1 MB (for a linear
// layer's forward and input gradient B is the weight); A is read where it lies, a micro-panel
// of 12 rows staying in L1 while it meets every packed panel of B (a transposed A is copied,
// a block of rows at a time, when that helps: see pack_a_block); C is written once, with the
// bias and beta·C added as it is stored.
//
// The micro-kernel keeps a 12 × 32 block of C in 24 registers: per step of k it loads 32
// values of B (two vectors), broadcasts the 12 values of A and issues 24 fused multiply-adds.
// Each element of C is the sum over k in increasing order, one fused multiply-add per term,
// within a block of at most KAPPA_GEMM_KC terms; blocks are added to C in order. The result
// depends on the shapes only, not on how rows or columns are split over threads.
#include "kappa_kernels.h"

#if defined(__x86_64__) && defined(__clang__)
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define KAPPA_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
#define KAPPA_INLINE __attribute__((always_inline)) static inline

// Rows and columns of the register block.
#define MR 12
#define NR 32
// The longest run of k summed in registers, and the most values of B packed at once.
#define KAPPA_GEMM_KC 256
#define KAPPA_GEMM_PACKED (256 * 1024)
// The most values of a transposed A copied at once (a block of at most MC_MAX of its rows, see
// pack_a_block), and the running sums of such a block's rows, 16 floats per micro-panel.
#define KAPPA_GEMM_PACKED_A (128 * 1024)
#define KAPPA_GEMM_MC_MAX (341 * MR)
#define KAPPA_GEMM_SUMS (KAPPA_GEMM_MC_MAX / MR * 16)

int kappa_gemm_direct_available(void) { return kappa_cpu_vector_level() >= 3; }

/// The packed panels of B and a micro-panel of Aᵀ, per thread: allocated on a thread's first
/// product, kept for its next ones and freed when the thread ends.
static pthread_key_t packed_key;
static pthread_once_t packed_once = PTHREAD_ONCE_INIT;
static void packed_key_create(void) {
    if (pthread_key_create(&packed_key, free) != 0) __builtin_trap();
}

static float *packed_buffer(void) {
    pthread_once(&packed_once, packed_key_create);
    float *buffer = pthread_getspecific(packed_key);
    if (!buffer) {
        buffer = aligned_alloc(64, sizeof(float) * (KAPPA_GEMM_PACKED + KAPPA_GEMM_PACKED_A + KAPPA_GEMM_SUMS));
        if (!buffer || pthread_setspecific(packed_key, buffer) != 0) __builtin_trap();
    }
    return buffer;
}

/// KAPPA_MATMUL_TRACE=1 at start-up: every product's time, summed per shape and layout and
/// printed to standard error at exit, longest first, with its rate: how fast each product of a
/// training step runs inside the step (the operands as cold or hot as the step leaves them),
/// which timing a product alone does not tell. Off, it costs one test per product.
typedef struct { long m, n, k, lda, ldb, calls; int trans_a, trans_b; double seconds; } kappa_trace_row;
#define KAPPA_TRACE_ROWS 512
static kappa_trace_row trace_rows[KAPPA_TRACE_ROWS];
static long trace_count, trace_dropped;
static int trace_enabled;
static pthread_mutex_t trace_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t trace_once = PTHREAD_ONCE_INIT;

static int by_seconds(const void *x, const void *y) {
    double a = ((const kappa_trace_row *)x)->seconds, b = ((const kappa_trace_row *)y)->seconds;
    return a < b ? 1 : a > b ? -1 : 0;
}

static void trace_print(void) {
    pthread_mutex_lock(&trace_lock);
    qsort(trace_rows, (size_t)trace_count, sizeof(kappa_trace_row), by_seconds);
    double total = 0, flop = 0;
    for (long i = 0; i < trace_count; i++) {
        total += trace_rows[i].seconds;
        flop += 2.0 * trace_rows[i].m * trace_rows[i].n * trace_rows[i].k * trace_rows[i].calls;
    }
    fprintf(stderr, "KAPPA_MATMUL_TRACE: direct products, %.3f s in all, %.1f GFLOP/s\n", total,
            total > 0 ? flop / total * 1e-9 : 0.0);
    fprintf(stderr, "  %-22s %-6s %-11s %8s %10s %9s\n", "m x n x k", "op", "lda, ldb", "calls", "seconds", "GFLOP/s");
    for (long i = 0; i < trace_count; i++) {
        const kappa_trace_row *r = &trace_rows[i];
        char shape[64], lds[32];
        snprintf(shape, sizeof shape, "%ld x %ld x %ld", r->m, r->n, r->k);
        snprintf(lds, sizeof lds, "%ld, %ld", r->lda, r->ldb);
        fprintf(stderr, "  %-22s %-6s %-11s %8ld %10.4f %9.1f\n", shape,
                r->trans_a ? (r->trans_b ? "At*Bt" : "At*B") : (r->trans_b ? "A*Bt" : "A*B"), lds, r->calls, r->seconds,
                2.0 * r->m * r->n * r->k * r->calls / r->seconds * 1e-9);
    }
    if (trace_dropped) fprintf(stderr, "  (%ld products of further shapes not shown)\n", trace_dropped);
    pthread_mutex_unlock(&trace_lock);
}

static void trace_start(void) {
    const char *e = getenv("KAPPA_MATMUL_TRACE");
    trace_enabled = e && *e && strcmp(e, "0") != 0;
    if (trace_enabled) atexit(trace_print);
}

static void trace_add(int trans_a, int trans_b, long m, long n, long k, long lda, long ldb, double seconds) {
    pthread_mutex_lock(&trace_lock);
    long i = 0;
    while (i < trace_count && !(trace_rows[i].m == m && trace_rows[i].n == n && trace_rows[i].k == k &&
                                trace_rows[i].lda == lda && trace_rows[i].ldb == ldb &&
                                trace_rows[i].trans_a == trans_a && trace_rows[i].trans_b == trans_b))
        i++;
    if (i == trace_count && trace_count < KAPPA_TRACE_ROWS)
        trace_rows[trace_count++] = (kappa_trace_row){m, n, k, lda, ldb, 0, trans_a, trans_b, 0};
    if (i < trace_count) {
        trace_rows[i].calls++;
        trace_rows[i].seconds += seconds;
    } else {
        trace_dropped++;
    }
    pthread_mutex_unlock(&trace_lock);
}

static double seconds_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/// The lanes of a panel's two vectors that hold columns (nj of them, 1 to 32).
KAPPA_INLINE __mmask16 low_mask(long nj) { return nj >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nj) - 1); }
KAPPA_INLINE __mmask16 high_mask(long nj) {
    return nj >= 32 ? (__mmask16)0xFFFF : nj > 16 ? (__mmask16)((1u << (nj - 16)) - 1) : (__mmask16)0;
}

/// B[pc ..< pc + kc, jc ..< jc + nc] into panels of 32 columns, [panel][k][32], the columns
/// past nc set to zero.
KAPPA_AVX512 static void pack_b(int trans_b, const float *b, long ldb, long pc, long kc, long jc, long nc, float *dst) {
    for (long j0 = 0; j0 < nc; j0 += NR, dst += kc * NR) {
        long nj = nc - j0 < NR ? nc - j0 : NR;
        if (!trans_b) {
            __mmask16 m0 = low_mask(nj), m1 = high_mask(nj);
            const float *src = b + pc * ldb + jc + j0;
            for (long k = 0; k < kc; k++, src += ldb) {
                _mm512_store_ps(dst + k * NR, _mm512_maskz_loadu_ps(m0, src));
                _mm512_store_ps(dst + k * NR + 16, _mm512_maskz_loadu_ps(m1, src + 16));
            }
        } else {
            // B(k, j) = b[j·ldb + k]: each column of the panel is a contiguous row of b.
            for (long j = 0; j < NR; j++) {
                if (j < nj) {
                    const float *src = b + (jc + j0 + j) * ldb + pc;
                    for (long k = 0; k < kc; k++) dst[k * NR + j] = src[k];
                } else {
                    for (long k = 0; k < kc; k++) dst[k * NR + j] = 0;
                }
            }
        }
    }
}

/// Rows i0 ..< i0 + rows and steps pc ..< pc + kc of a transposed A (A(r, k) at a[k·lda + r])
/// into micro-panels of 12 rows, [panel][k][12] (the micro-kernel does not read the values
/// past the last row). Each step of k is a contiguous run of a, read once and in order, which
/// the prefetchers follow. With `sums`, each row's values are also added to sums[row - i0],
/// one step of k after the other, through `acc` (16 floats per micro-panel: whole aligned
/// vectors, which a load can take straight from the previous step's store; a masked store
/// cannot be forwarded, and each step would wait for it).
KAPPA_AVX512 static void pack_a_block(const float *a, long lda, long i0, long rows, long pc, long kc, float *dst,
                                      float *sums, float *acc) {
    long panels = (rows + MR - 1) / MR;
    if (sums)
        for (long p = 0; p < panels; p++) {
            long left = rows - p * MR;
            __mmask16 m = left >= MR ? (__mmask16)0x0FFF : (__mmask16)((1u << left) - 1);
            _mm512_store_ps(acc + p * 16, _mm512_maskz_loadu_ps(m, sums + p * MR));
        }
    for (long k = 0; k < kc; k++) {
        const float *src = a + (pc + k) * lda + i0;
        float *d = dst + k * MR;
        for (long p = 0; p < panels; p++, d += kc * MR) {
            long left = rows - p * MR;
            __mmask16 m = left >= MR ? (__mmask16)0x0FFF : (__mmask16)((1u << left) - 1);
            __m512 v = _mm512_maskz_loadu_ps(m, src + p * MR);
            _mm512_mask_storeu_ps(d, m, v);
            if (sums) _mm512_store_ps(acc + p * 16, _mm512_add_ps(_mm512_load_ps(acc + p * 16), v));
        }
    }
    if (sums)
        for (long p = 0; p < panels; p++) {
            long left = rows - p * MR;
            __mmask16 m = left >= MR ? (__mmask16)0x0FFF : (__mmask16)((1u << left) - 1);
            _mm512_mask_storeu_ps(sums + p * MR, m, _mm512_load_ps(acc + p * 16));
        }
}

/// How a block's sums reach C: the first block of k writes alpha·sum + beta·C + bias (beta·C
/// left out when beta = 0, so C may hold anything), later blocks add alpha·sum to C.
typedef struct {
    __m512 alpha, beta;
    int first, read_c;
    const float *bias;  // at the block's first column, or NULL
} kappa_store;

KAPPA_AVX512 KAPPA_INLINE void store_row(float *c, __mmask16 m0, __mmask16 m1, __m512 s0, __m512 s1, const kappa_store *st) {
    __m512 base0, base1;
    if (!st->first) {
        base0 = _mm512_maskz_loadu_ps(m0, c);
        base1 = _mm512_maskz_loadu_ps(m1, c + 16);
    } else {
        base0 = _mm512_setzero_ps();
        base1 = _mm512_setzero_ps();
        if (st->read_c) {
            base0 = _mm512_mul_ps(st->beta, _mm512_maskz_loadu_ps(m0, c));
            base1 = _mm512_mul_ps(st->beta, _mm512_maskz_loadu_ps(m1, c + 16));
        }
        if (st->bias) {
            base0 = _mm512_add_ps(base0, _mm512_maskz_loadu_ps(m0, st->bias));
            base1 = _mm512_add_ps(base1, _mm512_maskz_loadu_ps(m1, st->bias + 16));
        }
    }
    _mm512_mask_storeu_ps(c, m0, _mm512_fmadd_ps(st->alpha, s0, base0));
    _mm512_mask_storeu_ps(c + 16, m1, _mm512_fmadd_ps(st->alpha, s1, base1));
}

/// rows (≤ 12, a constant once inlined) rows of C times one packed panel: A(r, k) at
/// a[r·lda + k], or at a[k·lda + r] when trans_a. The two layouts get their own loops so that
/// the compiler sees a unit stride.
KAPPA_AVX512 KAPPA_INLINE void micro(int rows, long kc, const float *a, long lda, int trans_a, const float *bp,
                        float *c, long ldc, __mmask16 m0, __mmask16 m1, const kappa_store *st) {
    __m512 s0[MR], s1[MR];
    for (int r = 0; r < rows; r++) {
        s0[r] = _mm512_setzero_ps();
        s1[r] = _mm512_setzero_ps();
    }
    if (!trans_a) {
        for (long k = 0; k < kc; k++) {
            __m512 b0 = _mm512_load_ps(bp + k * NR), b1 = _mm512_load_ps(bp + k * NR + 16);
#pragma clang loop unroll(full)
            for (int r = 0; r < rows; r++) {
                __m512 av = _mm512_set1_ps(a[r * lda + k]);
                s0[r] = _mm512_fmadd_ps(av, b0, s0[r]);
                s1[r] = _mm512_fmadd_ps(av, b1, s1[r]);
            }
        }
    } else {
        for (long k = 0; k < kc; k++) {
            __m512 b0 = _mm512_load_ps(bp + k * NR), b1 = _mm512_load_ps(bp + k * NR + 16);
            const float *ak = a + k * lda;
#pragma clang loop unroll(full)
            for (int r = 0; r < rows; r++) {
                __m512 av = _mm512_set1_ps(ak[r]);
                s0[r] = _mm512_fmadd_ps(av, b0, s0[r]);
                s1[r] = _mm512_fmadd_ps(av, b1, s1[r]);
            }
        }
    }
    for (int r = 0; r < rows; r++) store_row(c + r * ldc, m0, m1, s0[r], s1[r], st);
}

KAPPA_AVX512 static void micro_rows(int rows, long kc, const float *a, long lda, int trans_a, const float *bp,
                                    float *c, long ldc, __mmask16 m0, __mmask16 m1, const kappa_store *st) {
    switch (rows) {
#define KAPPA_ROWS(n) case n: micro(n, kc, a, lda, trans_a, bp, c, ldc, m0, m1, st); break;
    KAPPA_ROWS(1) KAPPA_ROWS(2) KAPPA_ROWS(3) KAPPA_ROWS(4) KAPPA_ROWS(5) KAPPA_ROWS(6)
    KAPPA_ROWS(7) KAPPA_ROWS(8) KAPPA_ROWS(9) KAPPA_ROWS(10) KAPPA_ROWS(11) KAPPA_ROWS(12)
#undef KAPPA_ROWS
    default: __builtin_trap();
    }
}

/// One micro-panel of C (rows i0 ..< i0 + rows, columns jc ..< jc + nc) times one block of k
/// (pc ..< pc + kc) of B, packed at bp. A transposed A is read at pa, where pack_a_block
/// copied its micro-panel, unless pa is NULL.
KAPPA_AVX512 static void row_panel(int trans_a, const float *pa, const float *a, long lda, long i0, int rows, long pc,
                                   long kc, const float *bp, long jc, long nc, float *c, long ldc, const float *bias,
                                   kappa_store *st) {
    const float *ai = a + i0 * lda + pc;
    long ld = lda;
    if (trans_a && !pa) {
        ai = a + pc * lda + i0;
    } else if (trans_a) {
        ai = pa;
        ld = MR;
    }
    for (long j0 = 0; j0 < nc; j0 += NR) {
        long nj = nc - j0 < NR ? nc - j0 : NR;
        st->bias = bias ? bias + jc + j0 : NULL;
        micro_rows(rows, kc, ai, ld, trans_a, bp + j0 * kc, c + i0 * ldc + jc + j0, ldc, low_mask(nj), high_mask(nj), st);
    }
}

KAPPA_AVX512 static int gemm(int trans_a, int trans_b, long m, long n, long k, float alpha, const float *a, long lda,
                             const float *b, long ldb, float beta, float *c, long ldc, const float *bias,
                             float *a_sums) {
    if (m <= 0 || n <= 0) return 0;
    if (kappa_cpu_vector_level() < 3) __builtin_trap();
    if (k <= 0) {
        for (long i = 0; i < m; i++)
            for (long j = 0; j < n; j++)
                c[i * ldc + j] = (beta == 0 ? 0.f : beta * c[i * ldc + j]) + (bias ? bias[j] : 0.f);
        return 0;
    }
    float *bp = packed_buffer(), *pa = bp + KAPPA_GEMM_PACKED, *acc = pa + KAPPA_GEMM_PACKED_A;
    long blocks = (k + KAPPA_GEMM_KC - 1) / KAPPA_GEMM_KC;
    long kc0 = (k + blocks - 1) / blocks;  // blocks of equal length, the last one shorter
    // When all of B fits the buffer, it is packed once and each micro-panel of C runs through
    // every block of k while it is in cache; otherwise (k or n in the thousands: a weight
    // gradient over many rows, a head's prototypes) the blocks of k go outermost and C is
    // revisited once per block.
    int whole_k = k * ((n + NR - 1) / NR * NR) <= KAPPA_GEMM_PACKED;
    long nc_max = KAPPA_GEMM_PACKED / (whole_k ? k : kc0) / NR * NR;
    if (nc_max < NR) nc_max = NR;
    kappa_store st;
    st.alpha = _mm512_set1_ps(alpha);
    st.beta = _mm512_set1_ps(beta);
    st.read_c = beta != 0;
    // A transposed A's 12 values of a step of k are contiguous, but the steps lie lda apart,
    // and a multiple of 4 KB would map them all to a few sets of L1: it is copied by blocks of
    // mc rows (over all of k, or over the current block of k) when it meets many panels of B
    // or lda is such. The copy also sums its rows when asked (a linear layer's bias gradient
    // next to its weight gradient), on the first slice of columns only.
    int pack_a = trans_a && (n >= 4 * NR || lda % 1024 == 0);
    long mc = KAPPA_GEMM_PACKED_A / (whole_k ? k : kc0) / MR * MR;
    if (mc < MR) mc = MR;
    if (mc > KAPPA_GEMM_MC_MAX) mc = KAPPA_GEMM_MC_MAX;
    if (!pack_a) a_sums = NULL;
    if (a_sums)
        for (long i = 0; i < m; i++) a_sums[i] = 0;
    for (long jc = 0; jc < n; jc += nc_max) {
        long nc = n - jc < nc_max ? n - jc : nc_max, ncp = (nc + NR - 1) / NR * NR;
        float *sums = jc == 0 ? a_sums : NULL;
        if (whole_k) {
            for (long pc = 0; pc < k; pc += kc0)
                pack_b(trans_b, b, ldb, pc, k - pc < kc0 ? k - pc : kc0, jc, nc, bp + pc * ncp);
            for (long ic = 0; ic < m; ic += mc) {
                long mcc = m - ic < mc ? m - ic : mc;
                if (pack_a) pack_a_block(a, lda, ic, mcc, 0, k, pa, sums ? sums + ic : NULL, acc);
                for (long i0 = ic; i0 < ic + mcc; i0 += MR) {
                    int rows = (int)(ic + mcc - i0 < MR ? ic + mcc - i0 : MR);
                    for (long pc = 0; pc < k; pc += kc0) {
                        st.first = pc == 0;
                        row_panel(trans_a, pack_a ? pa + (i0 - ic) * k + pc * MR : NULL, a, lda, i0, rows, pc,
                                  k - pc < kc0 ? k - pc : kc0, bp + pc * ncp, jc, nc, c, ldc, bias, &st);
                    }
                }
            }
        } else {
            for (long pc = 0; pc < k; pc += kc0) {
                long kc = k - pc < kc0 ? k - pc : kc0;
                pack_b(trans_b, b, ldb, pc, kc, jc, nc, bp);
                st.first = pc == 0;
                for (long ic = 0; ic < m; ic += mc) {
                    long mcc = m - ic < mc ? m - ic : mc;
                    if (pack_a) pack_a_block(a, lda, ic, mcc, pc, kc, pa, sums ? sums + ic : NULL, acc);
                    for (long i0 = ic; i0 < ic + mcc; i0 += MR)
                        row_panel(trans_a, pack_a ? pa + (i0 - ic) * kc : NULL, a, lda, i0,
                                  (int)(ic + mcc - i0 < MR ? ic + mcc - i0 : MR), pc, kc, bp, jc, nc, c, ldc, bias,
                                  &st);
                }
            }
        }
    }
    return a_sums != NULL;
}

int kappa_gemm_f32_sums(int trans_a, int trans_b, long m, long n, long k, float alpha, const float *a, long lda,
                        const float *b, long ldb, float beta, float *c, long ldc, const float *bias, float *a_sums) {
    pthread_once(&trace_once, trace_start);
    if (!trace_enabled) return gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, bias, a_sums);
    double start = seconds_now();
    int summed = gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, bias, a_sums);
    trace_add(trans_a, trans_b, m, n, k, lda, ldb, seconds_now() - start);
    return summed;
}

void kappa_gemm_f32(int trans_a, int trans_b, long m, long n, long k, float alpha, const float *a, long lda,
                    const float *b, long ldb, float beta, float *c, long ldc, const float *bias) {
    kappa_gemm_f32_sums(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, bias, NULL);
}

#else

int kappa_gemm_direct_available(void) { return 0; }
int kappa_gemm_f32_sums(int trans_a, int trans_b, long m, long n, long k, float alpha, const float *a, long lda,
                        const float *b, long ldb, float beta, float *c, long ldc, const float *bias, float *a_sums) {
    (void)trans_a; (void)trans_b; (void)m; (void)n; (void)k; (void)alpha; (void)a; (void)lda; (void)b;
    (void)ldb; (void)beta; (void)c; (void)ldc; (void)bias; (void)a_sums;
    __builtin_trap();
}
void kappa_gemm_f32(int trans_a, int trans_b, long m, long n, long k, float alpha, const float *a, long lda,
                    const float *b, long ldb, float beta, float *c, long ldc, const float *bias) {
    kappa_gemm_f32_sums(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, bias, NULL);
}

#endif
