import Foundation
import Kappa
import Testing

@Suite("Tensor creation, views and printing")
struct TensorTests {
    @Test func creation() {
        #expect(Tensor.zeros([2, 3]).doubles == [0, 0, 0, 0, 0, 0])
        #expect(Tensor.ones([2], dtype: .float64).dtype == .float64)
        #expect(Tensor.full([2], 7.5).doubles == [7.5, 7.5])
        #expect(Tensor.arange(0, 5).doubles == [0, 1, 2, 3, 4])
        #expect(Tensor.arange(1, 2, step: 0.25, dtype: .float64).doubles == [1, 1.25, 1.5, 1.75])
        #expect(Tensor.arange(3, 0, step: -1).doubles == [3, 2, 1])
        #expect(Tensor.linspace(0, 1, count: 5, dtype: .float64).doubles == [0, 0.25, 0.5, 0.75, 1])
        #expect(Tensor.eye(3).doubles == [1, 0, 0, 0, 1, 0, 0, 0, 1])
        let t = Tensor(rows: [[1.0, 2], [3, 4]])
        #expect(t.shape == [2, 2] && t.dtype == .float64)
        #expect(Tensor([Float(1), 2]).dtype == .float32)
        #expect(Tensor(scalar: 3).shape == [] && Tensor(scalar: 3).item() == 3)
    }

    @Test func seededRandomIsBitIdentical() {
        var a = RandomGenerator(seed: 42), b = RandomGenerator(seed: 42)
        let x = Tensor.randomNormal([1000], using: &a), y = Tensor.randomNormal([1000], using: &b)
        #expect(x.scalars(as: Float.self) == y.scalars(as: Float.self))
        var c = RandomGenerator(seed: 43)
        #expect(Tensor.randomNormal([1000], using: &c).scalars(as: Float.self) != x.scalars(as: Float.self))
        // The stream itself is fixed: the first draws of seed 42 never change.
        var d = RandomGenerator(seed: 42)
        let first = Tensor.randomUniform([3], dtype: .float64, using: &d).doubles
        var e = RandomGenerator(seed: 42)
        #expect(first == [e.nextUniform(), e.nextUniform(), e.nextUniform()])
    }

    @Test func randomDistributions() {
        var g = RandomGenerator(seed: 7)
        let n = Tensor.randomNormal([200_000], mean: 1, std: 2, dtype: .float64, using: &g)
        #expect(Swift.abs(n.mean().item() - 1) < 0.02)
        #expect(Swift.abs(n.standardDeviation().item() - 2) < 0.02)
        let u = Tensor.randomUniform([100_000], low: -1, high: 3, dtype: .float64, using: &g)
        #expect(u.min().item() >= -1 && u.max().item() < 3)
        #expect(Swift.abs(u.mean().item() - 1) < 0.02)
        let t = Tensor.truncatedNormal([100_000], std: 1, lower: -1, upper: 1.5, dtype: .float64, using: &g)
        #expect(t.min().item() >= -1 && t.max().item() <= 1.5)
        // Mean of N(0,1) truncated to [-1, 1.5]: (φ(-1) − φ(1.5))/(Φ(1.5) − Φ(-1)) ≈ 0.1462.
        #expect(Swift.abs(t.mean().item() - 0.1462) < 0.01)
    }

    @Test func broadcasting() {
        let a = Tensor([1.0, 2, 3], shape: [3, 1])
        let b = Tensor([10.0, 20], shape: [2])
        let c = a + b
        #expect(c.shape == [3, 2])
        #expect(c.doubles == [11, 21, 12, 22, 13, 23])
        let d = Tensor([1.0, 2, 3, 4, 5, 6], shape: [2, 1, 3]) * Tensor([1.0, 10], shape: [2, 1])
        #expect(d.shape == [2, 2, 3])
        #expect(d.doubles == [1, 2, 3, 10, 20, 30, 4, 5, 6, 40, 50, 60])
        #expect((Tensor([2.0, 4]) / 2).doubles == [1, 2])
        #expect((1 - Tensor([2.0, 4])).doubles == [-1, -3])
        #expect((8 / Tensor([2.0, 4])).doubles == [4, 2])
    }

    @Test func viewsShareStorage() {
        let x = Tensor.arange(0, 24, dtype: .float64).reshape([2, 3, 4])
        let t = x.transposed(0, 2)
        #expect(t.shape == [4, 3, 2] && t.sharesStorage(with: x) && !t.isContiguous)
        #expect(t[element: [3, 2, 1]] == x[element: [1, 2, 3]])
        let s = x.slice(alongAxis: 2, from: 1, to: 4, by: 2)
        #expect(s.sharesStorage(with: x))
        #expect(s.doubles == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23])
        #expect(x.reshape([6, 4]).sharesStorage(with: x))
        #expect(x.unsqueezed(axis: 1).shape == [2, 1, 3, 4])
        #expect(x.unsqueezed(axis: -1).shape == [2, 3, 4, 1])
        #expect(x.unsqueezed(axis: 0).squeezed().shape == [2, 3, 4])
        let e = Tensor([1.0, 2, 3]).expanded(to: [2, 3])
        #expect(e.doubles == [1, 2, 3, 1, 2, 3] && e.strides == [0, 1])
        // A non-contiguous reshape copies.
        #expect(!t.reshape([24]).sharesStorage(with: x))
        #expect(t.contiguous().isContiguous)
        #expect(x[1, .all, .range(0..<4, step: 3)].doubles == [12, 15, 16, 19, 20, 23])
        #expect(x[0..<1].shape == [1, 3, 4])
        #expect(x[.newAxis].shape == [1, 2, 3, 4])
        #expect(x[-1, -1, -1].item() == 23)
        #expect(x.flattened(startAxis: 1).shape == [2, 12])
    }

    @Test func shapeOps() {
        let a = Tensor([1.0, 2, 3, 4], shape: [2, 2]), b = Tensor([5.0, 6], shape: [1, 2])
        #expect(Tensor.concat([a, b]).doubles == [1, 2, 3, 4, 5, 6])
        #expect(Tensor.concat([a, a], alongAxis: 1).doubles == [1, 2, 1, 2, 3, 4, 3, 4])
        #expect(Tensor.stack([a, a], alongAxis: 1).shape == [2, 2, 2])
        let parts = Tensor.arange(0, 7, dtype: .float64).chunk(3)
        #expect(parts.map(\.shape) == [[3], [3], [1]])
        #expect(parts[2].doubles == [6])
        #expect(a.padded([(1, 0), (0, 2)], value: -1).doubles == [-1, -1, -1, -1, 1, 2, -1, -1, 3, 4, -1, -1])
        #expect(a.indexSelect(alongAxis: 0, indices: [1, 1, 0]).doubles == [3, 4, 3, 4, 1, 2])
        let idx = Tensor([1.0, 0, 0, 0], shape: [2, 2])
        #expect(a.gather(alongAxis: 1, index: idx).doubles == [2, 1, 3, 3])
        #expect(Tensor.zeros([2, 2], dtype: .float64).scatterAdd(alongAxis: 1, index: idx, source: a).doubles == [2, 1, 7, 0])
        #expect(Tensor.oneHot([2, 0], classes: 3).doubles == [0, 0, 1, 1, 0, 0])
        #expect(a.maskedFill(a.gt(2), 0).doubles == [1, 2, 0, 0])
    }

    @Test func unfoldPatchesOrder() {
        // One image, 2 channels, 4×4, patches of 2: patch 1 is the top-right block.
        let x = Tensor.arange(0, 32, dtype: .float64).reshape([1, 2, 4, 4])
        let p = x.unfoldPatches(size: 2)
        #expect(p.shape == [1, 4, 8])
        #expect(p[0, 1].doubles == [2, 3, 6, 7, 18, 19, 22, 23])
    }

    @Test func printing() {
        let t = Tensor([1.0, 2.5, 3, 4], shape: [2, 2])
        #expect(t.description == "Tensor(shape: [2, 2], dtype: float64)\n[[1., 2.5],\n [3., 4.]]")
        let big = Tensor.arange(0, 100).reshape([10, 10])
        let lines = big.description.split(separator: "\n")
        #expect(lines[1] == "[[0., 1., 2., ..., 7., 8., 9.],")
        #expect(big.description.contains("..."))
        let r = Tensor([1.0]).requiringGrad()
        #expect(r.description.hasPrefix("Tensor(shape: [1], dtype: float64, requiresGrad)"))
        #expect((r * 2).description.contains("gradFn: mul"))
    }

    @Test func comparisonsAndArgExtrema() {
        let x = Tensor([3.0, 1, 4, 1, 5, 9, 2, 6], shape: [2, 4])
        #expect(x.argmax(alongAxis: 1).doubles == [2, 1])
        #expect(x.argmin(alongAxis: 1).doubles == [1, 2])
        #expect(x.argmax().item() == 5)
        #expect(x.gt(2).doubles == [1, 0, 1, 0, 1, 1, 0, 1])
        #expect(x.eq(1).sum().item() == 2)
        #expect(x.sign().doubles.allSatisfy { $0 == 1 })
        #expect(x.max(alongAxes: [0, 1]).item() == 9)
        #expect(x.min(alongAxis: 0).doubles == [3, 1, 2, 1])
    }

    @Test func reductionsMatchClosedForms() {
        let x = Tensor.arange(1, 7, dtype: .float64).reshape([2, 3])
        #expect(x.sum().item() == 21)
        #expect(x.sum(alongAxis: 0).doubles == [5, 7, 9])
        #expect(x.sum(alongAxis: 1, keepingDims: true).shape == [2, 1])
        #expect(x.mean(alongAxis: 1).doubles == [2, 5])
        #expect(x.variance(alongAxes: [1]).doubles == [1, 1])
        #expect(x.variance(alongAxes: [1], correction: 0).doubles.map { ($0 * 3).rounded() } == [2, 2])
        expectClose(x.norm(2, alongAxes: [1]).doubles, [Double(14).squareRoot(), Double(77).squareRoot()])
        expectClose(x.norm(1).doubles, [21])
        let row1: Double = [1.0, 2, 3].map { Foundation.exp($0) }.reduce(0, +)
        let row2: Double = [4.0, 5, 6].map { Foundation.exp($0) }.reduce(0, +)
        expectClose(x.logSumExp(alongAxes: [1]).doubles, [Foundation.log(row1), Foundation.log(row2)])
        // Sum of a large tensor over three axes, one of them non-adjacent.
        let y = Tensor.ones([3, 4, 5, 6], dtype: .float64)
        #expect(y.sum(alongAxes: [0, 2]).doubles == [Double](repeating: 15, count: 24))
        let big = Tensor.ones([1 << 18])
        #expect(big.sum().item() == Double(1 << 18))
    }

    /// Sums over axes that are not side by side (summed in place, no permuted copy) equal a
    /// direct sum over the multi-index, in both types, with size-1 axes among them and with
    /// kept and reduced groups in either order.
    @Test func interleavedAxisSumsEqualDirectSums() {
        let cases: [([Int], [Int])] = [([3, 4, 5], [0, 2]), ([2, 3, 4, 5], [0, 2, 3]), ([2, 3, 4, 5], [1, 3]),
                                       ([2, 1, 3, 4], [0, 3]), ([4, 3, 2, 2, 3], [0, 2, 4]), ([3, 4, 5], [0, 1])]
        for (shape, axes) in cases {
            let x = randn(shape, seed: 17)
            let values = x.doubles
            var expected = [Double](repeating: 0, count: values.count)
            var strides = [Int](repeating: 1, count: shape.count)
            for i in stride(from: shape.count - 2, through: 0, by: -1) { strides[i] = strides[i + 1] * shape[i + 1] }
            var keptShape = shape
            for a in axes { keptShape[a] = 1 }
            var keptStrides = [Int](repeating: 1, count: shape.count)
            for i in stride(from: shape.count - 2, through: 0, by: -1) { keptStrides[i] = keptStrides[i + 1] * keptShape[i + 1] }
            for (flat, v) in values.enumerated() {
                var o = 0
                for i in 0..<shape.count where !axes.contains(i) { o += (flat / strides[i]) % shape[i] * keptStrides[i] }
                expected[o] += v
            }
            let kept = keptShape.reduce(1, *)
            let got = x.sum(alongAxes: axes, keepingDims: true)
            #expect(got.shape == keptShape)
            expectClose(got.doubles, Array(expected.prefix(kept)), tol: 1e-12)
            let got32 = x.to(.float32).sum(alongAxes: axes)
            expectClose(got32.doubles, Array(expected.prefix(kept)), tol: 1e-5)
        }
    }

    @Test func stableSoftmax() {
        let x = Tensor([1000.0, 1001, 1002, -1000, 0, 1000], shape: [2, 3], dtype: .float32)
        let p = x.softmax(alongAxis: 1).doubles
        #expect(p.allSatisfy { $0.isFinite })
        expectClose(Array(p[0..<3]), [0.09003057, 0.24472847, 0.66524096], tol: 1e-6)
        let lp = x.logSoftmax(alongAxis: 1).doubles
        #expect(lp.allSatisfy { $0.isFinite })
        expectClose([lp[3], lp[4], lp[5]], [-2000, -1000, 0], tol: 1e-3)
        // Along a non-last axis.
        let y = Tensor([0.0, 0, Foundation.log(3.0), 0], shape: [2, 2]).softmax(alongAxis: 0)
        expectClose(y.doubles, [0.25, 0.5, 0.75, 0.5])
        let n = Tensor([3.0, 4]).l2Normalized()
        expectClose(n.doubles, [0.6, 0.8])
    }

    @Test func matmulValues() {
        let a = Tensor([1.0, 2, 3, 4, 5, 6], shape: [2, 3])
        let b = Tensor([7.0, 8, 9, 10, 11, 12], shape: [3, 2])
        #expect(a.matmul(b).doubles == [58, 64, 139, 154])
        #expect(a.transposed().matmul(a).doubles == [17, 22, 27, 22, 29, 36, 27, 36, 45])
        #expect(Tensor([1.0, 2, 3]).matmul(Tensor([4.0, 5, 6])).item() == 32)
        #expect(a.matmul(Tensor([1.0, 1, 1])).doubles == [6, 15])
        #expect(Tensor([1.0, 1]).matmul(a).doubles == [5, 7, 9])
        // Batched with broadcasting: [2, 1, 2, 3] × [4, 3, 2] → [2, 4, 2, 2].
        let x = randn([2, 1, 2, 3], seed: 1), y = randn([4, 3, 2], seed: 2)
        let z = x.matmul(y)
        #expect(z.shape == [2, 4, 2, 2])
        let ref = x[1, 0].matmul(y[3])
        expectClose(z[1, 3].doubles, ref.doubles, tol: 1e-12)
        // Float32 through sgemm.
        #expect(a.to(.float32).matmul(b.to(.float32)).scalars(as: Float.self) == [58, 64, 139, 154])
    }

    /// Geometries that reach every branch of im2col/col2im: strides 1–3 on either axis,
    /// padding wider than the kernel's reach (whole rows and columns outside), dilation, the
    /// wide grid of stride 1 with and without padding, and the pointwise 1×1 product.
    static let convGeometries: [(kernel: Size2, stride: Size2, padding: Size2, dilation: Size2)] = [
        (Size2(3, 2), Size2(2, 1), Size2(1, 2), Size2(1, 2)),
        (Size2(3, 3), Size2(1, 1), Size2(1, 1), Size2(1, 1)),
        (Size2(1, 1), Size2(2, 2), Size2(0, 0), Size2(1, 1)),
        (Size2(2, 3), Size2(3, 2), Size2(3, 4), Size2(2, 1)),
        (Size2(3, 1), Size2(1, 3), Size2(2, 0), Size2(2, 1)),
        (Size2(3, 3), Size2(1, 1), Size2(0, 0), Size2(1, 1)),
        (Size2(1, 1), Size2(1, 1), Size2(0, 0), Size2(1, 1)),
        (Size2(3, 2), Size2(1, 1), Size2(2, 1), Size2(2, 1)),
    ]

    @Test(arguments: convGeometries.indices) func convolutionMatchesDirectSum(geometry: Int) {
        let (k, st, pd, dl) = Self.convGeometries[geometry]
        let (h, w) = (7, 6)
        let x = randn([2, 3, h, w], seed: 3), wt = randn([4, 3, k.height, k.width], seed: 4), bias = randn([4], seed: 5)
        let y = x.conv2d(weight: wt, bias: bias, stride: st, padding: pd, dilation: dl)
        let oh = (h + 2 * pd.height - dl.height * (k.height - 1) - 1) / st.height + 1
        let ow = (w + 2 * pd.width - dl.width * (k.width - 1) - 1) / st.width + 1
        #expect(y.shape == [2, 4, oh, ow])
        var worst = 0.0
        for n in 0..<2 { for o in 0..<4 { for i in 0..<oh { for j in 0..<ow {
            var s = bias[element: [o]]
            for c in 0..<3 { for ki in 0..<k.height { for kj in 0..<k.width {
                let iy = i * st.height - pd.height + ki * dl.height, ix = j * st.width - pd.width + kj * dl.width
                if iy >= 0 && iy < h && ix >= 0 && ix < w { s += wt[element: [o, c, ki, kj]] * x[element: [n, c, iy, ix]] }
            } } }
            worst = Swift.max(worst, Swift.abs(s - y[element: [n, o, i, j]]))
        } } } }
        #expect(worst < 1e-12)
        // The input gradient goes through col2im, the adjoint: ⟨conv(x), g⟩ = ⟨x, ∂/∂x⟩ (no bias).
        let xv = x.detached()
        xv.requiresGrad = true
        let g = randn(y.shape, seed: 6)
        let plain = xv.conv2d(weight: wt, stride: st, padding: pd, dilation: dl)
        (plain * g).sum().backward()
        let lhs = (plain.detached() * g).sum().item(), rhs = (x * xv.grad!).sum().item()
        #expect(Swift.abs(lhs - rhs) < 1e-10 * Swift.max(1, Swift.abs(lhs)))
    }

    /// Float32 convolutions of the ResNet's kinds (3×3 at stride 1 or 2 with padding 1, 1×1 at
    /// stride 2) run the direct kernels where the CPU has AVX-512 (`HostKernels.vectorLevel`):
    /// output, input gradient and weight gradient equal the Float64 path (im2col / shifted
    /// products) to Float32 rounding, on outputs from 2×2 to 28×28 (blocks of 16 pixels cut rows
    /// and the plane's end; below 64 pixels the images are stacked channel by channel, so blocks
    /// span images), odd sizes at stride 2 (a phase one row or column short), channel counts
    /// that take each register block, and batches split over the cores.
    @Test(arguments: [(4, 4, 3, 8, 1, 3), (5, 7, 1, 13, 1, 3), (7, 7, 8, 5, 1, 3), (28, 28, 8, 8, 1, 3),
                      (13, 9, 16, 4, 1, 3), (2, 9, 2, 1, 1, 3), (2, 2, 6, 9, 1, 3), (4, 4, 16, 16, 1, 3),
                      (28, 28, 8, 16, 2, 3), (14, 14, 16, 32, 2, 3), (7, 7, 5, 9, 2, 3), (9, 6, 3, 4, 2, 3),
                      (4, 4, 32, 64, 2, 3), (28, 28, 8, 16, 2, 1), (7, 7, 5, 9, 2, 1), (9, 6, 3, 20, 2, 1)])
    func directConvolutionEqualsFloat64(h: Int, w: Int, c: Int, o: Int, stride: Int, kernel: Int) throws {
        // A debug build leaves the direct kernels off by default (unoptimized, they are slower
        // than BLAS); they are what this test is for.
        try #require(HostKernels.hasDirectConvolution, "the direct kernels need AVX-512 (this CPU: \(HostKernels.vectorLevel))")
        HostKernels.withDirectConvolution(true) { checkDirectConvolution(h, w, c, o, stride, kernel) }
    }

    /// Thousands of 7×7 images stacked in one chunk: the kernels' mask tables move from the
    /// stack to the heap past 16,384 blocks of 16 pixels.
    @Test func directConvolutionOfAManyImageStack() throws {
        try #require(HostKernels.hasDirectConvolution, "the direct kernels need AVX-512 (this CPU: \(HostKernels.vectorLevel))")
        HostKernels.withDirectConvolution(true) { checkDirectConvolution(7, 7, 1, 2, 1, 3, batch: 12_000) }
    }

    func checkDirectConvolution(_ h: Int, _ w: Int, _ c: Int, _ o: Int, _ stride: Int, _ kernel: Int, batch b: Int = 5) {
        let pad = kernel / 2
        let oh = (h + 2 * pad - kernel) / stride + 1, ow = (w + 2 * pad - kernel) / stride + 1
        let x = randn([b, c, h, w], seed: 41), wt = randn([o, c, kernel, kernel], seed: 42)
        let gy = randn([b, o, oh, ow], seed: 43)
        let x32 = x.to(.float32).requiringGrad(), w32 = wt.to(.float32).requiringGrad()
        let y32 = x32.conv2d(weight: w32, stride: Size2(stride, stride), padding: Size2(pad, pad))
        (y32 * gy.to(.float32)).sum().backward()
        let x64 = x.detached().requiringGrad(), w64 = wt.detached().requiringGrad()
        let y64 = x64.conv2d(weight: w64, stride: Size2(stride, stride), padding: Size2(pad, pad))
        (y64 * gy).sum().backward()
        #expect(y32.shape == [b, o, oh, ow])
        #expect(worstRelativeError(y32, y64) < 1e-5, "output")
        #expect(worstRelativeError(x32.grad!, x64.grad!) < 1e-5, "input gradient")
        #expect(worstRelativeError(w32.grad!, w64.grad!) < 1e-5, "weight gradient")
        // An input that needs no gradient gets none; the weight's is the same.
        let w2 = wt.to(.float32).requiringGrad()
        (x.to(.float32).conv2d(weight: w2, stride: Size2(stride, stride), padding: Size2(pad, pad)) * gy.to(.float32))
            .sum().backward()
        #expect(w2.grad!.scalars(as: Float.self) == w32.grad!.scalars(as: Float.self))
        // An empty batch gives an empty output and a zero weight gradient.
        let w0 = wt.to(.float32).requiringGrad()
        let y0 = Tensor.zeros([0, c, h, w]).conv2d(weight: w0, stride: Size2(stride, stride), padding: Size2(pad, pad))
        #expect(y0.shape == [0, o, oh, ow])
        y0.sum().backward()
        #expect(w0.grad!.scalars(as: Float.self).allSatisfy { $0 == 0 })
    }

    /// Binary and `where` ops large enough to be split over the cores by rows, on a permuted
    /// view, a broadcast operand and a layout whose inner dimensions coalesce, equal the same
    /// ops element by element.
    @Test func splitBroadcastLoopsEqualElementByElement() {
        let base = randn([40, 64, 33], seed: 31)
        let a = base.permuted([1, 2, 0])                        // [64, 33, 40], not contiguous
        let b = randn([33, 1], seed: 32)                        // broadcast over rows and columns
        let c = randn([1, 33, 40], seed: 33)                    // inner dimensions coalesce
        #expect(a.count >= 1 << 16, "large enough to be split")
        let av = a.contiguous().doubles, bv = b.doubles, cv = c.doubles
        let sum = a + b, product = a * c, chosen = Tensor.where(a.gt(0), c, b)
        let (sv, pv, wv) = (sum.doubles, product.doubles, chosen.doubles)
        for i in 0..<64 { for j in 0..<33 { for k in 0..<40 {
            let n = (i * 33 + j) * 40 + k
            guard sv[n] == av[n] + bv[j], pv[n] == av[n] * cv[j * 40 + k],
                  wv[n] == (av[n] > 0 ? cv[j * 40 + k] : bv[j]) else {
                Issue.record("element [\(i), \(j), \(k)]: \(sv[n]), \(pv[n]), \(wv[n])")
                return
            }
        } } }
    }

    /// A batch large enough to be split over the cores (one BLAS thread per chunk) gives what
    /// each image gives alone, forward and backward.
    @Test func convolutionOfABatchEqualsImageByImage() {
        var g = RandomGenerator(seed: 9)
        let x = Tensor.randomNormal([12, 8, 20, 20], using: &g).requiringGrad()
        let w = Tensor.randomNormal([16, 8, 3, 3], using: &g).requiringGrad()
        let gy = Tensor.randomNormal([12, 16, 10, 10], using: &g)
        let y = x.conv2d(weight: w, stride: 2, padding: 1)
        (y * gy).sum().backward()
        var gw = [Float](repeating: 0, count: w.count)
        for n in 0..<12 {
            let xn = x.detached()[n..<(n + 1)].contiguous().requiringGrad(), wn = w.detached().requiringGrad()
            let yn = xn.conv2d(weight: wn, stride: 2, padding: 1)
            (yn * gy[n..<(n + 1)]).sum().backward()
            #expect(yn.scalars(as: Float.self) == y[n..<(n + 1)].scalars(as: Float.self))
            #expect(xn.grad!.scalars(as: Float.self) == x.grad![n..<(n + 1)].scalars(as: Float.self))
            for (i, v) in wn.grad!.scalars(as: Float.self).enumerated() { gw[i] += v }
        }
        let worst = zip(gw, w.grad!.scalars(as: Float.self)).map { abs($0 - $1) / max(1, abs($1)) }.max()!
        #expect(worst < 1e-4)
    }

    @Test func poolingAndResizeValues() {
        let x = Tensor.arange(0, 16, dtype: .float64).reshape([1, 1, 4, 4])
        #expect(x.maxPool2d(kernel: 2).doubles == [5, 7, 13, 15])
        #expect(x.avgPool2d(kernel: 2).doubles == [2.5, 4.5, 10.5, 12.5])
        #expect(x.avgPool2d(kernel: 3, stride: 2, padding: 1).doubles[0] == 10.0 / 9)
        #expect(x.adaptiveAvgPool2d(1).doubles == [7.5])
        // 5 → 3 bins: [0,2), [1,4), [3,5)
        let r = Tensor.arange(0, 5, dtype: .float64).reshape([1, 1, 1, 5]).adaptiveAvgPool2d(Size2(1, 3))
        #expect(r.doubles == [0.5, 2, 3.5])
        // Resizing a linear ramp keeps it linear away from the borders, and a constant stays constant.
        let c = Tensor.full([1, 2, 3, 3], 2.5, dtype: .float64)
        expectClose(c.resized(height: 7, width: 5, mode: .bicubic).doubles, [Double](repeating: 2.5, count: 70), tol: 1e-12)
        let ramp = Tensor.arange(0, 4, dtype: .float64).reshape([1, 1, 1, 4])
        // PyTorch: F.interpolate(torch.arange(4.).view(1,1,1,4), size=(1,8), mode='bilinear')
        expectClose(ramp.resized(height: 1, width: 8).doubles, [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3])
        // Reference values printed by PyTorch 2.15 (float64):
        // F.interpolate(torch.arange(4.).view(1,1,1,4), size=(1,8), mode='bicubic')
        expectClose(ramp.resized(height: 1, width: 8, mode: .bicubic).doubles,
                    [-0.10546875, 0.19140625, 0.66796875, 1.296875, 1.703125, 2.33203125, 2.80859375, 3.10546875], tol: 1e-12)
        // F.interpolate(torch.arange(12.).view(1,1,3,4), size=(5,3), mode='bicubic')
        let grid = Tensor.arange(0, 12, dtype: .float64).reshape([1, 1, 3, 4])
        expectClose(grid.resized(height: 5, width: 3, mode: .bicubic).doubles,
                    [-0.2578425925925923, 1.1159999999999988, 2.489842592592591, 1.390157407407404, 2.763999999999994,
                     4.137842592592586, 4.126157407407409, 5.5, 6.873842592592593, 6.862157407407405, 8.235999999999995,
                     9.609842592592587, 8.510157407407412, 9.884000000000002, 11.257842592592594], tol: 1e-12)
        // F.interpolate(torch.arange(12.).view(1,1,3,4), size=(2,7), mode='bilinear')
        expectClose(grid.resized(height: 2, width: 7).doubles,
                    [1.0, 1.357142857142857, 1.9285714285714286, 2.5, 3.071428571428571, 3.642857142857143, 4.0,
                     7.0, 7.357142857142858, 7.928571428571429, 8.5, 9.071428571428571, 9.642857142857144, 10.0], tol: 1e-12)
    }

    @Test func dropout() {
        var g = RandomGenerator(seed: 1)
        let x = Tensor.ones([10000], dtype: .float64)
        let y = x.dropout(probability: 0.25, training: true, using: &g)
        let kept = y.gt(0).sum().item()
        #expect(Swift.abs(kept / 10000 - 0.75) < 0.02)
        #expect(y.doubles.allSatisfy { $0 == 0 || Swift.abs($0 - 1 / 0.75) < 1e-12 })
        #expect(x.dropout(probability: 0.5, training: false, using: &g) === x)
    }

    @Test func bufferPoolReuses() {
        let before = BufferPool.shared.hits
        for _ in 0..<10 { _ = Tensor.zeros([12345]) + 1 }
        #expect(BufferPool.shared.hits - before >= 10)
    }
}

@Suite("Float32 kernels against libm")
struct FastMathTests {
    @Test func float32ExpWithinTwoUlp() {
        var xs: [Float] = stride(from: Float(-87.25), through: 88.6, by: 0.0137).map { $0 }
        xs += [0, -0.0, 1e-30, -1e-30, 1, -1, 0.5, 88.7, -87.3]
        let y = Tensor(xs).exp().scalars(as: Float.self)
        var worst: Float = 0
        for (x, v) in zip(xs, y) {
            let ref = Foundation.exp(x)
            worst = Swift.max(worst, Swift.abs(v - ref) / ref.ulp)
        }
        #expect(worst <= 2, "worst error \(worst) ulp")
        let special = Tensor([Float.nan, .infinity, -.infinity, 100, -100, 89]).exp().scalars(as: Float.self)
        #expect(special[0].isNaN)
        #expect(special[1] == .infinity && special[2] == 0 && special[3] == .infinity && special[4] == 0 && special[5] == .infinity)
        // GELU in Float32 (vectorizable erf) against the Float64 path.
        let g = (0...2000).map { Float(-8 + 0.008 * Double($0)) }
        let g32 = Tensor(g).gelu().scalars(as: Float.self)
        let g64 = Tensor(g.map(Double.init)).gelu().scalars(as: Double.self)
        let geluError = zip(g32, g64).map { Swift.abs(Double($0) - $1) }.max()!
        #expect(geluError < 1e-6, "GELU Float32 error \(geluError)")
        // Relative accuracy everywhere, deep lower tail included (Φ from erfc, no cancellation):
        // within 5e-6 for |x| ≤ 5, within 5e-5 down to x = −13 (the Float32 rounding of x²
        // in the exponent dominates there), for normal Float32 results.
        let tail = (0...2600).map { Float(-13 + 0.01 * Double($0)) }
        let t32 = Tensor(tail).gelu().scalars(as: Float.self), t64 = Tensor(tail.map(Double.init)).gelu().scalars(as: Double.self)
        for (x, (a, b)) in zip(tail, zip(t32, t64)) where Swift.abs(b) > 1e-35 {
            let relative = Swift.abs(Double(a) - b) / Swift.abs(b)
            if relative > (Swift.abs(x) <= 5 ? 5e-6 : 5e-5) { Issue.record("GELU Float32 at \(x): relative error \(relative)"); break }
        }
        let d = Tensor(g).requiringGrad()
        d.gelu().sum().backward()
        let d64 = Tensor(g.map(Double.init)).requiringGrad()
        d64.gelu().sum().backward()
        let derivativeError = zip(d.grad!.scalars(as: Double.self), d64.grad!.scalars(as: Double.self)).map { Swift.abs($0 - $1) }.max()!
        #expect(derivativeError < 1e-6, "GELU′ Float32 error \(derivativeError)")
        // The kernel's fast path (|x| ≤ 4) and its erfc form beyond, mixed in one block, and
        // the values no polynomial covers.
        let mixed: [Float] = [.nan, .infinity, -.infinity, 100, -100, 4, -4, 4.0001, -4.0001, 0, 1, -1, -6, 6]
        let mixedValues = Tensor(mixed).gelu().scalars(as: Float.self)
        let mixed64 = Tensor(mixed.map(Double.init)).gelu().scalars(as: Double.self)
        #expect(mixedValues[0].isNaN && mixedValues[1] == .infinity && mixedValues[3] == 100 && mixedValues[4] == 0)
        for i in 5..<mixed.count {
            #expect(Swift.abs(Double(mixedValues[i]) - mixed64[i]) <= 5e-6 * Swift.abs(mixed64[i]), "GELU Float32 at \(mixed[i])")
        }
        // Softmax keeps NaN visible instead of hiding it.
        #expect(Tensor([Float(1), .nan, 2]).softmax().scalars(as: Float.self).allSatisfy { $0.isNaN })
    }

    /// Short rows (attention over a few tokens) take the kernel's transposed path 16 rows at a
    /// time and the row loop for the rest: both must agree with each other and with Float64.
    @Test func softmaxOfShortRowsMatchesFloat64() {
        var g = RandomGenerator(seed: 11)
        for d in [1, 2, 5, 17, 32, 33] {
            let rows = 37  // two blocks of 16 and five rows left over
            var x = (0..<(rows * d)).map { _ in Float(g.nextNormal() * 4) }
            // Row 3 (in a block) and row 35 (left over) are equal, with −∞ and a NaN in others.
            for j in 0..<d { x[35 * d + j] = x[3 * d + j] }
            for j in 0..<d { x[5 * d + j] = -.infinity; x[36 * d + j] = -.infinity }
            x[7 * d] = .nan
            if d > 1 { x[9 * d + 1] = -.infinity }
            let t = Tensor(x, shape: [rows, d]), t64 = Tensor(x.map(Double.init), shape: [rows, d])
            for log in [false, true] {
                let y = (log ? t.logSoftmax(alongAxis: 1) : t.softmax(alongAxis: 1)).scalars(as: Float.self)
                let y64 = (log ? t64.logSoftmax(alongAxis: 1) : t64.softmax(alongAxis: 1)).scalars(as: Double.self)
                for i in 0..<(rows * d) {
                    if y64[i].isNaN || y64[i].isInfinite {
                        #expect(y[i].isNaN == y64[i].isNaN && (y64[i].isNaN || y[i] == Float(y64[i])), "d \(d) log \(log) at \(i): \(y[i]) against \(y64[i])")
                    } else {
                        #expect(Swift.abs(Double(y[i]) - y64[i]) <= 2e-6 * Swift.max(1, Swift.abs(y64[i])), "d \(d) log \(log) at \(i): \(y[i]) against \(y64[i])")
                    }
                }
                #expect(Array(y[(3 * d)..<(4 * d)]) == Array(y[(35 * d)..<(36 * d)]), "d \(d) log \(log): block and row loop differ")
                #expect(y[(5 * d)..<(6 * d)].allSatisfy(\.isNaN) == y[(36 * d)..<(37 * d)].allSatisfy(\.isNaN))
            }
        }
    }
}
