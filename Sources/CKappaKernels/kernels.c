// Kappa's C kernels: see include/kappa_kernels.h for what each computes.
#include "kappa_kernels.h"
#include <string.h>

#if defined(__x86_64__) && defined(__clang__)
// One copy of each kernel per x86-64 level; the loader picks the best for the host once.
#define KAPPA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KAPPA_CLONES
#endif

int kappa_cpu_vector_level(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl"))
        return 3;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 2;
#endif
    return 0;
}

// MARK: im2col / col2im

// The output columns x whose input column x·sw − pw + j·dw lies inside the image: lower..<upper.
static inline void valid_columns(const kappa_conv_geometry *g, long j, long *lower, long *upper) {
    long offset = g->pw - j * g->dw;  // ix = x·sw − offset
    long lo = offset <= 0 ? 0 : (offset + g->sw - 1) / g->sw;
    long last = g->w - 1 + offset;
    long up = last < 0 ? 0 : (last / g->sw + 1 < g->ow ? last / g->sw + 1 : g->ow);
    *lower = lo < g->ow ? lo : g->ow;
    *upper = up;
}

#define DEFINE_IM2COL(T, SUFFIX)                                                                                  \
    KAPPA_CLONES void kappa_im2col_##SUFFIX(const T *img, T *cols, const kappa_conv_geometry *g, long row_stride) { \
        for (long ci = 0; ci < g->c; ci++)                                                                        \
            for (long i = 0; i < g->kh; i++)                                                                      \
                for (long j = 0; j < g->kw; j++) {                                                                \
                    T *row = cols + ((ci * g->kh + i) * g->kw + j) * row_stride;                                  \
                    long lower, upper;                                                                            \
                    valid_columns(g, j, &lower, &upper);                                                          \
                    long first = lower * g->sw - g->pw + j * g->dw;                                               \
                    for (long y = 0; y < g->oh; y++) {                                                            \
                        long iy = y * g->sh - g->ph + i * g->dh;                                                  \
                        T *dst = row + y * g->ow;                                                                 \
                        if (iy < 0 || iy >= g->h || lower >= upper) {                                             \
                            for (long x = 0; x < g->ow; x++) dst[x] = 0;                                          \
                            continue;                                                                             \
                        }                                                                                         \
                        for (long x = 0; x < lower; x++) dst[x] = 0;                                              \
                        for (long x = upper; x < g->ow; x++) dst[x] = 0;                                          \
                        const T *src = img + (ci * g->h + iy) * g->w + first;                                     \
                        if (g->sw == 1) {                                                                         \
                            for (long x = 0; x < upper - lower; x++) dst[lower + x] = src[x];                     \
                        } else {                                                                                  \
                            for (long x = 0; x < upper - lower; x++) dst[lower + x] = src[x * g->sw];             \
                        }                                                                                         \
                    }                                                                                             \
                }                                                                                                 \
    }                                                                                                             \
    KAPPA_CLONES void kappa_col2im_##SUFFIX(const T *cols, T *img, const kappa_conv_geometry *g, long row_stride) { \
        for (long ci = 0; ci < g->c; ci++)                                                                        \
            for (long i = 0; i < g->kh; i++)                                                                      \
                for (long j = 0; j < g->kw; j++) {                                                                \
                    const T *row = cols + ((ci * g->kh + i) * g->kw + j) * row_stride;                            \
                    long lower, upper;                                                                            \
                    valid_columns(g, j, &lower, &upper);                                                          \
                    if (lower >= upper) continue;                                                                 \
                    long first = lower * g->sw - g->pw + j * g->dw;                                               \
                    for (long y = 0; y < g->oh; y++) {                                                            \
                        long iy = y * g->sh - g->ph + i * g->dh;                                                  \
                        if (iy < 0 || iy >= g->h) continue;                                                       \
                        T *dst = img + (ci * g->h + iy) * g->w + first;                                           \
                        const T *src = row + y * g->ow + lower;                                                   \
                        if (g->sw == 1) {                                                                         \
                            for (long x = 0; x < upper - lower; x++) dst[x] += src[x];                            \
                        } else {                                                                                  \
                            for (long x = 0; x < upper - lower; x++) dst[x * g->sw] += src[x];                    \
                        }                                                                                         \
                    }                                                                                             \
                }                                                                                                 \
    }

DEFINE_IM2COL(float, f32)
DEFINE_IM2COL(double, f64)

// MARK: Batch normalization

// [n, c, l]: element (i, ch, k) at (i·c + ch)·l + k. For l = 1 ([N, C]) the loops run over
// rows with the channels innermost, so that they vectorize; otherwise over contiguous runs.
#define DEFINE_BN(T, SUFFIX)                                                                                      \
    KAPPA_CLONES void kappa_bn_stats_##SUFFIX(const T *x, long n, long c, long l, long c0, long c1, double eps,    \
                                              T *mean, T *var_out, T *invstd) {                                   \
        _Pragma("clang fp reassociate(on)")                                                                       \
        double m = (double)n * (double)l;                                                                         \
        if (l == 1) {                                                                                             \
            double s[c1 - c0 > 0 ? c1 - c0 : 1], q[c1 - c0 > 0 ? c1 - c0 : 1];                                   \
            for (long ch = c0; ch < c1; ch++) s[ch - c0] = q[ch - c0] = 0;                                        \
            for (long i = 0; i < n; i++)                                                                          \
                for (long ch = c0; ch < c1; ch++) s[ch - c0] += (double)x[i * c + ch];                            \
            for (long ch = c0; ch < c1; ch++) s[ch - c0] /= m;                                                    \
            for (long i = 0; i < n; i++)                                                                          \
                for (long ch = c0; ch < c1; ch++) {                                                               \
                    double d = (double)x[i * c + ch] - s[ch - c0];                                                \
                    q[ch - c0] += d * d;                                                                          \
                }                                                                                                 \
            for (long ch = c0; ch < c1; ch++) {                                                                   \
                double v = q[ch - c0] / m;                                                                        \
                mean[ch] = (T)s[ch - c0];                                                                         \
                var_out[ch] = (T)v;                                                                               \
                invstd[ch] = (T)(1.0 / __builtin_sqrt(v + eps));                                                  \
            }                                                                                                     \
            return;                                                                                               \
        }                                                                                                         \
        for (long ch = c0; ch < c1; ch++) {                                                                       \
            double s = 0;                                                                                         \
            for (long i = 0; i < n; i++) {                                                                        \
                const T *run = x + (i * c + ch) * l;                                                              \
                T acc = 0;                                                                                        \
                for (long k = 0; k < l; k++) acc += run[k];                   \
                s += (double)acc;                                                                                 \
            }                                                                                                     \
            double mu = s / m;                                                                                    \
            T mt = (T)mu;                                                                                         \
            double q = 0;                                                                                         \
            for (long i = 0; i < n; i++) {                                                                        \
                const T *run = x + (i * c + ch) * l;                                                              \
                T acc = 0;                                                                                        \
                for (long k = 0; k < l; k++) {                                \
                    T d = run[k] - mt;                                                                            \
                    acc += d * d;                                                                                 \
                }                                                                                                 \
                q += (double)acc;                                                                                 \
            }                                                                                                     \
            double v = q / m;                                                                                     \
            mean[ch] = mt;                                                                                        \
            var_out[ch] = (T)v;                                                                                   \
            invstd[ch] = (T)(1.0 / __builtin_sqrt(v + eps));                                                      \
        }                                                                                                         \
    }                                                                                                             \
    KAPPA_CLONES void kappa_bn_apply_##SUFFIX(const T *x, T *y, long n, long c, long l, long c0, long c1,          \
                                              const T *scale, const T *shift, int relu) {                         \
        for (long i = 0; i < n; i++) {                                                                            \
            if (l == 1) {                                                                                         \
                const T *xr = x + i * c;                                                                          \
                T *yr = y + i * c;                                                                                \
                if (relu) {                                                                                       \
                    for (long ch = c0; ch < c1; ch++) {                                                           \
                        T v = xr[ch] * scale[ch] + shift[ch];                                                     \
                        yr[ch] = v > 0 ? v : 0;                                                                   \
                    }                                                                                             \
                } else {                                                                                          \
                    for (long ch = c0; ch < c1; ch++) yr[ch] = xr[ch] * scale[ch] + shift[ch];                    \
                }                                                                                                 \
                continue;                                                                                         \
            }                                                                                                     \
            for (long ch = c0; ch < c1; ch++) {                                                                   \
                const T *xr = x + (i * c + ch) * l;                                                               \
                T *yr = y + (i * c + ch) * l;                                                                     \
                T a = scale[ch], b = shift[ch];                                                                   \
                if (relu) {                                                                                       \
                    for (long k = 0; k < l; k++) {                                                                \
                        T v = xr[k] * a + b;                                                                      \
                        yr[k] = v > 0 ? v : 0;                                                                    \
                    }                                                                                             \
                } else {                                                                                          \
                    for (long k = 0; k < l; k++) yr[k] = xr[k] * a + b;                                           \
                }                                                                                                 \
            }                                                                                                     \
        }                                                                                                         \
    }                                                                                                             \
    KAPPA_CLONES void kappa_bn_backward_sums_##SUFFIX(const T *x, const T *g, const T *y, long n, long c, long l,  \
                                                      long c0, long c1, const T *mean, double *sum_g,             \
                                                      double *sum_gx) {                                           \
        _Pragma("clang fp reassociate(on)")                                                                       \
        for (long ch = c0; ch < c1; ch++) sum_g[ch] = sum_gx[ch] = 0;                                             \
        if (l == 1) {                                                                                             \
            for (long i = 0; i < n; i++) {                                                                        \
                const T *xr = x + i * c, *gr = g + i * c, *yr = y ? y + i * c : 0;                                \
                for (long ch = c0; ch < c1; ch++) {                                                               \
                    T gv = (yr && !(yr[ch] > 0)) ? 0 : gr[ch];                                                    \
                    sum_g[ch] += (double)gv;                                                                      \
                    sum_gx[ch] += (double)(gv * (xr[ch] - mean[ch]));                                             \
                }                                                                                                 \
            }                                                                                                     \
            return;                                                                                               \
        }                                                                                                         \
        for (long ch = c0; ch < c1; ch++) {                                                                       \
            T mu = mean[ch];                                                                                      \
            double sg = 0, sgx = 0;                                                                               \
            for (long i = 0; i < n; i++) {                                                                        \
                const T *xr = x + (i * c + ch) * l, *gr = g + (i * c + ch) * l;                                   \
                T a = 0, b = 0;                                                                                   \
                if (y) {                                                                                          \
                    const T *yr = y + (i * c + ch) * l;                                                           \
                    for (long k = 0; k < l; k++) {                            \
                        T gv = yr[k] > 0 ? gr[k] : 0;                                                             \
                        a += gv;                                                                                  \
                        b += gv * (xr[k] - mu);                                                                   \
                    }                                                                                             \
                } else {                                                                                          \
                    for (long k = 0; k < l; k++) {                            \
                        a += gr[k];                                                                               \
                        b += gr[k] * (xr[k] - mu);                                                                \
                    }                                                                                             \
                }                                                                                                 \
                sg += (double)a;                                                                                  \
                sgx += (double)b;                                                                                 \
            }                                                                                                     \
            sum_g[ch] = sg;                                                                                       \
            sum_gx[ch] = sgx;                                                                                     \
        }                                                                                                         \
    }                                                                                                             \
    KAPPA_CLONES void kappa_bn_backward_input_##SUFFIX(const T *x, const T *g, const T *y, T *gx, long n, long c,  \
                                                       long l, long c0, long c1, const T *mean, const T *a,       \
                                                       const T *b, const T *d) {                                  \
        for (long i = 0; i < n; i++) {                                                                            \
            if (l == 1) {                                                                                         \
                const T *xr = x + i * c, *gr = g + i * c, *yr = y ? y + i * c : 0;                                \
                T *out = gx + i * c;                                                                              \
                for (long ch = c0; ch < c1; ch++) {                                                               \
                    T gv = (yr && !(yr[ch] > 0)) ? 0 : gr[ch];                                                    \
                    out[ch] = a[ch] * gv + b[ch] * (xr[ch] - mean[ch]) + d[ch];                                   \
                }                                                                                                 \
                continue;                                                                                         \
            }                                                                                                     \
            for (long ch = c0; ch < c1; ch++) {                                                                   \
                const T *xr = x + (i * c + ch) * l, *gr = g + (i * c + ch) * l;                                   \
                T *out = gx + (i * c + ch) * l;                                                                   \
                T aa = a[ch], bb = b[ch], dd = d[ch], mu = mean[ch];                                              \
                if (y) {                                                                                          \
                    const T *yr = y + (i * c + ch) * l;                                                           \
                    for (long k = 0; k < l; k++) {                                                                \
                        T gv = yr[k] > 0 ? gr[k] : 0;                                                             \
                        out[k] = aa * gv + bb * (xr[k] - mu) + dd;                                                \
                    }                                                                                             \
                } else {                                                                                          \
                    for (long k = 0; k < l; k++) out[k] = aa * gr[k] + bb * (xr[k] - mu) + dd;                    \
                }                                                                                                 \
            }                                                                                                     \
        }                                                                                                         \
    }

DEFINE_BN(float, f32)
DEFINE_BN(double, f64)
