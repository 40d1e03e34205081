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

/// A hint to the core that the thread is spin-waiting (x86 `pause`, arm64 `yield`).
static inline void kappa_spin_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/// The geometry of a 2-D convolution on one image (sizes in elements).
typedef struct {
    long c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow;
} kappa_conv_geometry;

// cols[(ci·kh + i)·kw + j][y·ow + x] = padded[ci][y·sh + i·dh][x·sw + j·dw], from the padded
// image; rows of cols are row_stride apart (several images can share one column matrix).
void kappa_im2col_f32(const float *padded, float *cols, const kappa_conv_geometry *g, long row_stride);
void kappa_im2col_f64(const double *padded, double *cols, const kappa_conv_geometry *g, long row_stride);
// The adjoint of im2col: padded[...] += cols[...].
void kappa_col2im_f32(const float *cols, float *padded, const kappa_conv_geometry *g, long row_stride);
void kappa_col2im_f64(const double *cols, double *padded, const kappa_conv_geometry *g, long row_stride);
// The padded image split into its sh·sw phases: buf[ci][a][b][y][x] = padded[ci][y·sh + a][x·sw + b]
// (0 outside the image), each phase hq × wq; and back (the image's elements only). At
// stride 1 there is one phase, the padded image. On this "wide" grid (output rows wq wide,
// the columns past ow dropped), tap (i, j) of a kernel reads one phase at one fixed offset,
// so a convolution is a sum of products with the phases read in place (Conv.swift).
void kappa_phase_f32(const float *img, float *buf, long c, long h, long w, long ph, long pw, long sh, long sw, long hq,
                     long wq);
void kappa_phase_f64(const double *img, double *buf, long c, long h, long w, long ph, long pw, long sh, long sw, long hq,
                     long wq);
void kappa_unphase_f32(const float *buf, float *img, long c, long h, long w, long ph, long pw, long sh, long sw, long hq,
                       long wq);
void kappa_unphase_f64(const double *buf, double *img, long c, long h, long w, long ph, long pw, long sh, long sw, long hq,
                       long wq);
// [images, rows, oh, ow] <-> [rows, images·oh·width] (width ≥ ow, the extra columns 0 when
// widening and dropped when narrowing): image n's block of row r at column n·oh·width.
void kappa_widen_f32(const float *src, float *dst, long images, long rows, long oh, long ow, long width);
void kappa_widen_f64(const double *src, double *dst, long images, long rows, long oh, long ow, long width);
void kappa_narrow_f32(const float *src, float *dst, long images, long rows, long oh, long ow, long width);
void kappa_narrow_f64(const double *src, double *dst, long images, long rows, long oh, long ow, long width);

// Matrix products on Float32 (gemm_direct.c) for CPUs with AVX-512
// (kappa_gemm_direct_available(); elsewhere the kernel traps), row-major like cblas_sgemm with
// CblasRowMajor: C = alpha·op(A)·op(B) + beta·C + bias, op(A) [m, k] (A stored [k, m] when
// trans_a), op(B) [k, n] (B stored [n, k] when trans_b), bias [n] added to every row (or
// NULL). C is only read when beta ≠ 0. Each element sums k in increasing order in blocks of
// 256 terms, so results do not depend on how the callers split rows or columns.
// KAPPA_MATMUL_TRACE=1 at start-up prints each shape's summed time and rate at exit.
int kappa_gemm_direct_available(void);
void kappa_gemm_f32(int trans_a, int trans_b, long m, long n, long k, float alpha, const float *a, long lda,
                    const float *b, long ldb, float beta, float *c, long ldc, const float *bias);
// kappa_gemm_f32, and with trans_a, when the kernel copies A (n ≥ 128, or lda a multiple of
// 1024), also a_sums[i] = Σ_k op(A)(i, k), summed in increasing k from 0 in Float32 (for a
// linear layer, the bias gradient beside the weight gradient Gᵀ·x): returns 1 when a_sums was
// written, 0 when not (a_sums NULL, or A read in place; the caller sums then).
int kappa_gemm_f32_sums(int trans_a, int trans_b, long m, long n, long k, float alpha, const float *a, long lda,
                        const float *b, long ldb, float beta, float *c, long ldc, const float *bias, float *a_sums);

// Direct convolutions on Float32 (conv_direct.c) for CPUs with AVX-512
// (kappa_conv_direct_available(); elsewhere the kernels trap): 3×3 at stride 1 with padding 1,
// 3×3 at stride 2 with padding 1, and 1×1 at stride 2. The grid h × w is the output's; at
// stride 1 the input is the image, at stride 2 its phases (kappa_phase2_f32: phase a·2 + b
// holds pixels (2y + a, 2x + b), phase_stride apart, on the output's grid). `stack` images of
// the grid lie one above the other in each channel plane (a plane of stack·h·w; 1 for images
// laid out [n][c][h][w], with in_stride / out_stride between images). Weights as taps from
// kappa_conv_direct_forward_taps_f32 / kappa_conv_direct_backward_taps_f32.
int kappa_conv_direct_available(void);
// Whether conv_direct.c was compiled with optimization (a debug build's -O0 kernels are
// slower than the shifted products through an optimized BLAS).
int kappa_conv_direct_optimized(void);
void kappa_conv_direct_forward_taps_f32(const float *w, long o, long c, long kernel, float *wt);
void kappa_conv_direct_backward_taps_f32(const float *w, long o, long c, long stride, long kernel, float *wtb);
// output[n][oc] = Σ_ci,taps w · input[n][ci] at the tap's phase and offset (0 outside the image).
void kappa_conv_direct_forward_f32(const float *input, long in_stride, long images, long c, long h, long w,
                                   long stack, long stride, long kernel, long phase_stride, const float *wt, long o,
                                   float *output, long out_stride);
// dw[oc][ci][tap] += Σ_n,pixels grad[n][oc] · (the tap of input[n][ci]), the images in groups of
// `group` whose planes stay in cache (each group's sums added to dw in turn).
void kappa_conv_direct_weight_grad_f32(const float *input, long in_stride, const float *grad, long g_stride,
                                       long images, long group, long c, long h, long w, long stack, long stride,
                                       long kernel, long phase_stride, long o, float *dw);
// The input's gradient (at stride 2, its phases) from the output's: every element written.
void kappa_conv_direct_input_grad_f32(const float *grad, long g_stride, long images, long o, long h, long w,
                                      long stack, long stride, long kernel, long phase_stride, const float *wtb,
                                      long c, float *dinput, long d_stride);
// x [images, c, h, w] → its stride-2 phases on the oh × ow grid (0 past the image), phases
// 0..<count; and back, every pixel written (pixels of phases ≥ count get 0).
void kappa_phase2_f32(const float *x, long images, long c, long h, long w, long oh, long ow, long count, float *dst,
                      long img_stride, long phase_stride, long chan_stride);
void kappa_unphase2_f32(const float *src, long images, long c, long h, long w, long oh, long ow, long count,
                        float *x, long img_stride, long phase_stride, long chan_stride);
// [images][channels][plane] → [channels][images][plane] (back: the reverse).
void kappa_stack_images_f32(const float *src, float *dst, long images, long channels, long plane, int back);

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

// Elementwise Float32 kernels over n contiguous elements. exp and GELU use the same
// polynomial forms as Kappa's Swift kernels (FastMath.swift); GELU is x·Φ(x) exactly up to
// the erfc fit's 1.2e-7 fractional error, its backward g·(Φ(x) + x·φ(x)).
void kappa_exp_f32(const float *x, float *y, long n);
void kappa_gelu_f32(const float *x, float *y, long n);
void kappa_gelu_backward_f32(const float *g, const float *x, float *gx, long n);
void kappa_relu_f32(const float *x, float *y, long n);
void kappa_relu_backward_f32(const float *g, const float *x, float *gx, long n);
void kappa_affine_f32(const float *x, float *y, long n, float a, float b);
// y = a op b for op 0 +, 1 −, 2 ×, 3 ÷.
void kappa_binary_f32(int op, const float *a, const float *b, float *y, long n);

// Row kernels over [rows, d] (Float32). softmax (log = 0) or log-softmax (log = 1), stable by
// the row maximum; backward gx = y ⊙ (g − Σ g ⊙ y), or g − exp(y)·Σ g for log-softmax.
void kappa_softmax_rows_f32(const float *x, float *y, long rows, long d, int log);
void kappa_softmax_backward_rows_f32(const float *g, const float *y, float *gx, long rows, long d, int log);
// LayerNorm over the last axis: stats[2r], stats[2r + 1] = mean, 1/σ of row r; w, b may be NULL.
void kappa_layernorm_rows_f32(const float *x, const float *w, const float *b, float *y, float *stats, long rows, long d,
                              float eps);
void kappa_layernorm_backward_rows_f32(const float *x, const float *w, const float *g, const float *stats, float *gx,
                                       long rows, long d);
// gw += Σ_rows g ⊙ x̂, gb += Σ_rows g.
void kappa_layernorm_param_grads_f32(const float *x, const float *g, const float *stats, float *gw, float *gb, long rows,
                                     long d);

// The large-order approximation of the vMF normalizer in Float32, for ν = p/2 − 1 ≥ 1:
// out = ν log(ν + s) − s + ¼ log(ν² + κ²) − c, s = √(ν² + κ²); returns how many κ were
// negative (the caller stops on them). Backward: gκ = g·(−κ/(ν + s) + κ/(2s²)).
long kappa_vmf_logcp_approx_f32(const float *kappa, float *out, long n, float nu, float c);
void kappa_vmf_logcp_approx_backward_f32(const float *g, const float *kappa, float *gk, long n, float nu);

#ifdef __cplusplus
}
#endif

#endif
