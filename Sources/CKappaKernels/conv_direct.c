// Direct convolutions in Float32 for CPUs with AVX-512: see include/kappa_kernels.h. The
// shifted-product path (Conv.swift) copies each image into a padded layout, runs kh·kw small
// products and copies the result out; on a narrow ResNet those copies cost as much as the
// products. Here the image is read in place: the output plane is walked 16 pixels at a time,
// and a tap of a 16-pixel block reads the 16 source pixels one fixed offset away,
// dy·w + dx with dy, dx in {−1, 0, 1}, through a masked load whose mask drops the lanes that
// fall outside the image (the zero padding) or past the plane. A masked load does not touch
// the memory of its dropped lanes, so no padded copy is needed. Each block of 8 output
// channels × 32 pixels accumulates all taps and input channels in registers and is stored
// once.
//
// A 3×3 convolution at stride 1 with padding 1 is nine taps on the image itself. At stride 2
// the image is first split into its four phases (pixels (2y + a, 2x + b)) on the output's
// grid, and tap (i, j) reads phase ((i + 1) mod 2, (j + 1) mod 2) at dy = −1 for i = 0 and 0
// otherwise (dx likewise); a 1×1 convolution at stride 2 is one tap on phase (0, 0).
#include "kappa_kernels.h"

#if defined(__x86_64__) && defined(__clang__)
#include <immintrin.h>
#include <stdlib.h>

// The mask tables live in a caller's buffer on the stack up to this many blocks (a plane of
// 64K pixels; 150 KB for both tables) and on the heap beyond (thousands of small images stacked
// in one chunk), so a worker thread's stack (4 MB) never overflows.
#define KAPPA_STACK_BLOCKS 4096L

#define KAPPA_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))

int kappa_conv_direct_available(void) { return kappa_cpu_vector_level() >= 3; }
#if defined(__OPTIMIZE__)
int kappa_conv_direct_optimized(void) { return 1; }
#else
int kappa_conv_direct_optimized(void) { return 0; }
#endif

/// For each 16-pixel block k of a plane of `stack` h × w images one above the other and each
/// direction d = 3(dy + 1) + (dx + 1): the lanes whose source pixel (y + dy, x + dx) lies
/// inside the same image (and whose pixel is inside the plane), at masks[9k + d]; and at
/// masks[blocks·9 + k] the lanes inside the plane.
static void conv_masks(long h, long w, long stack, __mmask16 *masks) {
    long plane = stack * h * w, blocks = (plane + 15) / 16;
    long y = 0, x = 0;  // the pixel of lane l of block k, walked without divisions
    for (long k = 0; k < blocks; k++) {
        unsigned dir[9] = {0}, inside = 0;
        for (long l = 0; l < 16 && 16 * k + l < plane; l++) {
            unsigned bit = 1u << l;
            inside |= bit;
            unsigned rows = (y > 0 ? 1u : 0u) | 2u | (y + 1 < h ? 4u : 0u);  // dy = −1, 0, 1 inside
            unsigned cols = (x > 0 ? 1u : 0u) | 2u | (x + 1 < w ? 4u : 0u);
            for (long i = 0; i < 3; i++)
                if (rows >> i & 1)
                    for (long j = 0; j < 3; j++)
                        if (cols >> j & 1) dir[i * 3 + j] |= bit;
            if (++x == w) {
                x = 0;
                if (++y == h) y = 0;
            }
        }
        for (long d = 0; d < 9; d++) masks[k * 9 + d] = (__mmask16)dir[d];
        masks[blocks * 9 + k] = (__mmask16)inside;
    }
}

/// `count` masks in `local` (KAPPA_STACK_BLOCKS · 10 of them) when they fit, else on the heap;
/// release with release_masks.
static __mmask16 *mask_buffer(long count, __mmask16 *local) {
    if (count <= KAPPA_STACK_BLOCKS * 10) return local;
    __mmask16 *m = malloc(sizeof(__mmask16) * count);
    if (!m) __builtin_trap();
    return m;
}
static void release_masks(__mmask16 *m, __mmask16 *local) {
    if (m != local) free(m);
}

/// A convolution as a list of taps: tap t reads source channel ci at
/// src + base[t] + ci·plane + p + off(dir[t]), masked by direction dir[t], with the weights
/// wt[(t·c + ci)·o + oc].
typedef struct {
    long taps;
    long base[9];
    int dir[9];
} conv_taps;

// One block of OB output channels × 32 pixels (blocks k and k + 1) of one image.
#define CONV_BLOCK(OB)                                                                                             \
    do {                                                                                                           \
        __m512 acc[OB][2];                                                                                         \
        _Pragma("clang loop unroll(full)") for (int j = 0; j < OB; j++) acc[j][0] = acc[j][1] = _mm512_setzero_ps(); \
        for (long t = 0; t < tp->taps; t++) {                                                                      \
            int d = tp->dir[t];                                                                                    \
            __mmask16 m0 = masks[k * 9 + d], m1 = two ? masks[(k + 1) * 9 + d] : 0;                                \
            const float *xs = x + tp->base[t] + 16 * k + off[d];                                                   \
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

/// output[n][oc] (images out_stride apart) from input[n] (in_stride apart) through the taps,
/// with the grid's masks (conv_masks).
KAPPA_AVX512 static void conv_forward(const float *input, long in_stride, long images, long c, long h, long w,
                                      long stack, const __mmask16 *masks, const conv_taps *tp, const float *wt,
                                      long o, float *output, long out_stride) {
    long plane = stack * h * w, blocks = (plane + 15) / 16;
    const __mmask16 *inside = masks + blocks * 9;
    long off[9];
    for (long d = 0; d < 9; d++) off[d] = (d / 3 - 1) * w + (d % 3 - 1);
    for (long n = 0; n < images; n++) {
        const float *x = input + n * in_stride;
        float *y = output + n * out_stride;
        long ob = 0;
        for (; ob + 8 <= o; ob += 8)
            for (long k = 0; k < blocks; k += 2) {
                int two = k + 1 < blocks;
                CONV_BLOCK(8);
            }
        for (; ob + 4 <= o; ob += 4)
            for (long k = 0; k < blocks; k += 2) {
                int two = k + 1 < blocks;
                CONV_BLOCK(4);
            }
        for (; ob < o; ob++)
            for (long k = 0; k < blocks; k += 2) {
                int two = k + 1 < blocks;
                CONV_BLOCK(1);
            }
    }
}

// dw[oc][ci][t] += Σ_pixels g[oc][p]·src[ci][p + tap t] (masked) for OB output channels and
// TAPS taps at once.
#define CONV_WEIGHT_BLOCK(OB, TAPS)                                                                                \
    do {                                                                                                           \
        for (long ci = 0; ci < c; ci++) {                                                                          \
            __m512 acc[OB][TAPS];                                                                                  \
            _Pragma("clang loop unroll(full)") for (int j = 0; j < OB; j++)                                        \
                _Pragma("clang loop unroll(full)") for (int t = 0; t < TAPS; t++) acc[j][t] = _mm512_setzero_ps(); \
            for (long n = 0; n < images; n++) {                                                                    \
                const float *xs = input + n * in_stride + ci * plane;                                              \
                const float *gs = grad + n * g_stride + ob * plane;                                                \
                for (long k = 0; k < blocks; k++) {                                                                \
                    __m512 gv[OB];                                                                                 \
                    _Pragma("clang loop unroll(full)") for (int j = 0; j < OB; j++)                                \
                        gv[j] = _mm512_maskz_loadu_ps(inside[k], gs + j * plane + 16 * k);                         \
                    _Pragma("clang loop unroll(full)") for (int t = 0; t < TAPS; t++) {                            \
                        __m512 xv = _mm512_maskz_loadu_ps(tmask[k * TAPS + t], xs + xoff[t] + 16 * k);             \
                        _Pragma("clang loop unroll(full)") for (int j = 0; j < OB; j++)                            \
                            acc[j][t] = _mm512_fmadd_ps(gv[j], xv, acc[j][t]);                                     \
                    }                                                                                              \
                }                                                                                                  \
            }                                                                                                      \
            _Pragma("clang loop unroll(full)") for (int j = 0; j < OB; j++)                                        \
                _Pragma("clang loop unroll(full)") for (int t = 0; t < TAPS; t++)                                  \
                    dw[((ob + j) * c + ci) * TAPS + t] += _mm512_reduce_add_ps(acc[j][t]);                         \
        }                                                                                                          \
    } while (0)

/// dw[oc][ci][t] += Σ_n,p grad[n][oc][p] · (tap t of input[n][ci] at p), for 9 taps or 1, over
/// the images in groups of `group` (each group's sums reduced and added to dw in turn).
KAPPA_AVX512 static void conv_weight_grad(const float *all_input, long in_stride, const float *all_grad,
                                          long g_stride, long all_images, long group, long c, long h, long w,
                                          long stack, const conv_taps *tp, long o, float *dw) {
    long plane = stack * h * w, blocks = (plane + 15) / 16;
    __mmask16 local[KAPPA_STACK_BLOCKS * 10], local_t[KAPPA_STACK_BLOCKS * 10];
    __mmask16 *masks = mask_buffer(blocks * 10, local), *tmask = mask_buffer(blocks * tp->taps, local_t);
    conv_masks(h, w, stack, masks);
    const __mmask16 *inside = masks + blocks * 9;
    // Each tap's source offset and, block by block, its mask, in tap order (no lookups through
    // the tap's direction in the inner loop).
    long xoff[9];
    for (long t = 0; t < tp->taps; t++) {
        int d = tp->dir[t];
        xoff[t] = tp->base[t] + (d / 3 - 1) * w + (d % 3 - 1);
        for (long k = 0; k < blocks; k++) tmask[k * tp->taps + t] = masks[k * 9 + d];
    }
    for (long first = 0; first < all_images; first += group) {
        const float *input = all_input + first * in_stride, *grad = all_grad + first * g_stride;
        long images = all_images - first < group ? all_images - first : group, ob = 0;
        if (tp->taps == 9) {
            for (; ob + 3 <= o; ob += 3) CONV_WEIGHT_BLOCK(3, 9);
            for (; ob + 2 <= o; ob += 2) CONV_WEIGHT_BLOCK(2, 9);
            for (; ob < o; ob++) CONV_WEIGHT_BLOCK(1, 9);
        } else {
            for (; ob + 8 <= o; ob += 8) CONV_WEIGHT_BLOCK(8, 1);
            for (; ob < o; ob++) CONV_WEIGHT_BLOCK(1, 1);
        }
    }
    release_masks(masks, local);
    release_masks(tmask, local_t);
}

/// The taps of the forward: stride 1, 3×3 (the image itself); stride 2, 3×3 (the phases,
/// phase_stride apart); stride 2, 1×1 (phase (0, 0)).
static conv_taps forward_taps(long stride, long kernel, long phase_stride) {
    conv_taps tp = {0};
    if (kernel == 1) {
        tp.taps = 1;
        tp.dir[0] = 4;
        return tp;
    }
    tp.taps = 9;
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++) {
            int t = i * 3 + j;
            if (stride == 1) {
                tp.dir[t] = t;
            } else {
                long a = (i + 1) % 2, b = (j + 1) % 2;
                tp.base[t] = (a * 2 + b) * phase_stride;
                tp.dir[t] = (i == 0 ? 0 : 1) * 3 + (j == 0 ? 0 : 1);
            }
        }
    return tp;
}

KAPPA_AVX512 void kappa_conv_direct_forward_f32(const float *input, long in_stride, long images, long c, long h,
                                                long w, long stack, long stride, long kernel, long phase_stride,
                                                const float *wt, long o, float *output, long out_stride) {
    conv_taps tp = forward_taps(stride, kernel, phase_stride);
    __mmask16 local[KAPPA_STACK_BLOCKS * 10], *masks = mask_buffer((stack * h * w + 15) / 16 * 10, local);
    conv_masks(h, w, stack, masks);
    conv_forward(input, in_stride, images, c, h, w, stack, masks, &tp, wt, o, output, out_stride);
    release_masks(masks, local);
}

void kappa_conv_direct_weight_grad_f32(const float *input, long in_stride, const float *grad, long g_stride,
                                       long images, long group, long c, long h, long w, long stack, long stride,
                                       long kernel, long phase_stride, long o, float *dw) {
    conv_taps tp = forward_taps(stride, kernel, phase_stride);
    conv_weight_grad(input, in_stride, grad, g_stride, images, group, c, h, w, stack, &tp, o, dw);
}

KAPPA_AVX512 void kappa_conv_direct_input_grad_f32(const float *grad, long g_stride, long images, long o, long h,
                                                   long w, long stack, long stride, long kernel, long phase_stride,
                                                   const float *wtb, long c, float *dinput, long d_stride) {
    __mmask16 local[KAPPA_STACK_BLOCKS * 10], *masks = mask_buffer((stack * h * w + 15) / 16 * 10, local);
    conv_masks(h, w, stack, masks);  // once for every phase
    if (stride == 1) {
        // The forward's taps flipped: wtb is [9][o][c] with tap t holding the forward's 8 − t.
        conv_taps tp = forward_taps(1, 3, 0);
        conv_forward(grad, g_stride, images, o, h, w, stack, masks, &tp, wtb, c, dinput, d_stride);
        release_masks(masks, local);
        return;
    }
    // Phase by phase: the taps that read phase φ, each at the opposite direction, give that
    // phase of the input gradient; wtb holds their weights transposed, [o][c] per tap, the
    // taps in phase order (kappa_conv_direct_backward_taps_f32).
    conv_taps f = forward_taps(stride, kernel, phase_stride);
    long phases = kernel == 1 ? 1 : 4, first = 0;
    for (long ph = 0; ph < phases; ph++) {
        conv_taps tp = {0};
        for (long t = 0; t < f.taps; t++)
            if (f.base[t] == ph * phase_stride) tp.dir[tp.taps++] = 8 - f.dir[t];
        conv_forward(grad, g_stride, images, o, h, w, stack, masks, &tp, wtb + first * o * c, c,
                     dinput + ph * phase_stride, d_stride);
        first += tp.taps;
    }
    release_masks(masks, local);
}

#endif

// Weights [o][c][k][k] → the forward's taps [t][c][o].
void kappa_conv_direct_forward_taps_f32(const float *w, long o, long c, long kernel, float *wt) {
    long kk = kernel * kernel;
    for (long oi = 0; oi < o; oi++)
        for (long ci = 0; ci < c; ci++)
            for (long t = 0; t < kk; t++) wt[(t * c + ci) * o + oi] = w[(oi * c + ci) * kk + t];
}

// Weights [o][c][k][k] → the input gradient's taps [t][o][c]: at stride 1 tap t holds the
// forward's tap 8 − t; at stride 2 the forward's taps in the order of the phase they read.
void kappa_conv_direct_backward_taps_f32(const float *w, long o, long c, long stride, long kernel, float *wtb) {
    long kk = kernel * kernel;
    long order[9], n = 0;
    if (stride == 1) {
        for (long t = 0; t < kk; t++) order[n++] = kk - 1 - t;
    } else {
        for (long ph = 0; ph < (kernel == 1 ? 1 : 4); ph++)
            for (long t = 0; t < kk; t++) {
                long i = t / kernel, j = t % kernel;
                long a = kernel == 1 ? 0 : (i + 1) % 2, b = kernel == 1 ? 0 : (j + 1) % 2;
                if (a * 2 + b == ph) order[n++] = t;
            }
    }
    for (long s = 0; s < n; s++)
        for (long oi = 0; oi < o; oi++)
            for (long ci = 0; ci < c; ci++) wtb[(s * o + oi) * c + ci] = w[(oi * c + ci) * kk + order[s]];
}

#if !(defined(__x86_64__) && defined(__clang__))

int kappa_conv_direct_available(void) { return 0; }
int kappa_conv_direct_optimized(void) { return 0; }
void kappa_conv_direct_forward_f32(const float *input, long in_stride, long images, long c, long h, long w,
                                   long stack, long stride, long kernel, long phase_stride, const float *wt, long o,
                                   float *output, long out_stride) {
    (void)input, (void)in_stride, (void)images, (void)c, (void)h, (void)w, (void)stack, (void)stride, (void)kernel;
    (void)phase_stride, (void)wt, (void)o, (void)output, (void)out_stride;
    __builtin_trap();  // callers check kappa_conv_direct_available() first
}
void kappa_conv_direct_weight_grad_f32(const float *input, long in_stride, const float *grad, long g_stride,
                                       long images, long group, long c, long h, long w, long stack, long stride,
                                       long kernel, long phase_stride, long o, float *dw) {
    (void)input, (void)in_stride, (void)grad, (void)g_stride, (void)images, (void)group, (void)c, (void)h, (void)w;
    (void)stack;
    (void)stride, (void)kernel, (void)phase_stride, (void)o, (void)dw;
    __builtin_trap();
}
void kappa_conv_direct_input_grad_f32(const float *grad, long g_stride, long images, long o, long h, long w,
                                      long stack, long stride, long kernel, long phase_stride, const float *wtb,
                                      long c, float *dinput, long d_stride) {
    (void)grad, (void)g_stride, (void)images, (void)o, (void)h, (void)w, (void)stack, (void)stride, (void)kernel;
    (void)phase_stride, (void)wtb, (void)c, (void)dinput, (void)d_stride;
    __builtin_trap();
}

#endif

// The phases of stride 2 on the output's grid, zero where 2y + a or 2x + b falls past the
// image; and back (every pixel written: phases ≥ count give 0).
void kappa_phase2_f32(const float *x, long images, long c, long h, long w, long oh, long ow, long count, float *dst,
                      long img_stride, long phase_stride, long chan_stride) {
    for (long n = 0; n < images; n++)
        for (long ph = 0; ph < count; ph++) {
            long a = ph / 2, b = ph % 2;
            long valid = (w - b + 1) / 2;  // columns with 2x + b < w
            if (valid > ow) valid = ow;
            for (long ci = 0; ci < c; ci++) {
                const float *src = x + (n * c + ci) * h * w;
                float *d = dst + n * img_stride + ph * phase_stride + ci * chan_stride;
                for (long y = 0; y < oh; y++) {
                    long iy = 2 * y + a;
                    float *restrict row = d + y * ow;
                    if (iy >= h) {
                        for (long xo = 0; xo < ow; xo++) row[xo] = 0;
                        continue;
                    }
                    const float *restrict s = src + iy * w + b;
                    for (long xo = 0; xo < valid; xo++) row[xo] = s[2 * xo];
                    for (long xo = valid; xo < ow; xo++) row[xo] = 0;
                }
            }
        }
}

void kappa_unphase2_f32(const float *src, long images, long c, long h, long w, long oh, long ow, long count,
                        float *x, long img_stride, long phase_stride, long chan_stride) {
    for (long n = 0; n < images; n++)
        for (long ci = 0; ci < c; ci++) {
            float *d = x + (n * c + ci) * h * w;
            if (count < 4)
                for (long i = 0; i < h * w; i++) d[i] = 0;
            for (long ph = 0; ph < count; ph++) {
                long a = ph / 2, b = ph % 2;
                long valid = (w - b + 1) / 2;
                if (valid > ow) valid = ow;
                const float *s = src + n * img_stride + ph * phase_stride + ci * chan_stride;
                for (long y = 0; y < oh && 2 * y + a < h; y++) {
                    const float *restrict row = s + y * ow;
                    float *restrict out = d + (2 * y + a) * w + b;
                    for (long xo = 0; xo < valid; xo++) out[2 * xo] = row[xo];
                }
            }
        }
}

// [images][channels][plane] → [channels][images][plane], or back.
void kappa_stack_images_f32(const float *src, float *dst, long images, long channels, long plane, int back) {
    for (long n = 0; n < images; n++)
        for (long ch = 0; ch < channels; ch++) {
            const float *restrict s = src + (back ? (ch * images + n) : (n * channels + ch)) * plane;
            float *restrict d = dst + (back ? (n * channels + ch) : (ch * images + n)) * plane;
            for (long i = 0; i < plane; i++) d[i] = s[i];
        }
}
