// Kappa's C kernels: see include/kappa_kernels.h for what each computes.
#include "kappa_kernels.h"
#include <string.h>

#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define KAPPA_NO_CLONES 1  // ThreadSanitizer instruments the loader-time resolvers, which then crash
#endif
#endif

#if defined(__x86_64__) && defined(__clang__) && !defined(KAPPA_NO_CLONES)
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

// Both work on the image with its zero padding laid out ([c, h + 2ph, w + 2pw], kappa_phase at
// stride 1; the image itself when there is no padding), so that no inner loop tests bounds
// and none calls memcpy/memset for the few elements of a row (7, 4 or 2 in the last stages).
#define DEFINE_IM2COL(T, SUFFIX)                                                                                  \
    KAPPA_CLONES void kappa_im2col_##SUFFIX(const T *padded, T *cols, const kappa_conv_geometry *g,               \
                                            long row_stride) {                                                    \
        long hp = g->h + 2 * g->ph, wp = g->w + 2 * g->pw, ow = g->ow, sw = g->sw;                                \
        for (long ci = 0; ci < g->c; ci++)                                                                        \
            for (long i = 0; i < g->kh; i++)                                                                      \
                for (long j = 0; j < g->kw; j++) {                                                                \
                    T *row = cols + ((ci * g->kh + i) * g->kw + j) * row_stride;                                  \
                    const T *base = padded + (ci * hp + i * g->dh) * wp + j * g->dw;                              \
                    for (long y = 0; y < g->oh; y++) {                                                            \
                        const T *restrict src = base + y * g->sh * wp;                                            \
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
                        T *restrict dst = base + y * g->sh * wp;                                                  \
                        const T *restrict src = row + y * ow;                                                     \
                        if (sw == 1) {                                                                            \
                            for (long x = 0; x < ow; x++) dst[x] += src[x];                                       \
                        } else {                                                                                  \
                            for (long x = 0; x < ow; x++) dst[x * sw] += src[x];                                  \
                        }                                                                                         \
                    }                                                                                             \
                }                                                                                                 \
    }                                                                                                             \
    KAPPA_CLONES void kappa_phase_##SUFFIX(const T *img, T *buf, long c, long h, long w, long ph, long pw, long sh,  \
                                           long sw, long hq, long wq) {                                           \
        for (long ci = 0; ci < c; ci++)                                                                           \
            for (long a = 0; a < sh; a++)                                                                         \
                for (long b = 0; b < sw; b++) {                                                                   \
                    T *plane = buf + ((ci * sh + a) * sw + b) * hq * wq;                                          \
                    long x0 = pw - b <= 0 ? 0 : (pw - b + sw - 1) / sw;                                           \
                    long x1 = w + pw - b <= 0 ? 0 : (w + pw - b + sw - 1) / sw;                                   \
                    if (x0 > wq) x0 = wq;                                                                         \
                    if (x1 > wq) x1 = wq;                                                                         \
                    if (x1 < x0) x1 = x0;                                                                         \
                    for (long y = 0; y < hq; y++) {                                                               \
                        long iy = y * sh + a - ph;                                                                \
                        T *restrict row = plane + y * wq;                                                         \
                        if (iy < 0 || iy >= h) {                                                                  \
                            for (long x = 0; x < wq; x++) row[x] = 0;                                             \
                            continue;                                                                             \
                        }                                                                                         \
                        const T *restrict src = img + (ci * h + iy) * w + b - pw;                                 \
                        for (long x = 0; x < x0; x++) row[x] = 0;                                                 \
                        if (sw == 1) {                                                                            \
                            for (long x = x0; x < x1; x++) row[x] = src[x];                                       \
                        } else {                                                                                  \
                            for (long x = x0; x < x1; x++) row[x] = src[x * sw];                                  \
                        }                                                                                         \
                        for (long x = x1; x < wq; x++) row[x] = 0;                                                \
                    }                                                                                             \
                }                                                                                                 \
    }                                                                                                             \
    KAPPA_CLONES void kappa_unphase_##SUFFIX(const T *buf, T *img, long c, long h, long w, long ph, long pw,      \
                                             long sh, long sw, long hq, long wq) {                                \
        for (long ci = 0; ci < c; ci++)                                                                           \
            for (long a = 0; a < sh; a++)                                                                         \
                for (long b = 0; b < sw; b++) {                                                                   \
                    const T *plane = buf + ((ci * sh + a) * sw + b) * hq * wq;                                    \
                    long x0 = pw - b <= 0 ? 0 : (pw - b + sw - 1) / sw;                                           \
                    long x1 = w + pw - b <= 0 ? 0 : (w + pw - b + sw - 1) / sw;                                   \
                    if (x0 > wq) x0 = wq;                                                                         \
                    if (x1 > wq) x1 = wq;                                                                         \
                    for (long y = 0; y < hq; y++) {                                                               \
                        long iy = y * sh + a - ph;                                                                \
                        if (iy < 0 || iy >= h) continue;                                                          \
                        const T *restrict row = plane + y * wq;                                                   \
                        T *restrict dst = img + (ci * h + iy) * w + b - pw;                                       \
                        if (sw == 1) {                                                                            \
                            for (long x = x0; x < x1; x++) dst[x] = row[x];                                       \
                        } else {                                                                                  \
                            for (long x = x0; x < x1; x++) dst[x * sw] = row[x];                                  \
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
    KAPPA_CLONES void kappa_bn_stats_##SUFFIX(const T *x, long n, long c, long l, long c0, long c1, double eps,   \
                                              T *mean, T *var_out, T *invstd) {                                   \
        _Pragma("clang fp reassociate(on)")                                                                       \
        double m = (double)n * (double)l;                                                                         \
        if (l == 1) {                                                                                             \
            double s[c1 - c0 > 0 ? c1 - c0 : 1], q[c1 - c0 > 0 ? c1 - c0 : 1];                                    \
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
    KAPPA_CLONES void kappa_bn_apply_##SUFFIX(const T *x, T *y, long n, long c, long l, long c0, long c1,         \
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
    KAPPA_CLONES void kappa_bn_backward_sums_##SUFFIX(const T *x, const T *g, const T *y, long n, long c, long l, \
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
    KAPPA_CLONES void kappa_bn_backward_input_##SUFFIX(const T *x, const T *g, const T *y, T *gx, long n, long c, \
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

// MARK: Elementwise (Float32)

#include <stdint.h>
#include "gelu_polynomial.h"

// e^x as Kappa's Swift fastExp: Cody–Waite reduction x = k·ln2 + r with k rounded by the
// magic-number trick, Cephes' degree-7 polynomial, 2^k in two exponent factors.
static inline float kappa_expf(float x) {
    float xc = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
    float t = xc * 1.442695041f + 12582912.0f;
    float k = t - 12582912.0f;
    int32_t bits;
    memcpy(&bits, &t, 4);
    bits -= 0x4B400000;
    float r = (xc - k * 0.693359375f) + k * 2.12194440e-4f;
    float z = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * z + r + 1;
    int32_t half = bits >> 1;
    uint32_t e1 = (uint32_t)(half + 127) << 23, e2 = (uint32_t)(bits - half + 127) << 23;
    float s1, s2;
    memcpy(&s1, &e1, 4);
    memcpy(&s2, &e2, 4);
    float y = p * s1 * s2;
    return x < -87.3f ? 0 : (x > 88.7f ? __builtin_inff() : (x != x ? x : y));
}

// Φ(x) = erfc(−x/√2)/2 with Numerical Recipes' erfcc (fractional error < 1.2e-7), as the
// Swift fastNormalCDF.
static inline float kappa_normal_cdf(float x) {
    float z = -x * 0.70710678118654752440f;
    float a = z < 0 ? -z : z;
    float t = 1 / (1 + 0.5f * a);
    float p = 0.17087277f;
    p = p * t - 0.82215223f;
    p = p * t + 1.48851587f;
    p = p * t - 1.13520398f;
    p = p * t + 0.27886807f;
    p = p * t - 0.18628806f;
    p = p * t + 0.09678418f;
    p = p * t + 0.37409196f;
    p = p * t + 1.00002368f;
    p = p * t - 1.26551223f;
    float erfc_abs = t * kappa_expf(-a * a + p);
    float erfc = z >= 0 ? erfc_abs : 2 - erfc_abs;
    return x != x ? x : erfc * 0.5f;
}

KAPPA_CLONES void kappa_exp_f32(const float *restrict x, float *restrict y, long n) {
    for (long i = 0; i < n; i++) y[i] = kappa_expf(x[i]);
}
// e^a for a ≤ 0 (held at −87.3 below, where NaN goes too), for GELU's fast path:
// a = k·ln2 + r with one FMA (ln2's Float32 rounding error, 1.9e-9, times |k| ≤ 15 where the
// path's results are kept, |a| ≤ 10.4), e^r = 1 + r + r²E(r) of degree 5 (gelu_polynomial.h),
// and 2^k in one factor since k ≥ −126.
static inline float kappa_exp_nonpositive(float a) {
    a = a > -87.3f ? a : -87.3f;
    float t = a * 1.442695041f + 12582912.0f;
    float k = t - 12582912.0f;
    int32_t bits;
    memcpy(&bits, &t, 4);
    bits -= 0x4B400000;
    float r = a - k * 0.6931471806f;
    float p = kappa_gelu_exp[3];
    p = p * r + kappa_gelu_exp[2];
    p = p * r + kappa_gelu_exp[1];
    p = p * r + kappa_gelu_exp[0];
    p = p * (r * r) + r + 1;
    uint32_t e = (uint32_t)(bits + 127) << 23;
    float s;
    memcpy(&s, &e, 4);
    return p * s;
}

// GELU's fast path, for |x| ≤ KAPPA_GELU_FAST_LIMIT: with t = |x|, Φ(−t) = e^{−t²/2}·Q(t)
// (gelu_polynomial.h) gives Φ(x) = Φ(−t) below 0 and 1 − Φ(−t) above, without the cancellation
// of 1 + erf, the division of the erfc form or its larger exp. Elsewhere (and for NaN) its
// result is discarded.
static inline float kappa_gelu_u(float x) {
    float t = x < 0 ? -x : x;
    return t * (2 / KAPPA_GELU_FAST_LIMIT) - 1;
}
// Φ(x) as e^{log Q(t) − x²/2}: one exp.
static inline float kappa_normal_cdf_fast(float x) {
    float u = kappa_gelu_u(x);
    float l = kappa_gelu_log_q[8];
    for (int k = 7; k >= 0; k--) l = l * u + kappa_gelu_log_q[k];
    float a = l - 0.5f * x * x;
    float lower = kappa_exp_nonpositive(a);
    return x < 0 ? lower : 1 - lower;
}
// Φ(x) + x·φ(x) (GELU's derivative) with e = e^{−x²/2} shared: Φ(−t) = e·Q(t), φ = e/√(2π).
static inline float kappa_gelu_derivative_fast(float x) {
    float u = kappa_gelu_u(x);
    float q = kappa_gelu_q[12];
    for (int k = 11; k >= 0; k--) q = q * u + kappa_gelu_q[k];
    float a = -0.5f * x * x;
    float e = kappa_exp_nonpositive(a);
    float lower = e * q;
    return (x < 0 ? lower : 1 - lower) + x * e * 0.39894228040143267794f;
}

// Blocks of 256: the fast path over the block (vectorized), then the rare elements beyond the
// limit (about 6 in 100,000 for standard normal inputs), ±∞ and NaN again with the erfc form.
static inline int kappa_gelu_beyond(float x) { return !((x < 0 ? -x : x) <= KAPPA_GELU_FAST_LIMIT); }
#define KAPPA_GELU_BLOCK 256
KAPPA_CLONES void kappa_gelu_f32(const float *restrict x, float *restrict y, long n) {
    for (long i0 = 0; i0 < n; i0 += KAPPA_GELU_BLOCK) {
        long m = n - i0 < KAPPA_GELU_BLOCK ? n - i0 : KAPPA_GELU_BLOCK;
        const float *restrict xb = x + i0;
        float *restrict yb = y + i0;
        int beyond = 0;
        for (long i = 0; i < m; i++) {
            float v = xb[i];
            yb[i] = v * kappa_normal_cdf_fast(v);
            beyond |= kappa_gelu_beyond(v);
        }
        if (beyond)
            for (long i = 0; i < m; i++)
                if (kappa_gelu_beyond(xb[i])) yb[i] = xb[i] * kappa_normal_cdf(xb[i]);
    }
}
KAPPA_CLONES void kappa_gelu_backward_f32(const float *restrict g, const float *restrict x, float *restrict gx, long n) {
    for (long i0 = 0; i0 < n; i0 += KAPPA_GELU_BLOCK) {
        long m = n - i0 < KAPPA_GELU_BLOCK ? n - i0 : KAPPA_GELU_BLOCK;
        const float *restrict xb = x + i0, *restrict gb = g + i0;
        float *restrict out = gx + i0;
        int beyond = 0;
        for (long i = 0; i < m; i++) {
            float v = xb[i];
            out[i] = gb[i] * kappa_gelu_derivative_fast(v);
            beyond |= kappa_gelu_beyond(v);
        }
        if (beyond)
            for (long i = 0; i < m; i++) {
                float v = xb[i];
                if (!kappa_gelu_beyond(v)) continue;
                float pdf = kappa_expf(-0.5f * v * v) * 0.39894228040143267794f;
                out[i] = gb[i] * (kappa_normal_cdf(v) + v * pdf);
            }
    }
}
KAPPA_CLONES void kappa_relu_f32(const float *restrict x, float *restrict y, long n) {
    for (long i = 0; i < n; i++) y[i] = x[i] > 0 ? x[i] : 0;
}
KAPPA_CLONES void kappa_relu_backward_f32(const float *restrict g, const float *restrict x, float *restrict gx, long n) {
    for (long i = 0; i < n; i++) gx[i] = x[i] > 0 ? g[i] : 0;
}
KAPPA_CLONES void kappa_affine_f32(const float *restrict x, float *restrict y, long n, float a, float b) {
    for (long i = 0; i < n; i++) y[i] = a * x[i] + b;
}
KAPPA_CLONES void kappa_binary_f32(int op, const float *restrict a, const float *restrict b, float *restrict y, long n) {
    switch (op) {
    case 0: for (long i = 0; i < n; i++) y[i] = a[i] + b[i]; break;
    case 1: for (long i = 0; i < n; i++) y[i] = a[i] - b[i]; break;
    case 2: for (long i = 0; i < n; i++) y[i] = a[i] * b[i]; break;
    default: for (long i = 0; i < n; i++) y[i] = a[i] / b[i]; break;
    }
}

// MARK: Rows: softmax, log-softmax, LayerNorm (Float32)

// Rows shorter than a few vectors (attention over 5 or 17 tokens) leave the row loops below
// scalar; 16 such rows at a time go through a transposed block instead, one row per lane.
#define KAPPA_SHORT_ROW 32
#define KAPPA_ROW_LANES 16
static inline __attribute__((always_inline)) void kappa_softmax_short_rows_f32(const float *x, float *y, long rows, long d, int log) {
    float t[KAPPA_SHORT_ROW][KAPPA_ROW_LANES];
    for (long r0 = 0; r0 + KAPPA_ROW_LANES <= rows; r0 += KAPPA_ROW_LANES) {
        for (long l = 0; l < KAPPA_ROW_LANES; l++)
            for (long j = 0; j < d; j++) t[j][l] = x[(r0 + l) * d + j];
        float m[KAPPA_ROW_LANES], s[KAPPA_ROW_LANES];
        for (long l = 0; l < KAPPA_ROW_LANES; l++) { m[l] = -__builtin_inff(); s[l] = 0; }
        for (long j = 0; j < d; j++)
            for (long l = 0; l < KAPPA_ROW_LANES; l++) m[l] = __builtin_fmaxf(m[l], t[j][l]);
        for (long l = 0; l < KAPPA_ROW_LANES; l++) if (m[l] == -__builtin_inff()) m[l] = 0;
        if (log) {
            for (long j = 0; j < d; j++)
                for (long l = 0; l < KAPPA_ROW_LANES; l++) s[l] += kappa_expf(t[j][l] - m[l]);
            for (long l = 0; l < KAPPA_ROW_LANES; l++) m[l] += __builtin_logf(s[l]);
            for (long j = 0; j < d; j++)
                for (long l = 0; l < KAPPA_ROW_LANES; l++) t[j][l] -= m[l];
        } else {
            for (long j = 0; j < d; j++)
                for (long l = 0; l < KAPPA_ROW_LANES; l++) {
                    float e = kappa_expf(t[j][l] - m[l]);
                    t[j][l] = e;
                    s[l] += e;
                }
            for (long l = 0; l < KAPPA_ROW_LANES; l++) s[l] = 1 / s[l];
            for (long j = 0; j < d; j++)
                for (long l = 0; l < KAPPA_ROW_LANES; l++) t[j][l] *= s[l];
        }
        for (long l = 0; l < KAPPA_ROW_LANES; l++)
            for (long j = 0; j < d; j++) y[(r0 + l) * d + j] = t[j][l];
    }
}

KAPPA_CLONES void kappa_softmax_rows_f32(const float *x, float *y, long rows, long d, int log) {
    _Pragma("clang fp reassociate(on)")
    if (d <= KAPPA_SHORT_ROW && rows >= KAPPA_ROW_LANES) {
        long blocked = rows / KAPPA_ROW_LANES * KAPPA_ROW_LANES;
        kappa_softmax_short_rows_f32(x, y, blocked, d, log);
        x += blocked * d; y += blocked * d; rows -= blocked;
    }
    for (long r = 0; r < rows; r++) {
        const float *restrict xr = x + r * d;
        float *restrict yr = y + r * d;
        // A NaN is skipped by the maximum but still propagates through the sum.
        float m = -__builtin_inff();
        for (long j = 0; j < d; j++) m = __builtin_fmaxf(m, xr[j]);  // fmax ignores a NaN
        if (m == -__builtin_inff()) m = 0;  // all −∞: exp gives 0s, and log 0 = −∞
        float s = 0;
        for (long j = 0; j < d; j++) {
            float e = kappa_expf(xr[j] - m);
            yr[j] = e;
            s += e;
        }
        if (log) {
            float ls = m + __builtin_logf(s);
            for (long j = 0; j < d; j++) yr[j] = xr[j] - ls;
        } else {
            float inv = 1 / s;
            for (long j = 0; j < d; j++) yr[j] *= inv;
        }
    }
}

KAPPA_CLONES void kappa_softmax_backward_rows_f32(const float *g, const float *y, float *gx, long rows, long d, int log) {
    _Pragma("clang fp reassociate(on)")
    for (long r = 0; r < rows; r++) {
        const float *restrict gr = g + r * d, *restrict yr = y + r * d;
        float *restrict out = gx + r * d;
        float s = 0;
        if (log) {
            for (long j = 0; j < d; j++) s += gr[j];
            for (long j = 0; j < d; j++) out[j] = gr[j] - kappa_expf(yr[j]) * s;
        } else {
            for (long j = 0; j < d; j++) s += gr[j] * yr[j];
            for (long j = 0; j < d; j++) out[j] = yr[j] * (gr[j] - s);
        }
    }
}

KAPPA_CLONES void kappa_layernorm_rows_f32(const float *x, const float *w, const float *b, float *y, float *stats,
                                           long rows, long d, float eps) {
    _Pragma("clang fp reassociate(on)")
    for (long r = 0; r < rows; r++) {
        const float *restrict xr = x + r * d;
        float *restrict yr = y + r * d;
        float s = 0;
        for (long j = 0; j < d; j++) s += xr[j];
        float mean = s / (float)d, v = 0;
        for (long j = 0; j < d; j++) {
            float c = xr[j] - mean;
            v += c * c;
        }
        float rstd = 1 / __builtin_sqrtf(v / (float)d + eps);
        stats[2 * r] = mean;
        stats[2 * r + 1] = rstd;
        if (w && b) {
            for (long j = 0; j < d; j++) yr[j] = (xr[j] - mean) * rstd * w[j] + b[j];
        } else if (w) {
            for (long j = 0; j < d; j++) yr[j] = (xr[j] - mean) * rstd * w[j];
        } else if (b) {
            for (long j = 0; j < d; j++) yr[j] = (xr[j] - mean) * rstd + b[j];
        } else {
            for (long j = 0; j < d; j++) yr[j] = (xr[j] - mean) * rstd;
        }
    }
}

KAPPA_CLONES void kappa_layernorm_backward_rows_f32(const float *x, const float *w, const float *g, const float *stats,
                                                    float *gx, long rows, long d) {
    _Pragma("clang fp reassociate(on)")
    for (long r = 0; r < rows; r++) {
        const float *restrict xr = x + r * d, *restrict gr = g + r * d;
        float *restrict out = gx + r * d;
        float mean = stats[2 * r], rstd = stats[2 * r + 1];
        float sg = 0, sgx = 0;
        for (long j = 0; j < d; j++) {
            float gh = w ? gr[j] * w[j] : gr[j];
            sg += gh;
            sgx += gh * (xr[j] - mean) * rstd;
        }
        float mg = sg / (float)d, mgx = sgx / (float)d;
        for (long j = 0; j < d; j++) {
            float gh = w ? gr[j] * w[j] : gr[j];
            out[j] = (gh - mg - (xr[j] - mean) * rstd * mgx) * rstd;
        }
    }
}

KAPPA_CLONES void kappa_layernorm_param_grads_f32(const float *x, const float *g, const float *stats, float *gw,
                                                  float *gb, long rows, long d) {
    for (long r = 0; r < rows; r++) {
        const float *restrict xr = x + r * d, *restrict gr = g + r * d;
        float mean = stats[2 * r], rstd = stats[2 * r + 1];
        for (long j = 0; j < d; j++) {
            gw[j] += gr[j] * (xr[j] - mean) * rstd;
            gb[j] += gr[j];
        }
    }
}

// MARK: The vMF normalizer's large-order approximation (Float32)

// log x for x > 0 (Cephes' logf: x = m·2^e with m in [√½, √2), a degree-8 polynomial in
// m − 1); +∞ → +∞, 0 → −∞, NaN propagates. Relative error about 1 ulp.
static inline float kappa_logf(float x) {
    uint32_t bits;
    memcpy(&bits, &x, 4);
    int32_t e = (int32_t)((bits >> 23) & 0xff) - 126;
    uint32_t mb = (bits & 0x7fffff) | 0x3f000000;  // m in [0.5, 1)
    float m;
    memcpy(&m, &mb, 4);
    int small = m < 0.707106781186547524f;
    e -= small;
    m = small ? m + m - 1 : m - 1;
    float z = m * m;
    float p = 7.0376836292e-2f;
    p = p * m - 1.1514610310e-1f;
    p = p * m + 1.1676998740e-1f;
    p = p * m - 1.2420140846e-1f;
    p = p * m + 1.4249322787e-1f;
    p = p * m - 1.6668057665e-1f;
    p = p * m + 2.0000714765e-1f;
    p = p * m - 2.4999993993e-1f;
    p = p * m + 3.3333331174e-1f;
    float y = p * m * z;
    float fe = (float)e;
    y += -2.12194440e-4f * fe;
    y += -0.5f * z;
    float r = m + y + 0.693359375f * fe;
    return x != x ? x : (x == __builtin_inff() ? x : (x == 0 ? -__builtin_inff() : r));
}

KAPPA_CLONES long kappa_vmf_logcp_approx_f32(const float *restrict kappa, float *restrict out, long n, float nu, float c) {
    long negative = 0;
    _Pragma("clang loop interleave_count(2)")
    for (long i = 0; i < n; i++) {
        float k = kappa[i];
        negative += k < 0;
        float s2 = nu * nu + k * k, s = __builtin_sqrtf(s2);
        out[i] = nu * kappa_logf(nu + s) - s + 0.25f * kappa_logf(s2) - c;
    }
    return negative;
}

KAPPA_CLONES void kappa_vmf_logcp_approx_backward_f32(const float *restrict g, const float *restrict kappa,
                                                      float *restrict gk, long n, float nu) {
    for (long i = 0; i < n; i++) {
        float k = kappa[i];
        float s2 = nu * nu + k * k, s = __builtin_sqrtf(s2);
        gk[i] = g[i] * (-k / (nu + s) + k / (2 * s2));
    }
}
