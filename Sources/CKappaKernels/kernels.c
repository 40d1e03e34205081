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

// Both work on the image with its zero padding laid out ([c, h + 2ph, w + 2pw]; the image
// itself when there is no padding), so that no inner loop tests bounds and none calls
// memcpy/memset for the few elements of a row (7, 4 or 2 in a small ResNet's last stages).
#define DEFINE_IM2COL(T, SUFFIX)                                                                                  \
    KAPPA_CLONES void kappa_pad_##SUFFIX(const T *img, T *padded, long c, long h, long w, long ph, long pw) {     \
        long hp = h + 2 * ph, wp = w + 2 * pw;                                                                    \
        for (long ci = 0; ci < c; ci++) {                                                                         \
            T *plane = padded + ci * hp * wp;                                                                     \
            for (long k = 0; k < ph * wp; k++) plane[k] = 0;                                                      \
            for (long y = 0; y < h; y++) {                                                                        \
                T *row = plane + (y + ph) * wp;                                                                   \
                const T *src = img + (ci * h + y) * w;                                                            \
                for (long x = 0; x < pw; x++) row[x] = 0;                                                         \
                for (long x = 0; x < w; x++) row[pw + x] = src[x];                                                \
                for (long x = pw + w; x < wp; x++) row[x] = 0;                                                    \
            }                                                                                                     \
            for (long k = (h + ph) * wp; k < hp * wp; k++) plane[k] = 0;                                          \
        }                                                                                                         \
    }                                                                                                             \
    KAPPA_CLONES void kappa_unpad_##SUFFIX(const T *padded, T *img, long c, long h, long w, long ph, long pw) {   \
        long hp = h + 2 * ph, wp = w + 2 * pw;                                                                    \
        for (long ci = 0; ci < c; ci++)                                                                           \
            for (long y = 0; y < h; y++) {                                                                        \
                const T *src = padded + (ci * hp + y + ph) * wp + pw;                                             \
                T *dst = img + (ci * h + y) * w;                                                                  \
                for (long x = 0; x < w; x++) dst[x] = src[x];                                                     \
            }                                                                                                     \
    }                                                                                                             \
    KAPPA_CLONES void kappa_im2col_##SUFFIX(const T *padded, T *cols, const kappa_conv_geometry *g,               \
                                            long row_stride) {                                                    \
        long hp = g->h + 2 * g->ph, wp = g->w + 2 * g->pw, ow = g->ow, sw = g->sw;                                \
        for (long ci = 0; ci < g->c; ci++)                                                                        \
            for (long i = 0; i < g->kh; i++)                                                                      \
                for (long j = 0; j < g->kw; j++) {                                                                \
                    T *row = cols + ((ci * g->kh + i) * g->kw + j) * row_stride;                                  \
                    const T *base = padded + (ci * hp + i * g->dh) * wp + j * g->dw;                              \
                    for (long y = 0; y < g->oh; y++) {                                                            \
                        const T *restrict src = base + y * g->sh * wp;                                                     \
                        T *restrict dst = row + y * ow;                                                           \
                        if (sw == 1) {                                                                            \
                            for (long x = 0; x < ow; x++) dst[x] = src[x];                                        \
                        } else {                                                                                  \
                            for (long x = 0; x < ow; x++) dst[x] = src[x * sw];                                   \
                        }                                                                                         \
                    }                                                                                             \
                }                                                                                                 \
    }                                                                                                             \
    KAPPA_CLONES void kappa_col2im_##SUFFIX(const T *cols, T *padded, const kappa_conv_geometry *g,               \
                                            long row_stride) {                                                    \
        long hp = g->h + 2 * g->ph, wp = g->w + 2 * g->pw, ow = g->ow, sw = g->sw;                                \
        for (long ci = 0; ci < g->c; ci++)                                                                        \
            for (long i = 0; i < g->kh; i++)                                                                      \
                for (long j = 0; j < g->kw; j++) {                                                                \
                    const T *row = cols + ((ci * g->kh + i) * g->kw + j) * row_stride;                            \
                    T *base = padded + (ci * hp + i * g->dh) * wp + j * g->dw;                                    \
                    for (long y = 0; y < g->oh; y++) {                                                            \
                        T *restrict dst = base + y * g->sh * wp;                                                           \
                        const T *restrict src = row + y * ow;                                                     \
                        if (sw == 1) {                                                                            \
                            for (long x = 0; x < ow; x++) dst[x] += src[x];                                       \
                        } else {                                                                                  \
                            for (long x = 0; x < ow; x++) dst[x * sw] += src[x];                                  \
                        }                                                                                         \
                    }                                                                                             \
                }                                                                                                 \
    }                                                                                                             \
    KAPPA_CLONES void kappa_widen_##SUFFIX(const T *src, T *dst, long images, long rows, long oh, long ow,        \
                                           long width) {                                                          \
        for (long n = 0; n < images; n++)                                                                         \
            for (long r = 0; r < rows; r++)                                                                       \
                for (long y = 0; y < oh; y++) {                                                                   \
                    const T *restrict s = src + ((n * rows + r) * oh + y) * ow;                                   \
                    T *restrict d = dst + (r * images + n) * oh * width + y * width;                              \
                    for (long x = 0; x < ow; x++) d[x] = s[x];                                                    \
                    for (long x = ow; x < width; x++) d[x] = 0;                                                   \
                }                                                                                                 \
    }                                                                                                             \
    KAPPA_CLONES void kappa_narrow_##SUFFIX(const T *src, T *dst, long images, long rows, long oh, long ow,       \
                                            long width) {                                                         \
        for (long n = 0; n < images; n++)                                                                         \
            for (long r = 0; r < rows; r++)                                                                       \
                for (long y = 0; y < oh; y++) {                                                                   \
                    const T *restrict s = src + (r * images + n) * oh * width + y * width;                        \
                    T *restrict d = dst + ((n * rows + r) * oh + y) * ow;                                         \
                    for (long x = 0; x < ow; x++) d[x] = s[x];                                                    \
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
