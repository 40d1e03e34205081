import CKappaKernels

// Convolution, pooling and resizing of image batches [B, C, H, W].
//
// conv2d has three paths, the images split over the cores in each: in Float32 on AVX-512, the
// ResNet's kinds (3×3 with padding 1 at stride 1 or 2, 1×1 at stride 2) run the direct kernels
// of conv_direct.c on the images in place (``ConvGeometry/direct``); otherwise, on the "wide
// grid", a sum of kh·kw BLAS products over the padded image's phases read in place; otherwise
// im2col (C kernels on the zero-padded image) and one BLAS product per image or, where an
// image's output is small, per group of images sharing a column matrix, the VJP rebuilding
// the columns for Σ G·colsᵀ and col2im(Wᵀ·G). Pooling and resizing are explicit window/tap
// kernels whose VJPs scatter the gradient back through the same windows/taps.

/// A pair of sizes for the two spatial axes (height, width).
public struct Size2: Equatable, Sendable, ExpressibleByIntegerLiteral {
    /// The two sizes.
    public var height: Int, width: Int
    /// A height and a width.
    public init(_ height: Int, _ width: Int) { self.height = height; self.width = width }
    public init(integerLiteral v: Int) { self.init(v, v) }
}

/// Interpolation for ``Tensor/resized(height:width:mode:alignCorners:)``.
public enum ResizeMode: Sendable {
    /// Linear in each axis, 2×2 taps (PyTorch `bilinear`).
    case bilinear
    /// Cubic convolution with a = −0.75, 4×4 taps clamped at the borders (PyTorch
    /// `bicubic`; DINO resizes positional embeddings with it).
    case bicubic
}

private func outputSize(_ n: Int, _ k: Int, _ s: Int, _ p: Int, _ d: Int) -> Int {
    (n + 2 * p - d * (k - 1) - 1) / s + 1
}

extension Tensor {
    private func checkImage(_ op: String) -> (Int, Int, Int, Int) {
        precondition(rank == 4, "\(op): expected an image batch [B, C, H, W], got \(shape)")
        return (shape[0], shape[1], shape[2], shape[3])
    }

    /// 2-D cross-correlation (PyTorch's `conv2d`) of [B, C, H, W] with weights [O, C, kh, kw],
    /// plus an optional bias [O]: output [B, O, H', W'] with
    /// H' = ⌊(H + 2·padding − dilation·(kh − 1) − 1)/stride⌋ + 1.
    public func conv2d(weight: Tensor, bias: Tensor? = nil, stride: Size2 = 1, padding: Size2 = 0,
                       dilation: Size2 = 1) -> Tensor {
        let (b, c, h, w) = checkImage("conv2d")
        checkSameDType("conv2d", self, weight)
        precondition(weight.rank == 4 && weight.shape[1] == c,
                     "conv2d: input \(shape) and weight \(weight.shape): weight must be [O, \(c), kh, kw]")
        precondition(stride.height > 0 && stride.width > 0 && dilation.height > 0 && dilation.width > 0
                     && padding.height >= 0 && padding.width >= 0, "conv2d: invalid stride, padding or dilation")
        let (o, kh, kw) = (weight.shape[0], weight.shape[2], weight.shape[3])
        let geo = ConvGeometry(c: c, h: h, w: w, kh: kh, kw: kw, stride: stride, padding: padding, dilation: dilation)
        precondition(geo.oh > 0 && geo.ow > 0,
                     "conv2d: input \(shape) is smaller than the dilated kernel \(weight.shape) with padding \(padding.height)×\(padding.width)")
        let x = contiguousData(), wt = weight.contiguousData()
        // No images, channels or outputs: nothing to multiply (the kernels size their scratch
        // by the batch), so the output is zeros and so are the gradients.
        let empty = x.count == 0 || b * o == 0
        let out = empty ? Tensor.zeros([b, o, geo.oh, geo.ow], dtype: dtype) : Tensor(uninitialized: [b, o, geo.oh, geo.ow], dtype: dtype)
        let recording = Tape.isRecording && (requiresGrad || weight.requiresGrad)
        let direct = dtype == .float32 && !empty ? geo.direct : nil
        // On the wide grid the backward reads the same phases of the padded images as the
        // forward: when gradients will be taken, the forward keeps them (a padded copy of the
        // input) instead of the backward building them again. The direct kernels keep their
        // source (phases, stacked images) the same way.
        let phases = geo.isWide && direct == nil && recording ? Tensor(uninitialized: [b * geo.paddedSize], dtype: dtype) : nil
        var source: Tensor?
        switch dtype {
        case _ where empty: break
        case .float32 where direct != nil: source = directForward(x, wt, out, geo, keep: recording)
        case .float32: convForward(x, wt, out, geo, phases, Float.self)
        case .float64: convForward(x, wt, out, geo, phases, Double.self)
        }
        let needsInputGradient = requiresGrad
        Tape.record("conv2d", [self, weight], out) { g in
            let gc = g.contiguousData()
            let gx = empty ? Tensor.zeros(x.shape, dtype: x.dtype) : Tensor(uninitialized: x.shape, dtype: x.dtype)
            let gw = Tensor.zeros(wt.shape, dtype: wt.dtype)
            switch x.dtype {
            case _ where empty: break
            case .float32 where direct != nil:
                directBackward(x, source, wt, gc, needsInputGradient ? gx : nil, gw, geo)
                return [needsInputGradient ? gx : nil, gw]
            case .float32: convBackward(x, wt, gc, gx, gw, geo, phases, Float.self)
            case .float64: convBackward(x, wt, gc, gx, gw, geo, phases, Double.self)
            }
            return [gx, gw]
        }
        guard let bias else { return out }
        precondition(bias.shape == [o], "conv2d: bias \(bias.shape) does not match \(o) output channels")
        return out + bias.reshape([1, o, 1, 1])
    }

    /// The maximum over kernel×kernel windows (padding counts as −∞). The gradient goes
    /// to the first maximum of each window and accumulates where windows overlap. With
    /// `ceilMode` the output size rounds up, so a last partial window is kept when it starts
    /// inside the input or its left padding (PyTorch's `ceil_mode=True`).
    public func maxPool2d(kernel: Size2, stride: Size2? = nil, padding: Size2 = 0, ceilMode: Bool = false) -> Tensor {
        let (b, c, h, w) = checkImage("maxPool2d")
        let win = poolWindows("maxPool2d", kernel, stride, padding, ceilMode: ceilMode)
        let (oh, ow) = (win.rows.count, win.cols.count)
        let x = contiguousData()
        let out = Tensor(uninitialized: [b, c, oh, ow], dtype: dtype)
        var argmax = [Int](repeating: 0, count: out.count)
        switch dtype {
        case .float32: maxPoolForward(x, out, &argmax, win, b * c, Float.self)
        case .float64: maxPoolForward(x, out, &argmax, win, b * c, Double.self)
        }
        let inShape = shape, dt = dtype, plane = h * w, oplane = oh * ow
        Tape.record("maxPool2d", [self], out) { g in
            let gx = Tensor.zeros(inShape, dtype: dt)
            let gc = g.contiguousData()
            switch dt {
            case .float32: poolScatter(gc, gx, argmax, plane, oplane, Float.self)
            case .float64: poolScatter(gc, gx, argmax, plane, oplane, Double.self)
            }
            return [gx]
        }
        return out
    }

    /// The mean over kernel×kernel windows, as PyTorch's `avg_pool2d`: with `countIncludePad`
    /// (the default) the zero padding counts in the divisor, else only the input's pixels do;
    /// `ceilMode` as in ``maxPool2d(kernel:stride:padding:ceilMode:)`` (a window reaching past
    /// the padding divides by its part within the padded input).
    public func avgPool2d(kernel: Size2, stride: Size2? = nil, padding: Size2 = 0, ceilMode: Bool = false,
                          countIncludePad: Bool = true) -> Tensor {
        let win = poolWindows("avgPool2d", kernel, stride, padding, ceilMode: ceilMode)
        let (h, w) = (shape[2], shape[3])
        func extent(_ start: Int, _ k: Int, _ n: Int, _ p: Int) -> Int {
            countIncludePad ? Swift.min(start + k, n + p) - start : Swift.min(start + k, n) - Swift.max(start, 0)
        }
        let s = stride ?? kernel
        return windowMean("avgPool2d", rows: win.rows, cols: win.cols) { i, j in
            Double(extent(i * s.height - padding.height, kernel.height, h, padding.height)
                   * extent(j * s.width - padding.width, kernel.width, w, padding.width))
        }
    }

    /// The windows of a pooling op (stride defaults to the kernel), checked against the input.
    private func poolWindows(_ op: String, _ kernel: Size2, _ stride: Size2?, _ padding: Size2, ceilMode: Bool) -> PoolWindows {
        let (_, _, h, w) = checkImage(op)
        let s = stride ?? kernel
        precondition(s.height > 0 && s.width > 0 && kernel.height > 0 && kernel.width > 0 && padding.height >= 0 && padding.width >= 0,
                     "\(op): kernel \(kernel.height)×\(kernel.width), stride \(s.height)×\(s.width), padding \(padding.height)×\(padding.width): kernel and stride must be positive, padding not negative")
        func size(_ n: Int, _ k: Int, _ s: Int, _ p: Int) -> Int {
            let span = n + 2 * p - k
            guard span >= 0 else { return 0 }
            guard ceilMode else { return span / s + 1 }
            var o = (span + s - 1) / s + 1
            if (o - 1) * s >= n + p { o -= 1 }  // the last window must start inside the input or its left padding
            return o
        }
        let oh = size(h, kernel.height, s.height, padding.height), ow = size(w, kernel.width, s.width, padding.width)
        precondition(oh > 0 && ow > 0 && padding.height * 2 <= kernel.height && padding.width * 2 <= kernel.width,
                     "\(op): kernel \(kernel.height)×\(kernel.width) with padding \(padding.height)×\(padding.width) does not fit input \(shape)")
        return PoolWindows(h: h, w: w, oh: oh, ow: ow, kernel: kernel, stride: s, padding: padding)
    }

    /// The mean over an output×output grid of bins: bin i of n spans
    /// [⌊i·H/n⌋, ⌈(i+1)·H/n⌉) (PyTorch's `adaptive_avg_pool2d`).
    public func adaptiveAvgPool2d(_ output: Size2) -> Tensor {
        let (_, _, h, w) = checkImage("adaptiveAvgPool2d")
        precondition(output.height > 0 && output.width > 0, "adaptiveAvgPool2d: output size \(output) is not positive")
        func bins(_ n: Int, _ m: Int) -> [(Int, Int)] {
            (0..<m).map { i in (i * n / m, ((i + 1) * n + m - 1) / m) }
        }
        let rows = bins(h, output.height), cols = bins(w, output.width)
        return windowMean("adaptiveAvgPool2d", rows: rows, cols: cols) { r, c in
            Double((rows[r].1 - rows[r].0) * (cols[c].1 - cols[c].0))
        }
    }

    /// The sum over windows [rows[i]) × [cols[j]) divided by `divisor(i, j)`.
    private func windowMean(_ name: String, rows: [(Int, Int)], cols: [(Int, Int)],
                            divisor: (Int, Int) -> Double) -> Tensor {
        let (b, c, _, _) = checkImage(name)
        var inv = [Double]()
        for i in 0..<rows.count { for j in 0..<cols.count { inv.append(1 / divisor(i, j)) } }
        let x = contiguousData()
        let out = Tensor(uninitialized: [b, c, rows.count, cols.count], dtype: dtype)
        let planes = b * c
        switch dtype {
        case .float32: windowMeanKernel(x, out, rows, cols, inv, planes, backward: false, Float.self)
        case .float64: windowMeanKernel(x, out, rows, cols, inv, planes, backward: false, Double.self)
        }
        let inShape = shape, dt = dtype
        Tape.record(name, [self], out) { g in
            let gx = Tensor.zeros(inShape, dtype: dt)
            let gc = g.contiguousData()
            switch dt {
            case .float32: windowMeanKernel(gx, gc, rows, cols, inv, planes, backward: true, Float.self)
            case .float64: windowMeanKernel(gx, gc, rows, cols, inv, planes, backward: true, Double.self)
            }
            return [gx]
        }
        return out
    }

    /// The image batch resized to height × width by interpolation, as PyTorch's `interpolate`
    /// with `size=`: with `alignCorners` false (the default) pixels are squares and output
    /// pixel o samples the input at (o + ½)·in/out − ½; with `alignCorners` true the corner
    /// pixels' centers coincide and o samples at o·(in − 1)/(out − 1).
    public func resized(height: Int, width: Int, mode: ResizeMode = .bilinear, alignCorners: Bool = false) -> Tensor {
        let (b, c, h, w) = checkImage("resize")
        precondition(height > 0 && width > 0, "resize: output size \(height)×\(width) is not positive")
        let ty = resizeTaps(h, height, mode, alignCorners: alignCorners), tx = resizeTaps(w, width, mode, alignCorners: alignCorners)
        let x = contiguousData()
        let out = Tensor(uninitialized: [b, c, height, width], dtype: dtype)
        switch dtype {
        case .float32: resizeKernel(x, out, ty, tx, b * c, backward: false, Float.self)
        case .float64: resizeKernel(x, out, ty, tx, b * c, backward: false, Double.self)
        }
        let inShape = shape, dt = dtype
        Tape.record(mode == .bicubic ? "resize_bicubic" : "resize_bilinear", [self], out) { g in
            let gx = Tensor.zeros(inShape, dtype: dt)
            let gc = g.contiguousData()
            switch dt {
            case .float32: resizeKernel(gx, gc, ty, tx, b * c, backward: true, Float.self)
            case .float64: resizeKernel(gx, gc, ty, tx, b * c, backward: true, Double.self)
            }
            return [gx]
        }
        return out
    }
}

// MARK: Kernels

struct ConvGeometry {
    let c: Int, h: Int, w: Int, kh: Int, kw: Int
    let sh: Int, sw: Int, ph: Int, pw: Int, dh: Int, dw: Int
    let oh: Int, ow: Int
    /// The direct kernel that runs this convolution in Float32, if any
    /// (``direct(kh:kw:sh:sw:ph:pw:dh:dw:oh:ow:)``), decided once, when the op runs:
    /// ``HostKernels/usesDirectConvolution`` may be set for one task only, and the kernels'
    /// chunks run on other threads.
    let direct: (stride: Int, kernel: Int)?
    init(c: Int, h: Int, w: Int, kh: Int, kw: Int, stride: Size2, padding: Size2, dilation: Size2) {
        (self.c, self.h, self.w, self.kh, self.kw) = (c, h, w, kh, kw)
        (sh, sw, ph, pw, dh, dw) = (stride.height, stride.width, padding.height, padding.width, dilation.height, dilation.width)
        oh = outputSize(h, kh, sh, ph, dh)
        ow = outputSize(w, kw, sw, pw, dw)
        direct = ConvGeometry.direct(kh: kh, kw: kw, sh: sh, sw: sw, ph: ph, pw: pw, dh: dh, dw: dw, oh: oh, ow: ow)
    }
    var colRows: Int { c * kh * kw }
    var colCols: Int { oh * ow }
}

extension ConvGeometry {
    var c_geometry: kappa_conv_geometry {
        kappa_conv_geometry(c: c, h: h, w: w, kh: kh, kw: kw, sh: sh, sw: sw, ph: ph, pw: pw, dh: dh, dw: dw, oh: oh, ow: ow)
    }
    /// The direct kernel (`conv_direct.c`) for a convolution in Float32 where the CPU has
    /// AVX-512 and ``HostKernels/usesDirectConvolution`` is on, if any: 3×3 with padding 1 at
    /// stride 1 (reading the images in place) or 2 (reading their four phases), 1×1 at stride 2
    /// (phase (0, 0)); outputs of at most 128² pixels.
    static func direct(kh: Int, kw: Int, sh: Int, sw: Int, ph: Int, pw: Int, dh: Int, dw: Int, oh: Int,
                       ow: Int) -> (stride: Int, kernel: Int)? {
        guard HostKernels.usesDirectConvolution, dh == 1, dw == 1, sh == sw, kh == kw, oh * ow <= 128 * 128 else { return nil }
        if kh == 3 && ph == 1 && pw == 1 && (sh == 1 || sh == 2) { return (sh, 3) }
        if kh == 1 && ph == 0 && pw == 0 && sh == 2 { return (2, 1) }
        return nil
    }
    /// Output planes below 64 pixels (7×7, 4×4, 2×2) leave lanes of the direct kernel's
    /// 16-pixel blocks idle; their images are stacked channel by channel first.
    var stacksImages: Bool { oh * ow < 64 }
    /// The stride-2 phases the direct kernel reads (0 at stride 1: the image itself).
    var directPhases: Int { direct.map { $0.stride == 1 ? 0 : ($0.kernel == 1 ? 1 : 4) } ?? 0 }
    /// A 1×1 convolution at stride 1 without padding: the image is its own column matrix.
    var isPointwise: Bool { kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0 }
    /// The phases of the padded image (stride sh × sw gives sh·sw of them, each hq × wq):
    /// phase (a, b) holds the padded pixels (y·sh + a, x·sw + b).
    var hq: Int { (h + 2 * ph + sh - 1) / sh }
    var wq: Int { (w + 2 * pw + sw - 1) / sw }
    /// On the wide grid (output rows wq wide, the columns past ow computed and dropped), tap
    /// (i, j) of the kernel reads one phase at one fixed offset, so the convolution is a sum
    /// of kh·kw products W_ij · (a shifted phase), read in place, with no im2col. Used where
    /// the extra columns cost at most half again the products.
    var isWide: Bool { !isPointwise && 2 * wq <= 3 * ow }
    /// Elements of one channel's phases, and the offset of tap (i, j) among them.
    var plane: Int { sh * sw * hq * wq }
    func tapOffset(_ i: Int, _ j: Int) -> Int {
        let (a, b) = ((i * dh) % sh, (j * dw) % sw)
        return ((a * sw + b) * hq + (i * dh) / sh) * wq + (j * dw) / sw
    }
    /// Columns per output row in the column matrix, and per image.
    var width: Int { isWide ? wq : ow }
    var span: Int { oh * width }
    /// Whether im2col (off the wide grid) reads a zero-padded copy of the image.
    var usesPaddedCopy: Bool { ph > 0 || pw > 0 }
    /// Elements of one image's padded copy (its phases on the wide grid, with the tail that
    /// the last row's dropped columns read).
    var paddedSize: Int { isWide ? c * plane + wq + (kw - 1) * dw : c * (h + 2 * ph) * (w + 2 * pw) }
    /// Images that share one column matrix and one product: one when an image's output is
    /// large enough to keep BLAS busy, else enough for about 1,024 columns (a small ResNet's
    /// last stages have 4×4 or 2×2 outputs: one product per image would be a sliver).
    func group(_ images: Int) -> Int { Swift.max(1, Swift.min(images, 1024 / Swift.max(span, 1))) }
}

/// The number of chunks a batch of `b` images is split into, one per core when the work
/// (multiply-adds per image × b) is large enough.
private func imageChunks(_ b: Int, work: Int) -> Int {
    Swift.min(Parallel.cores, b, Swift.max(1, b * work / Parallel.grain))
}

/// Runs `body` over the images split into `chunks` contiguous ranges, in parallel: each chunk
/// does its own copies and small products, so no core waits on another's hand-offs (which
/// cost more than the arithmetic of a narrow ResNet's convolutions).
private func forEachImageChunk(_ b: Int, chunks: Int, _ body: (_ chunk: Int, _ images: Range<Int>) -> Void) {
    if chunks <= 1 {
        body(0, 0..<b)
        return
    }
    Parallel.forEachChunk(chunks) { c in body(c, (b * c / chunks)..<(b * (c + 1) / chunks)) }
}

/// The C kernels of im2col and its helpers, for either element type.
private enum ConvKernels<T: TensorScalar> {
    /// The padded image split into its sh × sw phases (``ConvGeometry/hq``); at stride
    /// 1 × 1 (`strided: false`) the plain zero-padded copy that im2col reads.
    static func phase(_ img: UnsafeMutablePointer<T>, _ buf: UnsafeMutablePointer<T>, _ g: ConvGeometry, strided: Bool = true) {
        let (sh, sw) = strided ? (g.sh, g.sw) : (1, 1)
        let (hq, wq) = strided ? (g.hq, g.wq) : (g.h + 2 * g.ph, g.w + 2 * g.pw)
        if T.self == Float.self { kappa_phase_f32(f32(img), f32(buf), g.c, g.h, g.w, g.ph, g.pw, sh, sw, hq, wq) }
        else { kappa_phase_f64(f64(img), f64(buf), g.c, g.h, g.w, g.ph, g.pw, sh, sw, hq, wq) }
    }
    /// The image's part of ``phase(_:_:_:strided:)``'s layout, back into an image.
    static func unphase(_ buf: UnsafeMutablePointer<T>, _ img: UnsafeMutablePointer<T>, _ g: ConvGeometry, strided: Bool = true) {
        let (sh, sw) = strided ? (g.sh, g.sw) : (1, 1)
        let (hq, wq) = strided ? (g.hq, g.wq) : (g.h + 2 * g.ph, g.w + 2 * g.pw)
        if T.self == Float.self { kappa_unphase_f32(f32(buf), f32(img), g.c, g.h, g.w, g.ph, g.pw, sh, sw, hq, wq) }
        else { kappa_unphase_f64(f64(buf), f64(img), g.c, g.h, g.w, g.ph, g.pw, sh, sw, hq, wq) }
    }
    static func im2col(_ padded: UnsafeMutablePointer<T>, _ cols: UnsafeMutablePointer<T>, _ g: ConvGeometry, rowStride: Int) {
        var cg = g.c_geometry
        if T.self == Float.self { kappa_im2col_f32(f32(padded), f32(cols), &cg, rowStride) }
        else { kappa_im2col_f64(f64(padded), f64(cols), &cg, rowStride) }
    }
    static func col2im(_ cols: UnsafeMutablePointer<T>, _ padded: UnsafeMutablePointer<T>, _ g: ConvGeometry, rowStride: Int) {
        var cg = g.c_geometry
        if T.self == Float.self { kappa_col2im_f32(f32(cols), f32(padded), &cg, rowStride) }
        else { kappa_col2im_f64(f64(cols), f64(padded), &cg, rowStride) }
    }
    /// out[images, rows, oh, ow] → [rows, images·span], the wide grid's extra columns 0.
    static func widen(_ src: UnsafeMutablePointer<T>, _ dst: UnsafeMutablePointer<T>, images: Int, rows: Int, _ g: ConvGeometry) {
        if T.self == Float.self { kappa_widen_f32(f32(src), f32(dst), images, rows, g.oh, g.ow, g.width) }
        else { kappa_widen_f64(f64(src), f64(dst), images, rows, g.oh, g.ow, g.width) }
    }
    /// [rows, images·span] → out[images, rows, oh, ow], the wide grid's extra columns dropped.
    static func narrow(_ src: UnsafeMutablePointer<T>, _ dst: UnsafeMutablePointer<T>, images: Int, rows: Int, _ g: ConvGeometry) {
        if T.self == Float.self { kappa_narrow_f32(f32(src), f32(dst), images, rows, g.oh, g.ow, g.width) }
        else { kappa_narrow_f64(f64(src), f64(dst), images, rows, g.oh, g.ow, g.width) }
    }

    /// Weights [O, C, kh, kw] → taps [kh·kw, O, C], one [O, C] matrix per tap (and back, added).
    static func taps(_ w: UnsafeMutablePointer<T>, _ t: UnsafeMutablePointer<T>, o: Int, _ g: ConvGeometry, back: Bool = false) {
        let (c, kk) = (g.c, g.kh * g.kw)
        for oi in 0..<o { for ci in 0..<c { for k in 0..<kk {
            if back { w[(oi * c + ci) * kk + k] += t[(k * o + oi) * c + ci] } else { t[(k * o + oi) * c + ci] = w[(oi * c + ci) * kk + k] }
        } } }
    }

    /// The column matrix [C·kh·kw, count·span] of images first..<first+count (image j at
    /// column j·span), or the image itself for a pointwise convolution of one image.
    static func columns(_ px: UnsafeMutablePointer<T>, first: Int, count: Int, _ g: ConvGeometry,
                        padded: UnsafeMutablePointer<T>, cols: UnsafeMutablePointer<T>) -> UnsafeMutablePointer<T> {
        let imageSize = g.c * g.h * g.w
        if g.isPointwise && count == 1 { return px + first * imageSize }
        for j in 0..<count {
            let img = px + (first + j) * imageSize
            if g.usesPaddedCopy { phase(img, padded, g, strided: false) }
            im2col(g.usesPaddedCopy ? padded : img, cols + j * g.span, g, rowStride: count * g.span)
        }
        return cols
    }
}

/// Forward. On the wide grid, image by image: out = Σ_ij W_ij · (shifted phase of the padded
/// image), kh·kw products [O, C] × [C, H'·wq] that read the phases in place (the channels one
/// plane apart), then the extra columns dropped. Otherwise, for each group of images (see
/// ``ConvGeometry/group(_:)``), their columns [C·kh·kw, n·span] and one product
/// W · cols = [O, n·span], laid out as out[n] = [O, H', W']. With `keep` (wide grid only),
/// image i's phases go to keep[i·paddedSize...] for the backward instead of a scratch buffer.
private func convForward<T: TensorScalar>(_ x: Tensor, _ w: Tensor, _ out: Tensor, _ g: ConvGeometry, _ keep: Tensor?,
                                          _: T.Type) {
    let b = x.shape[0], o = w.shape[0], l = g.colCols, k = g.colRows
    let chunks = imageChunks(b, work: o * k * l)
    let group = g.isWide ? 1 : g.group((b + chunks - 1) / chunks)
    let kept = keep.map { $0.pointer(T.self) }
    let perChunk = (kept == nil ? g.paddedSize : 0) + (g.isWide ? 0 : k * group * g.span) + o * group * g.span
    let scratch = Tensor(uninitialized: [chunks * perChunk + (g.isWide ? o * k : 0)], dtype: x.dtype)
    let px = x.pointer(T.self), pw = w.pointer(T.self), po = out.pointer(T.self), ps = scratch.pointer(T.self)
    let taps = ps + chunks * perChunk
    if g.isWide { ConvKernels<T>.taps(pw, taps, o: o, g) }
    let imageSize = g.c * g.h * g.w, n = g.span
    forEachImageChunk(b, chunks: chunks) { chunk, images in
        let scratch = ps + chunk * perChunk, cols = scratch + (kept == nil ? g.paddedSize : 0)
        let product = cols + (g.isWide ? 0 : k * group * g.span)
        if kept == nil { scratch.update(repeating: 0, count: g.paddedSize) }  // the tail the wide grid reads stays 0
        var padded = scratch
        if g.isWide {
            let tail = g.paddedSize - g.c * g.plane
            for img in images {
                if let kept {
                    padded = kept + img * g.paddedSize
                    (padded + g.c * g.plane).update(repeating: 0, count: tail)
                }
                ConvKernels<T>.phase(px + img * imageSize, padded, g)
                for i in 0..<g.kh { for j in 0..<g.kw {
                    let t = i * g.kw + j
                    gemm(false, false, o, n, g.c, taps + t * o * g.c, g.c, padded + g.tapOffset(i, j), g.plane, product, n,
                         beta: t == 0 ? 0 : 1)
                } }
                ConvKernels<T>.narrow(product, po + img * o * l, images: 1, rows: o, g)
            }
            return
        }
        for first in stride(from: images.lowerBound, to: images.upperBound, by: group) {
            let count = Swift.min(group, images.upperBound - first), n = count * g.span
            let a = ConvKernels<T>.columns(px, first: first, count: count, g, padded: padded, cols: cols)
            if count == 1 {
                gemm(false, false, o, l, k, pw, k, a, l, po + first * o * l, l)
            } else {
                gemm(false, false, o, n, k, pw, k, a, n, product, n)
                ConvKernels<T>.narrow(product, po + first * o * l, images: count, rows: o, g)
            }
        }
    }
}

/// Backward. On the wide grid, image by image, with G = [O, H'·wq] the output gradient (0 on
/// the extra columns): dW_ij += G · (shifted phase)ᵀ and the phases of the padded input
/// gradient, shifted, += W_ijᵀ · G, kh·kw products each, then the image's part of them. Otherwise, per
/// group of images: G = [O, n·span], the columns again, dW += G · colsᵀ and
/// dx = col2im(Wᵀ · G), folded back into each image's padded gradient. The weight gradient
/// is a partial sum per chunk of images, added at the end.
private func convBackward<T: TensorScalar>(_ x: Tensor, _ w: Tensor, _ gout: Tensor, _ gx: Tensor, _ gw: Tensor,
                                           _ g: ConvGeometry, _ kept: Tensor?, _: T.Type) {
    let b = x.shape[0], o = w.shape[0], l = g.colCols, k = g.colRows, wsize = o * k
    let imageSize = g.c * g.h * g.w
    let chunks = imageChunks(b, work: 3 * o * k * l)
    let group = g.isWide ? 1 : g.group((b + chunks - 1) / chunks)
    let colsSize = g.isWide ? g.paddedSize : 2 * k * group * g.span   // wide: the phases of the input gradient
    let perChunk = wsize + g.paddedSize + colsSize + o * group * g.span
    let scratch = Tensor(uninitialized: [chunks * perChunk + (g.isWide ? wsize : 0)], dtype: x.dtype)
    let px = x.pointer(T.self), pw = w.pointer(T.self), pg = gout.pointer(T.self)
    let pgx = gx.pointer(T.self), pgw = gw.pointer(T.self), ps = scratch.pointer(T.self)
    let taps = ps + chunks * perChunk
    if g.isWide { ConvKernels<T>.taps(pw, taps, o: o, g) }
    forEachImageChunk(b, chunks: chunks) { chunk, images in
        let dw = ps + chunk * perChunk, padded = dw + wsize, cols = padded + g.paddedSize
        let dcols = cols + k * group * g.span, gmat = cols + colsSize
        dw.update(repeating: 0, count: wsize)
        padded.update(repeating: 0, count: g.paddedSize)
        if g.isWide {
            let dpadded = cols, n = g.span, c = g.c
            for img in images {
                ConvKernels<T>.widen(pg + img * o * l, gmat, images: 1, rows: o, g)
                var phases = padded
                if let kept {
                    phases = kept.pointer(T.self) + img * g.paddedSize
                } else {
                    ConvKernels<T>.phase(px + img * imageSize, padded, g)
                }
                dpadded.update(repeating: 0, count: g.paddedSize)
                for i in 0..<g.kh { for j in 0..<g.kw {
                    let t = i * g.kw + j, off = g.tapOffset(i, j)
                    gemm(false, true, o, c, n, gmat, n, phases + off, g.plane, dw + t * o * c, c, beta: 1)
                    gemm(true, false, c, n, o, taps + t * o * c, c, gmat, n, dpadded + off, g.plane, beta: 1)
                } }
                ConvKernels<T>.unphase(dpadded, pgx + img * imageSize, g)
            }
            return
        }
        for first in stride(from: images.lowerBound, to: images.upperBound, by: group) {
            let count = Swift.min(group, images.upperBound - first), n = count * g.span
            let gm: UnsafeMutablePointer<T>
            if count == 1 {
                gm = pg + first * o * l
            } else {
                ConvKernels<T>.widen(pg + first * o * l, gmat, images: count, rows: o, g)
                gm = gmat
            }
            let a = ConvKernels<T>.columns(px, first: first, count: count, g, padded: padded, cols: cols)
            gemm(false, true, o, k, n, gm, n, a, n, dw, k, beta: 1)
            if g.isPointwise && count == 1 {
                gemm(true, false, k, n, o, pw, k, gm, n, pgx + first * imageSize, n)
                continue
            }
            gemm(true, false, k, n, o, pw, k, gm, n, dcols, n)
            for j in 0..<count {
                let dst = pgx + (first + j) * imageSize
                if g.usesPaddedCopy {
                    padded.update(repeating: 0, count: g.paddedSize)
                    ConvKernels<T>.col2im(dcols + j * g.span, padded, g, rowStride: n)
                    ConvKernels<T>.unphase(padded, dst, g, strided: false)
                } else {
                    dst.update(repeating: 0, count: imageSize)
                    ConvKernels<T>.col2im(dcols + j * g.span, dst, g, rowStride: n)
                }
            }
        }
    }
    for c in 0..<chunks {
        let dw = ps + c * perChunk
        if g.isWide {
            ConvKernels<T>.taps(pgw, dw, o: o, g, back: true)
        } else {
            for i in 0..<wsize { pgw[i] += dw[i] }
        }
    }
}

/// How the direct kernel sees a chunk of `n` images: its source (the images themselves at
/// stride 1, else their phases; stacked channel by channel for small planes) and where each
/// image, phase and channel starts in it.
private struct DirectLayout {
    let g: ConvGeometry, n: Int
    var plane: Int { g.oh * g.ow }
    /// Source elements per image (the whole source is laid out chunk after chunk).
    var perImage: Int { Swift.max(1, g.directPhases) * g.c * plane }
    /// Images the kernel walks, and images stacked in each plane.
    var images: Int { g.stacksImages ? 1 : n }
    var stack: Int { g.stacksImages ? n : 1 }
    /// Strides of the source: between images, phases and channels.
    var imageStride: Int { g.stacksImages ? plane : perImage }
    var phaseStride: Int { g.stacksImages ? g.c * n * plane : g.c * plane }
    var channelStride: Int { g.stacksImages ? n * plane : plane }
    /// Whether the kernel reads the input tensor itself (stride 1, not stacked).
    var readsInput: Bool { g.directPhases == 0 && !g.stacksImages }

    /// The chunk's images [n, c, h, w] into the source layout at `dst`.
    func build(_ x: UnsafeMutablePointer<Float>, _ dst: UnsafeMutablePointer<Float>) {
        if g.directPhases == 0 {
            stackImages(x, dst, images: n, channels: g.c, plane: plane)
        } else {
            kappa_phase2_f32(x, n, g.c, g.h, g.w, g.oh, g.ow, g.directPhases, dst, imageStride, phaseStride, channelStride)
        }
    }
}

/// The number of chunks the direct kernels split a batch into (the same in both directions,
/// since the backward reads the forward's stacked source chunk by chunk).
private func directChunks(_ b: Int, _ o: Int, _ g: ConvGeometry) -> Int {
    imageChunks(b, work: g.kh * g.kw * o * g.c * g.oh * g.ow)
}

/// Forward of a direct convolution (``ConvGeometry/direct``): the weights as taps, the images
/// split over the cores. Returns the source the kernel read, when `keep` and it is not the
/// input itself, for the backward.
private func directForward(_ x: Tensor, _ w: Tensor, _ out: Tensor, _ g: ConvGeometry, keep: Bool) -> Tensor? {
    let b = x.shape[0], o = w.shape[0], c = g.c, plane = g.oh * g.ow, inPlane = g.h * g.w
    let (s, k) = g.direct!
    let chunks = directChunks(b, o, g)
    let taps = Tensor(uninitialized: [k * k * c * o], dtype: .float32)
    let pt = taps.pointer(Float.self)
    kappa_conv_direct_forward_taps_f32(w.pointer(Float.self), o, c, k, pt)
    let whole = DirectLayout(g: g, n: b)
    let source = whole.readsInput ? nil : Tensor(uninitialized: [b * whole.perImage], dtype: .float32)
    let stackedOut = g.stacksImages ? Tensor(uninitialized: [b * o * plane], dtype: .float32) : nil
    let px = x.pointer(Float.self), po = out.pointer(Float.self)
    let psrc = source?.pointer(Float.self), pso = stackedOut?.pointer(Float.self)
    forEachImageChunk(b, chunks: chunks) { _, images in
        let first = images.lowerBound, lay = DirectLayout(g: g, n: images.count)
        let src: UnsafeMutablePointer<Float>
        if let psrc {
            src = psrc + first * lay.perImage
            lay.build(px + first * c * inPlane, src)
        } else {
            src = px + first * c * inPlane
        }
        let dst = pso.map { $0 + first * o * plane } ?? po + first * o * plane
        kappa_conv_direct_forward_f32(src, lay.imageStride, lay.images, c, g.oh, g.ow, lay.stack, s, k, lay.phaseStride,
                                      pt, o, dst, o * plane)
        if g.stacksImages {
            stackImages(dst, po + first * o * plane, images: images.count, channels: o, plane: plane, back: true)
        }
    }
    return keep ? source : nil
}

/// [images, channels, plane] → [channels, images, plane], or back.
private func stackImages(_ src: UnsafeMutablePointer<Float>, _ dst: UnsafeMutablePointer<Float>, images: Int,
                         channels: Int, plane: Int, back: Bool = false) {
    kappa_stack_images_f32(src, dst, images, channels, plane, back ? 1 : 0)
}

/// Backward of a direct convolution: the input gradient (when `gx` is given) from the output
/// gradient through the taps reversed (at stride 2 phase by phase, then the phases back into
/// the image); the weight gradient a partial sum per chunk of images, in groups of images
/// whose planes stay in cache, added at the end. `source` is what the forward kept (nil when
/// the kernel read the input itself).
private func directBackward(_ x: Tensor, _ source: Tensor?, _ w: Tensor, _ gout: Tensor, _ gx: Tensor?, _ gw: Tensor,
                            _ g: ConvGeometry) {
    let b = x.shape[0], o = w.shape[0], c = g.c, plane = g.oh * g.ow, inPlane = g.h * g.w
    let (s, k) = g.direct!
    let wsize = o * c * k * k, chunks = directChunks(b, o, g)
    let whole = DirectLayout(g: g, n: b)
    precondition(whole.readsInput || source != nil, "conv2d: the direct kernel's source was not kept for the backward")
    let stackedGrad = g.stacksImages ? b * o * plane : 0
    let inputGrad = gx != nil && (g.directPhases > 0 || g.stacksImages) ? b * whole.perImage : 0
    let scratch = Tensor(uninitialized: [wsize * (chunks + 1) + stackedGrad + inputGrad], dtype: .float32)
    let pt = scratch.pointer(Float.self), partial = pt + wsize
    let pgs = partial + chunks * wsize, pdx = pgs + stackedGrad
    kappa_conv_direct_backward_taps_f32(w.pointer(Float.self), o, c, s, k, pt)
    let px = x.pointer(Float.self), pg = gout.pointer(Float.self), pgx = gx?.pointer(Float.self)
    let psrc = source?.pointer(Float.self)
    let group = Swift.max(1, 12_544 / plane)  // images whose planes stay in cache (one stack when stacked)
    forEachImageChunk(b, chunks: chunks) { chunk, images in
        let first = images.lowerBound, n = images.count, lay = DirectLayout(g: g, n: n)
        var grad = pg + first * o * plane
        if g.stacksImages {
            stackImages(grad, pgs + first * o * plane, images: n, channels: o, plane: plane)
            grad = pgs + first * o * plane
        }
        if let pgx {
            if lay.readsInput {
                kappa_conv_direct_input_grad_f32(grad, o * plane, n, o, g.oh, g.ow, 1, s, k, 0, pt, c,
                                                 pgx + first * c * inPlane, c * inPlane)
            } else {
                let d = pdx + first * lay.perImage
                kappa_conv_direct_input_grad_f32(grad, o * plane, lay.images, o, g.oh, g.ow, lay.stack, s, k,
                                                 lay.phaseStride, pt, c, d, lay.imageStride)
                if g.directPhases == 0 {
                    stackImages(d, pgx + first * c * inPlane, images: n, channels: c, plane: plane, back: true)
                } else {
                    kappa_unphase2_f32(d, n, c, g.h, g.w, g.oh, g.ow, g.directPhases, pgx + first * c * inPlane,
                                       lay.imageStride, lay.phaseStride, lay.channelStride)
                }
            }
        }
        let src = psrc.map { $0 + first * lay.perImage } ?? px + first * c * inPlane
        let dw = partial + chunk * wsize
        dw.update(repeating: 0, count: wsize)
        kappa_conv_direct_weight_grad_f32(src, lay.imageStride, grad, o * plane, lay.images, group, c, g.oh, g.ow,
                                          lay.stack, s, k, lay.phaseStride, o, dw)
    }
    let pgw = gw.pointer(Float.self)
    for chunk in 0..<chunks { for i in 0..<wsize { pgw[i] += partial[chunk * wsize + i] } }
}

/// Valid input rows/cols of each pooling window.
struct PoolWindows {
    let rows: [(Int, Int)], cols: [(Int, Int)]
    init(h: Int, w: Int, oh: Int, ow: Int, kernel: Size2, stride: Size2, padding: Size2) {
        rows = (0..<oh).map { y in
            let s = y * stride.height - padding.height
            return (Swift.max(s, 0), Swift.min(s + kernel.height, h))
        }
        cols = (0..<ow).map { x in
            let s = x * stride.width - padding.width
            return (Swift.max(s, 0), Swift.min(s + kernel.width, w))
        }
    }
}

private func maxPoolForward<T: TensorScalar>(_ x: Tensor, _ out: Tensor, _ argmax: inout [Int], _ win: PoolWindows,
                                             _ planes: Int, _: T.Type) {
    let (h, w) = (x.shape[2], x.shape[3])
    let (oh, ow) = (win.rows.count, win.cols.count)
    let px = x.pointer(T.self), po = out.pointer(T.self)
    argmax.withUnsafeMutableBufferPointer { am in
        for p in 0..<planes {
            let src = px + p * h * w
            for y in 0..<oh {
                for xo in 0..<ow {
                    var best = -T.infinity, at = win.rows[y].0 * w + win.cols[xo].0
                    search: for iy in win.rows[y].0..<win.rows[y].1 {
                        for ix in win.cols[xo].0..<win.cols[xo].1 {
                            let v = src[iy * w + ix]
                            if v.isNaN { best = v; at = iy * w + ix; break search }
                            if v > best { best = v; at = iy * w + ix }
                        }
                    }
                    let k = (p * oh + y) * ow + xo
                    po[k] = best
                    am[k] = at
                }
            }
        }
    }
}

private func poolScatter<T: TensorScalar>(_ g: Tensor, _ gx: Tensor, _ argmax: [Int], _ plane: Int, _ oplane: Int,
                                          _: T.Type) {
    let pg = g.pointer(T.self), px = gx.pointer(T.self)
    for k in 0..<argmax.count { px[(k / oplane) * plane + argmax[k]] += pg[k] }
}

/// Forward: out[p, i, j] = inv[i, j]·Σ window. Backward (`img` is the input gradient and
/// `grid` the output gradient): img[window] += inv[i, j]·grid[p, i, j].
private func windowMeanKernel<T: TensorScalar>(_ img: Tensor, _ grid: Tensor, _ rows: [(Int, Int)], _ cols: [(Int, Int)],
                                               _ inv: [Double], _ planes: Int, backward: Bool, _: T.Type) {
    let (h, w) = (img.shape[2], img.shape[3])
    let (oh, ow) = (rows.count, cols.count)
    let pi = img.pointer(T.self), pg = grid.pointer(T.self)
    for p in 0..<planes {
        let src = pi + p * h * w
        for y in 0..<oh {
            for x in 0..<ow {
                let k = (p * oh + y) * ow + x
                let scale = T(inv[y * ow + x])
                if backward {
                    let v = pg[k] * scale
                    for iy in rows[y].0..<rows[y].1 { for ix in cols[x].0..<cols[x].1 { src[iy * w + ix] += v } }
                } else {
                    var s: T = 0
                    for iy in rows[y].0..<rows[y].1 { for ix in cols[x].0..<cols[x].1 { s += src[iy * w + ix] } }
                    pg[k] = s * scale
                }
            }
        }
    }
}

/// Interpolation taps along one axis: for each output position, `count` input indices
/// (clamped to the axis) and their weights.
struct ResizeTaps {
    let count: Int
    let index: [Int]
    let weight: [Double]
}

func resizeTaps(_ n: Int, _ m: Int, _ mode: ResizeMode, alignCorners: Bool = false) -> ResizeTaps {
    let scale = Double(n) / Double(m)
    var index: [Int] = [], weight: [Double] = []
    func clampIndex(_ i: Int) -> Int { Swift.min(Swift.max(i, 0), n - 1) }
    for o in 0..<m {
        // As PyTorch's area_pixel_compute_source_index: the scale first, then times the index.
        var src = alignCorners ? (m > 1 ? Double(n - 1) / Double(m - 1) * Double(o) : 0) : (Double(o) + 0.5) * scale - 0.5
        switch mode {
        case .bilinear:
            src = Swift.max(src, 0)
            let i0 = Int(src.rounded(.down))
            let t = src - Double(i0)
            index += [clampIndex(i0), clampIndex(i0 + 1)]
            weight += [1 - t, t]
        case .bicubic:
            let i0 = Int(src.rounded(.down))
            let t = src - Double(i0)
            let a = -0.75
            func near(_ d: Double) -> Double { ((a + 2) * d - (a + 3)) * d * d + 1 }       // |d| ≤ 1
            func far(_ d: Double) -> Double { ((a * d - 5 * a) * d + 8 * a) * d - 4 * a }  // 1 < |d| < 2
            index += [clampIndex(i0 - 1), clampIndex(i0), clampIndex(i0 + 1), clampIndex(i0 + 2)]
            weight += [far(t + 1), near(t), near(1 - t), far(2 - t)]
        }
    }
    return ResizeTaps(count: mode == .bilinear ? 2 : 4, index: index, weight: weight)
}

/// Forward: out[p, y, x] = Σ wy·wx·img[p, iy, ix]. Backward (`img` is the input gradient,
/// `out` the output gradient): img[p, iy, ix] += wy·wx·out[p, y, x].
private func resizeKernel<T: TensorScalar>(_ img: Tensor, _ out: Tensor, _ ty: ResizeTaps, _ tx: ResizeTaps,
                                           _ planes: Int, backward: Bool, _: T.Type) {
    let (h, w) = (img.shape[2], img.shape[3])
    let (oh, ow) = (out.shape[2], out.shape[3])
    let pi = img.pointer(T.self), po = out.pointer(T.self)
    for p in 0..<planes {
        let src = pi + p * h * w, dst = po + p * oh * ow
        for y in 0..<oh {
            for x in 0..<ow {
                var s: T = 0
                let gout = dst[y * ow + x]
                for a in 0..<ty.count {
                    let iy = ty.index[y * ty.count + a], wy = ty.weight[y * ty.count + a]
                    for b in 0..<tx.count {
                        let ix = tx.index[x * tx.count + b]
                        let wgt = T(wy * tx.weight[x * tx.count + b])
                        if backward { src[iy * w + ix] += wgt * gout } else { s += wgt * src[iy * w + ix] }
                    }
                }
                if !backward { dst[y * ow + x] = s }
            }
        }
    }
}
