import CKappaKernels
import Kappa
import Testing

/// Kappa's own Float32 matrix-product kernel (``HostKernels/usesDirectMatmul``): every path
/// that reaches it agrees with the Float64 products through BLAS, and the ops really run it.
/// A debug build leaves it off by default (unoptimized, it is slower than BLAS); each test
/// turns it on for its own task.
@Suite struct DirectMatmulTests {
    /// `linear` forward and its three gradients, on shapes that take each edge of the kernel:
    /// rows not a multiple of its 12, columns not a multiple of its 32, k past one block of
    /// 256 (600), columns past one packed block (700), the input gradient's transposed B and
    /// the weight gradient's transposed A (lda 1024, the copied micro-panel).
    @Test(arguments: [(1000, 64, 96), (37, 300, 130), (50, 600, 64), (20, 200, 700), (64, 1024, 48), (300, 64, 1024)])
    func linearEqualsFloat64(rows: Int, inFeatures: Int, outFeatures: Int) throws {
        try #require(HostKernels.hasDirectMatmul, "the direct kernel needs AVX-512 (this CPU: \(HostKernels.vectorLevel))")
        let x = randn([rows, inFeatures], seed: 51), w = randn([outFeatures, inFeatures], seed: 52)
        let b = randn([outFeatures], seed: 53), gy = randn([rows, outFeatures], seed: 54)
        let x64 = x.detached().requiringGrad(), w64 = w.detached().requiringGrad(), b64 = b.detached().requiringGrad()
        (Tensor.linear(x64, weight: w64, bias: b64) * gy).sum().backward()
        let x32 = x.to(.float32).requiringGrad(), w32 = w.to(.float32).requiringGrad(), b32 = b.to(.float32).requiringGrad()
        let y32 = HostKernels.withDirectMatmul(true) {
            let y = Tensor.linear(x32, weight: w32, bias: b32)
            (y * gy.to(.float32)).sum().backward()
            return y
        }
        #expect(worstRelativeError(y32, Tensor.linear(x, weight: w, bias: b)) < 1e-5, "output")
        #expect(worstRelativeError(x32.grad!, x64.grad!) < 1e-5, "input gradient")
        #expect(worstRelativeError(w32.grad!, w64.grad!) < 1e-5, "weight gradient")
        #expect(worstRelativeError(b32.grad!, b64.grad!) < 1e-5, "bias gradient")
    }

    /// `matmul` on transposed views (each operand passed to the kernel as stored), a stack whose
    /// rows merge into one product against a shared B, and a stack of separate products.
    @Test func matmulEqualsFloat64() throws {
        try #require(HostKernels.hasDirectMatmul, "the direct kernel needs AVX-512 (this CPU: \(HostKernels.vectorLevel))")
        // Built per dtype from the same values, so that the Float32 operands are views too.
        let cases: [(DType) -> (Tensor, Tensor)] = [
            { (randn([300, 200], seed: 61).to($0).transposed(), randn([64, 300], seed: 62).to($0).transposed()) },  // Aᵀ·Bᵀ
            { (randn([3, 100, 80], seed: 63).to($0), randn([80, 96], seed: 64).to($0)) },                          // merged rows
            { (randn([2, 150, 70], seed: 65).to($0), randn([2, 70, 128], seed: 66).to($0)) },                      // one product per batch
        ]
        for make in cases {
            let (a, b) = make(.float64), (a32, b32) = make(.float32)
            #expect(a32.strides == a.strides && b32.strides == b.strides)
            let got = HostKernels.withDirectMatmul(true) { a32.matmul(b32) }
            let expected = a.matmul(b)
            #expect(got.shape == expected.shape)
            #expect(worstRelativeError(got, expected) < 1e-5, "\(a.shape) × \(b.shape)")
        }
    }

    /// The kernel's result does not depend on how the product is split over threads: rows split
    /// anywhere and columns split at multiples of 32 (as ``parallelGemm`` splits them) give the
    /// whole product's bits, for each layout of A and B and k past one block.
    @Test func splitProductsEqualTheWholeBitForBit() throws {
        try #require(HostKernels.hasDirectMatmul, "the direct kernel needs AVX-512 (this CPU: \(HostKernels.vectorLevel))")
        let (m, n, k) = (77, 200, 600)
        let a = randn([m * k], seed: 81, dtype: .float32).scalars(as: Float.self)
        let b = randn([k * n], seed: 82, dtype: .float32).scalars(as: Float.self)
        let bias = randn([n], seed: 83, dtype: .float32).scalars(as: Float.self)
        for (ta, tb) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let (lda, ldb) = (ta == 1 ? m : k, tb == 1 ? k : n)
            var whole = [Float](repeating: 0, count: m * n)
            kappa_gemm_f32(Int32(ta), Int32(tb), m, n, k, 1, a, lda, b, ldb, 0, &whole, n, bias)
            var split = [Float](repeating: .nan, count: m * n)
            a.withUnsafeBufferPointer { pa in
                b.withUnsafeBufferPointer { pb in
                    bias.withUnsafeBufferPointer { pbias in
                        split.withUnsafeMutableBufferPointer { pc in
                            for (i0, i1) in [(0, 30), (30, m)] {
                                for (j0, j1) in [(0, 96), (96, n)] {
                                    kappa_gemm_f32(Int32(ta), Int32(tb), i1 - i0, j1 - j0, k, 1,
                                                   pa.baseAddress! + (ta == 1 ? i0 : i0 * lda), lda,
                                                   pb.baseAddress! + (tb == 1 ? j0 * ldb : j0), ldb, 0,
                                                   pc.baseAddress! + i0 * n + j0, n, pbias.baseAddress! + j0)
                                }
                            }
                        }
                    }
                }
            }
            #expect(split == whole, "trans_a \(ta), trans_b \(tb)")
        }
    }

    /// `kappa_gemm_f32_sums` sums the rows of a transposed A as it copies them: the product has
    /// `kappa_gemm_f32`'s bits, and the sums are the rows summed in order in Float32 (what
    /// `sum(alongAxis: 0)` of G computes for a linear layer's bias), for all of k packed at once,
    /// k in blocks, columns in slices, rows in several copied blocks and a partial micro-panel.
    /// Where A is read in place (n < 128) the kernel declines the sums.
    @Test(arguments: [(100, 130, 300), (600, 160, 700), (37, 1100, 512), (1000, 128, 40), (30, 96, 500)])
    func rowSumsOfTransposedA(m: Int, n: Int, k: Int) throws {
        try #require(HostKernels.hasDirectMatmul, "the direct kernel needs AVX-512 (this CPU: \(HostKernels.vectorLevel))")
        let a = randn([k * m], seed: 91, dtype: .float32).scalars(as: Float.self)  // A stored [k, m]
        let b = randn([k * n], seed: 92, dtype: .float32).scalars(as: Float.self)
        var plain = [Float](repeating: 0, count: m * n), fused = [Float](repeating: .nan, count: m * n)
        var sums = [Float](repeating: .nan, count: m)
        kappa_gemm_f32(1, 0, m, n, k, 1, a, m, b, n, 0, &plain, n, nil)
        let written = kappa_gemm_f32_sums(1, 0, m, n, k, 1, a, m, b, n, 0, &fused, n, nil, &sums)
        #expect(fused == plain)
        if n >= 128 {
            var expected = [Float](repeating: 0, count: m)
            for step in 0..<k { for i in 0..<m { expected[i] += a[step * m + i] } }
            #expect(written == 1)
            #expect(sums == expected)
        } else {
            #expect(written == 0)
            #expect(sums.allSatisfy { $0.isNaN }, "declined sums are left alone")
        }
    }

    /// `linear`'s weight and bias gradients through the fused pass are bit for bit those of
    /// the two separate ops (Gᵀ·x by the same kernel, G summed over rows), whether the product
    /// is split over threads by rows (out ≥ in) or by columns (the first chunk sums).
    @Test(arguments: [(700, 160, 200), (500, 384, 96), (64, 1024, 48)])
    func linearBiasGradientEqualsTheSeparateSum(rows: Int, inFeatures: Int, outFeatures: Int) throws {
        try #require(HostKernels.hasDirectMatmul, "the direct kernel needs AVX-512 (this CPU: \(HostKernels.vectorLevel))")
        let x = randn([rows, inFeatures], seed: 93, dtype: .float32)
        let w = randn([outFeatures, inFeatures], seed: 94, dtype: .float32).requiringGrad()
        let b = randn([outFeatures], seed: 95, dtype: .float32).requiringGrad()
        let gy = randn([rows, outFeatures], seed: 96, dtype: .float32)
        HostKernels.withDirectMatmul(true) { (Tensor.linear(x, weight: w, bias: b) * gy).sum().backward() }
        let (dw, db) = HostKernels.withDirectMatmul(true) { (gy.transposed().matmul(x), gy.sum(alongAxis: 0)) }
        #expect(w.grad!.scalars(as: Float.self) == dw.scalars(as: Float.self))
        #expect(b.grad!.scalars(as: Float.self) == db.scalars(as: Float.self))
    }

    /// With the switch on, `linear` returns exactly what the kernel computes (so the op runs it);
    /// a shape below the kernel's minimum, and the switch off, go to BLAS and still agree.
    @Test func linearRunsTheKernel() throws {
        try #require(HostKernels.hasDirectMatmul, "the direct kernel needs AVX-512 (this CPU: \(HostKernels.vectorLevel))")
        let (m, k, n) = (130, 96, 160)
        let x = randn([m, k], seed: 71).to(.float32), w = randn([n, k], seed: 72).to(.float32), b = randn([n], seed: 73).to(.float32)
        let viaOp = HostKernels.withDirectMatmul(true) { Tensor.linear(x, weight: w, bias: b) }.scalars(as: Float.self)
        let xs = x.scalars(as: Float.self), ws = w.scalars(as: Float.self), bs = b.scalars(as: Float.self)
        var direct = [Float](repeating: .nan, count: m * n)
        kappa_gemm_f32(0, 1, m, n, k, 1, xs, k, ws, k, 0, &direct, n, bs)
        #expect(viaOp == direct)
        let viaBLAS = HostKernels.withDirectMatmul(false) { Tensor.linear(x, weight: w, bias: b) }
        #expect(worstRelativeError(viaBLAS, Tensor.linear(x.to(.float64), weight: w.to(.float64), bias: b.to(.float64))) < 1e-5)
        // Below 2²⁰ multiply-adds the product stays with BLAS, switch on or not.
        let few = x[0..<8]
        let small = HostKernels.withDirectMatmul(true) { Tensor.linear(few, weight: w, bias: b) }
        let smallBLAS = HostKernels.withDirectMatmul(false) { Tensor.linear(few, weight: w, bias: b) }
        #expect(small.scalars(as: Float.self) == smallBLAS.scalars(as: Float.self))
    }
}
