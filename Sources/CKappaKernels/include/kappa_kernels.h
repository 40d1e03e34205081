// Kappa's hot kernels in C, each compiled for several x86-64 levels (AVX-512, AVX2 + FMA,
// baseline) with `target_clones` and chosen once per process by the dynamic loader (ifunc),
// so that a plain `swift build -c release` runs the host's vector units and the package
// still builds with no compiler flags and runs on any x86-64 and on arm64.
//
// Every kernel works on raw contiguous buffers; the Swift side checks shapes and splits the
// work over cores. `_f32` and `_f64` variants share one definition (a macro per kernel).
#ifndef KAPPA_KERNELS_H
#define KAPPA_KERNELS_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/// The vector level this process's kernels run at: 3 AVX-512 (F, BW, DQ, VL), 2 AVX2 and
/// FMA, 0 baseline (or not x86-64).
int kappa_cpu_vector_level(void);

/// The geometry of a 2-D convolution on one image (sizes in elements).
typedef struct {
    long c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow;
} kappa_conv_geometry;

// The image [c, h, w] with zero padding: padded [c, h + 2ph, w + 2pw]; and back (the interior).
void kappa_pad_f32(const float *img, float *padded, long c, long h, long w, long ph, long pw);
void kappa_pad_f64(const double *img, double *padded, long c, long h, long w, long ph, long pw);
void kappa_unpad_f32(const float *padded, float *img, long c, long h, long w, long ph, long pw);
void kappa_unpad_f64(const double *padded, double *img, long c, long h, long w, long ph, long pw);
// cols[(ci·kh + i)·kw + j][y·ow + x] = padded[ci][y·sh + i·dh][x·sw + j·dw], from the padded
// image; rows of cols are row_stride apart (several images can share one column matrix).
void kappa_im2col_f32(const float *padded, float *cols, const kappa_conv_geometry *g, long row_stride);
void kappa_im2col_f64(const double *padded, double *cols, const kappa_conv_geometry *g, long row_stride);
// The adjoint of im2col: padded[...] += cols[...].
void kappa_col2im_f32(const float *cols, float *padded, const kappa_conv_geometry *g, long row_stride);
void kappa_col2im_f64(const double *cols, double *padded, const kappa_conv_geometry *g, long row_stride);
// On the "wide" grid of a stride-1 convolution, output rows are as wide as the padded image
// (w + 2pw; the first ow are the output, the rest are dropped), so that tap (i, j) of the
// kernel reads the padded image at one fixed offset (Conv.swift).
// [images, rows, oh, ow] <-> [rows, images·oh·width] (width ≥ ow, the extra columns 0 when
// widening and dropped when narrowing): image n's block of row r at column n·oh·width.
void kappa_widen_f32(const float *src, float *dst, long images, long rows, long oh, long ow, long width);
void kappa_widen_f64(const double *src, double *dst, long images, long rows, long oh, long ow, long width);
void kappa_narrow_f32(const float *src, float *dst, long images, long rows, long oh, long ow, long width);
void kappa_narrow_f64(const double *src, double *dst, long images, long rows, long oh, long ow, long width);

// Batch normalization over [n, c, l] (channel axis in the middle, l contiguous), for the
// channels c0..<c1. Statistics: mean and 1/sqrt(var + eps) (biased variance, two passes,
// sums in double); var_out receives the biased variance.
void kappa_bn_stats_f32(const float *x, long n, long c, long l, long c0, long c1, double eps,
                        float *mean, float *var_out, float *invstd);
void kappa_bn_stats_f64(const double *x, long n, long c, long l, long c0, long c1, double eps,
                        double *mean, double *var_out, double *invstd);
// y = x·scale[ch] + shift[ch] (optionally max(·, 0)).
void kappa_bn_apply_f32(const float *x, float *y, long n, long c, long l, long c0, long c1,
                        const float *scale, const float *shift, int relu);
void kappa_bn_apply_f64(const double *x, double *y, long n, long c, long l, long c0, long c1,
                        const double *scale, const double *shift, int relu);
// Per-channel sums of the backward pass: sum_g[ch] = Σ g, sum_gx[ch] = Σ g·(x − mean[ch]),
// in double. With `y` (the output of a fused ReLU) g is taken as 0 where y ≤ 0.
void kappa_bn_backward_sums_f32(const float *x, const float *g, const float *y, long n, long c, long l, long c0,
                                long c1, const float *mean, double *sum_g, double *sum_gx);
void kappa_bn_backward_sums_f64(const double *x, const double *g, const double *y, long n, long c, long l, long c0,
                                long c1, const double *mean, double *sum_g, double *sum_gx);
// gx = a[ch]·g + b[ch]·(x − mean[ch]) + d[ch], g masked by y > 0 when y is given.
void kappa_bn_backward_input_f32(const float *x, const float *g, const float *y, float *gx, long n, long c, long l,
                                 long c0, long c1, const float *mean, const float *a, const float *b, const float *d);
void kappa_bn_backward_input_f64(const double *x, const double *g, const double *y, double *gx, long n, long c, long l,
                                 long c0, long c1, const double *mean, const double *a, const double *b, const double *d);

#ifdef __cplusplus
}
#endif

#endif
