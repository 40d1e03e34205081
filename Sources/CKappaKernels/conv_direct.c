// Direct 3×3 convolution at stride 1 with padding 1 ("same" size), Float32, for CPUs with
// AVX-512: see include/kappa_kernels.h. The im2col / shifted-product path (Conv.swift) copies
// each image into a padded layout, runs nine small products and copies the result out; on a
// narrow ResNet those copies cost as much as the products. Here the image is read in place:
// the output plane is walked 16 pixels at a time, and tap (i, j) of a 16-pixel block reads the
// 16 input pixels one fixed offset away, (i − 1)·w + (j − 1), through a masked load whose mask
// drops the lanes that fall outside the image (the zero padding) or past the plane. A masked
// load does not touch the memory of its dropped lanes, so no padded copy is needed. Each block
// of 8 output channels × 32 pixels accumulates all taps and input channels in registers and is
// stored once.
#include "kappa_kernels.h"

#if defined(__x86_64__) && defined(__clang__)
#include <immintrin.h>

#define KAPPA_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))

int kappa_conv3_direct_available(void) { return kappa_cpu_vector_level() >= 3; }

/// For each 16-pixel block k of a plane of `stack` h × w images one above the other and tap
/// t = 3i + j: the lanes whose input pixel (y + i − 1, x + j − 1) lies inside the same image
/// (and whose pixel is inside the plane); and at masks[blocks·9 + k] the lanes inside the
/// plane. Returns the number of blocks.
static long conv3_masks(long h, long w, long stack, __mmask16 *masks) {
    long plane = stack * h * w, blocks = (plane + 15) / 16;
    for (long k = 0; k < blocks; k++) {
        unsigned tap[9] = {0}, inside = 0;
        for (long l = 0; l < 16; l++) {
            long p = 16 * k + l;
            if (p >= plane) break;
            inside |= 1u << l;
            long y = (p / w) % h, x = p % w;
            for (long i = 0; i < 3; i++)
                for (long j = 0; j < 3; j++) {
                    long iy = y + i - 1, ix = x + j - 1;
                    if (iy >= 0 && iy < h && ix >= 0 && ix < w) tap[i * 3 + j] |= 1u << l;
                }
        }
        for (long t = 0; t < 9; t++) masks[k * 9 + t] = (__mmask16)tap[t];
        masks[blocks * 9 + k] = (__mmask16)inside;
    }
    return blocks;
}

// One block of OB output channels × 32 pixels (blocks k and k + 1) of one image.
#define CONV3_BLOCK(OB)                                                                                            \
    do {                                                                                                           \
        __m512 acc[OB][2];                                                                                         \
        _Pragma("clang loop unroll(full)") for (int j = 0; j < OB; j++) acc[j][0] = acc[j][1] = _mm512_setzero_ps(); \
        for (long t = 0; t < 9; t++) {                                                                             \
            __mmask16 m0 = masks[k * 9 + t], m1 = two ? masks[(k + 1) * 9 + t] : 0;                                \
            const float *xs = x + 16 * k + off[t];                                                                 \
            const float *ws = wt + t * c * o + ob;                                                                 \
            for (long ci = 0; ci < c; ci++) {                                                                      \
                __m512 b0 = _mm512_maskz_loadu_ps(m0, xs + ci * plane);                                            \
                __m512 b1 = _mm512_maskz_loadu_ps(m1, xs + ci * plane + 16);                                       \
                _Pragma("clang loop unroll(full)") for (int j = 0; j < OB; j++) {                                  \
                    __m512 wv = _mm512_set1_ps(ws[ci * o + j]);                                                    \
                    acc[j][0] = _mm512_fmadd_ps(wv, b0, acc[j][0]);                                                \
                    acc[j][1] = _mm512_fmadd_ps(wv, b1, acc[j][1]);                                                \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
        __mmask16 s0 = inside[k], s1 = two ? inside[k + 1] : 0;                                                    \
        _Pragma("clang loop unroll(full)") for (int j = 0; j < OB; j++) {                                          \
            _mm512_mask_storeu_ps(y + (ob + j) * plane + 16 * k, s0, acc[j][0]);                                   \
            _mm512_mask_storeu_ps(y + (ob + j) * plane + 16 * k + 16, s1, acc[j][1]);                              \
        }                                                                                                          \
    } while (0)

KAPPA_AVX512 static void conv3_forward(const float *input, long images, long c, long h, long w, long stack,
                                       const float *wt, long o, float *output) {
    long plane = stack * h * w, blocks = (plane + 15) / 16;
    __mmask16 masks[blocks * 10];
    conv3_masks(h, w, stack, masks);
    const __mmask16 *inside = masks + blocks * 9;
    long off[9];
    for (long t = 0; t < 9; t++) off[t] = (t / 3 - 1) * w + (t % 3 - 1);
    for (long n = 0; n < images; n++) {
        const float *x = input + n * c * plane;
        float *y = output + n * o * plane;
        long ob = 0;
        for (; ob + 8 <= o; ob += 8)
            for (long k = 0; k < blocks; k += 2) {
                int two = k + 1 < blocks;
                CONV3_BLOCK(8);
            }
        for (; ob + 4 <= o; ob += 4)
            for (long k = 0; k < blocks; k += 2) {
                int two = k + 1 < blocks;
                CONV3_BLOCK(4);
            }
        for (; ob < o; ob++)
            for (long k = 0; k < blocks; k += 2) {
                int two = k + 1 < blocks;
                CONV3_BLOCK(1);
            }
    }
}

// dw[o][ci][t] += Σ_pixels g[o][p]·x[ci][p + off[t]] (masked) for OB output channels at once.
#define CONV3_WEIGHT_BLOCK(OB)                                                                                     \
    do {                                                                                                           \
        for (long ci = 0; ci < c; ci++) {                                                                          \
            __m512 acc[OB][9];                                                                                     \
            _Pragma("clang loop unroll(full)") for (int j = 0; j < OB; j++)                                        \
                _Pragma("clang loop unroll(full)") for (int t = 0; t < 9; t++) acc[j][t] = _mm512_setzero_ps();    \
            for (long n = 0; n < images; n++) {                                                                    \
                const float *xs = input + (n * c + ci) * plane;                                                    \
                const float *gs = grad + (n * o + ob) * plane;                                                     \
                for (long k = 0; k < blocks; k++) {                                                                \
                    __m512 gv[OB];                                                                                 \
                    _Pragma("clang loop unroll(full)") for (int j = 0; j < OB; j++)                                \
                        gv[j] = _mm512_maskz_loadu_ps(inside[k], gs + j * plane + 16 * k);                         \
                    _Pragma("clang loop unroll(full)") for (int t = 0; t < 9; t++) {                               \
                        __m512 xv = _mm512_maskz_loadu_ps(masks[k * 9 + t], xs + 16 * k + off[t]);                 \
                        _Pragma("clang loop unroll(full)") for (int j = 0; j < OB; j++)                            \
                            acc[j][t] = _mm512_fmadd_ps(gv[j], xv, acc[j][t]);                                     \
                    }                                                                                              \
                }                                                                                                  \
            }                                                                                                      \
            _Pragma("clang loop unroll(full)") for (int j = 0; j < OB; j++)                                        \
                _Pragma("clang loop unroll(full)") for (int t = 0; t < 9; t++)                                     \
                    dw[((ob + j) * c + ci) * 9 + t] += _mm512_reduce_add_ps(acc[j][t]);                            \
        }                                                                                                          \
    } while (0)

KAPPA_AVX512 static void conv3_weight_grad(const float *input, const float *grad, long images, long c, long h,
                                           long w, long stack, long o, float *dw) {
    long plane = stack * h * w, blocks = (plane + 15) / 16;
    __mmask16 masks[blocks * 10];
    conv3_masks(h, w, stack, masks);
    const __mmask16 *inside = masks + blocks * 9;
    long off[9];
    for (long t = 0; t < 9; t++) off[t] = (t / 3 - 1) * w + (t % 3 - 1);
    long ob = 0;
    for (; ob + 3 <= o; ob += 3) CONV3_WEIGHT_BLOCK(3);
    for (; ob < o; ob++) CONV3_WEIGHT_BLOCK(1);
}

void kappa_conv3_forward_f32(const float *input, long images, long c, long h, long w, const float *wt, long o,
                             float *output) {
    conv3_forward(input, images, c, h, w, 1, wt, o, output);
}
void kappa_conv3_weight_grad_f32(const float *input, const float *grad, long images, long c, long h, long w, long o,
                                 float *dw) {
    conv3_weight_grad(input, grad, images, c, h, w, 1, o, dw);
}
void kappa_conv3_forward_stacked_f32(const float *input, long stack, long c, long h, long w, const float *wt, long o,
                                     float *output) {
    conv3_forward(input, 1, c, h, w, stack, wt, o, output);
}
void kappa_conv3_weight_grad_stacked_f32(const float *input, const float *grad, long stack, long c, long h, long w,
                                         long o, float *dw) {
    conv3_weight_grad(input, grad, 1, c, h, w, stack, o, dw);
}

#else

int kappa_conv3_direct_available(void) { return 0; }
void kappa_conv3_forward_f32(const float *input, long images, long c, long h, long w, const float *wt, long o,
                             float *output) {
    (void)input, (void)images, (void)c, (void)h, (void)w, (void)wt, (void)o, (void)output;
    __builtin_trap();  // callers check kappa_conv3_direct_available() first
}
void kappa_conv3_weight_grad_f32(const float *input, const float *grad, long images, long c, long h, long w, long o,
                                 float *dw) {
    (void)input, (void)grad, (void)images, (void)c, (void)h, (void)w, (void)o, (void)dw;
    __builtin_trap();
}
void kappa_conv3_forward_stacked_f32(const float *input, long stack, long c, long h, long w, const float *wt, long o,
                                     float *output) {
    (void)input, (void)stack, (void)c, (void)h, (void)w, (void)wt, (void)o, (void)output;
    __builtin_trap();
}
void kappa_conv3_weight_grad_stacked_f32(const float *input, const float *grad, long stack, long c, long h, long w,
                                         long o, float *dw) {
    (void)input, (void)grad, (void)stack, (void)c, (void)h, (void)w, (void)o, (void)dw;
    __builtin_trap();
}

#endif
