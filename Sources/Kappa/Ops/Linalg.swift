import Dispatch
import CBLAS
import CKappaKernels

// Matrix products. Every product goes to cblas_sgemm/cblas_dgemm, or, in Float32 on AVX-512,
// to Kappa's own kernel (``HostKernels/usesDirectMatmul``); a transposed view is passed with a
// transpose flag and its leading dimension instead of being copied.
// d(A·B) = G·Bᵀ for A and Aᵀ·G for B; broadcast batch dimensions are summed by the tape.

/// How a 2-D strided view is handed to BLAS without copying, if it can be.
private struct MatrixOperand {
    let transpose: Bool
    let ld: Int

    /// `nil` when the view's strides fit neither row-major nor column-major storage.
    init?(rows: Int, cols: Int, rowStride rs: Int, colStride cs: Int) {
        if (cs == 1 || cols == 1) && (rows == 1 || rs >= Swift.max(cols, 1)) {
            transpose = false
            ld = rows == 1 ? Swift.max(cols, 1) : rs
        } else if (rs == 1 || rows == 1) && (cols == 1 || cs >= Swift.max(rows, 1)) {
            transpose = true
            ld = cols == 1 ? Swift.max(rows, 1) : cs
        } else {
            return nil
        }
    }

    /// `t`'s last two dimensions as an operand, with the tensor that holds them: `t` itself,
    /// or a contiguous copy when its strides fit neither layout.
    static func of(_ t: Tensor) -> (Tensor, MatrixOperand) {
        let r = t.rank
        if let op = MatrixOperand(rows: t.shape[r - 2], cols: t.shape[r - 1],
                                  rowStride: t.strides[r - 2], colStride: t.strides[r - 1]) {
            return (t, op)
        }
        let c = t.contiguousData()
        return (c, MatrixOperand(rows: c.shape[r - 2], cols: c.shape[r - 1],
                                 rowStride: c.strides[r - 2], colStride: c.strides[r - 1])!)
    }
}

/// Whether a product of this shape and type goes to Kappa's direct kernel: Float32, the kernel
/// switched on (``HostKernels/usesDirectMatmul``, read here, on the op's own thread, so that
/// every chunk of the op agrees), at least 2²⁰ multiply-adds, and rows of C at least 32 wide
/// with at most a fifth of the last 32-column panel left empty. Smaller products stay with
/// OpenBLAS's small-matrix kernels, which are faster there.
func usesDirectProduct<T: TensorScalar>(_: T.Type, _ m: Int, _ n: Int, _ k: Int) -> Bool {
    T.dtype == .float32 && m * n * k >= 1 << 20 && n >= 32 && ((n + 31) / 32 * 32 - n) * 4 <= n
        && HostKernels.usesDirectMatmul
}

/// C = alpha·op(A)·op(B) + beta·C (+ bias in every row) for row-major storage, on the calling
/// thread: through BLAS, or Kappa's kernel when `direct` (Float32 only); a bias needs `direct`.
/// With `aSums` (direct only), the kernel may also write each row's sum of op(A) there
/// (`kappa_gemm_f32_sums`); the result says whether it did.
@inline(__always) @discardableResult
func gemm<T: TensorScalar>(_ transA: Bool, _ transB: Bool, _ m: Int, _ n: Int, _ k: Int,
                           _ a: UnsafePointer<T>, _ lda: Int, _ b: UnsafePointer<T>, _ ldb: Int,
                           _ c: UnsafeMutablePointer<T>, _ ldc: Int, alpha: T = 1, beta: T = 0,
                           direct: Bool = false, bias: UnsafePointer<T>? = nil,
                           aSums: UnsafeMutablePointer<T>? = nil) -> Bool {
    let ta = transA ? CblasTrans : CblasNoTrans, tb = transB ? CblasTrans : CblasNoTrans
    precondition(bias == nil || direct, "gemm: a bias is added by the direct kernel only")
    precondition(aSums == nil || direct, "gemm: row sums of A come from the direct kernel only")
    switch T.dtype {
    case .float32 where direct:
        return a.withMemoryRebound(to: Float.self, capacity: 1) { pa in
            b.withMemoryRebound(to: Float.self, capacity: 1) { pb in
                c.withMemoryRebound(to: Float.self, capacity: 1) { pc in
                    let pbias = bias.map { UnsafeRawPointer($0).assumingMemoryBound(to: Float.self) }
                    let psums = aSums.map { UnsafeMutableRawPointer($0).assumingMemoryBound(to: Float.self) }
                    return kappa_gemm_f32_sums(transA ? 1 : 0, transB ? 1 : 0, m, n, k, Float(alpha), pa, lda, pb, ldb,
                                               Float(beta), pc, ldc, pbias, psums) != 0
                }
            }
        }
    case .float32:
        a.withMemoryRebound(to: Float.self, capacity: 1) { pa in
            b.withMemoryRebound(to: Float.self, capacity: 1) { pb in
                c.withMemoryRebound(to: Float.self, capacity: 1) { pc in
                    cblas_sgemm(CblasRowMajor, ta, tb, Int32(m), Int32(n), Int32(k), Float(alpha), pa, Int32(lda), pb,
                                Int32(ldb), Float(beta), pc, Int32(ldc))
                }
            }
        }
        return false
    case .float64:
        a.withMemoryRebound(to: Double.self, capacity: 1) { pa in
            b.withMemoryRebound(to: Double.self, capacity: 1) { pb in
                c.withMemoryRebound(to: Double.self, capacity: 1) { pc in
                    cblas_dgemm(CblasRowMajor, ta, tb, Int32(m), Int32(n), Int32(k), Double(alpha), pa, Int32(lda), pb,
                                Int32(ldb), Double(beta), pc, Int32(ldc))
                }
            }
        }
        return false
    }
}

/// ``gemm`` split over the cores when the product is large (at least 2²¹ multiply-adds):
/// the longer of C's two sides cut into one block per core, each block one BLAS call on its
/// own thread (OpenBLAS runs single-threaded; see ``Parallel/cores``).
/// A direct product's columns are split at multiples of 32, its kernel's panel width.
/// With `aSums`, as ``gemm``: the result says whether every row's sum of op(A) was written.
@discardableResult
func parallelGemm<T: TensorScalar>(_ transA: Bool, _ transB: Bool, _ m: Int, _ n: Int, _ k: Int,
                                   _ a: UnsafePointer<T>, _ lda: Int, _ b: UnsafePointer<T>, _ ldb: Int,
                                   _ c: UnsafeMutablePointer<T>, _ ldc: Int, beta: T = 0,
                                   direct: Bool = false, bias: UnsafePointer<T>? = nil,
                                   aSums: UnsafeMutablePointer<T>? = nil) -> Bool {
    let cores = Parallel.cores  // first use sets OpenBLAS to one thread
    let chunks = m * n * k >= 1 << 21 ? Swift.min(cores, Swift.max(m, n) / 16) : 1
    if chunks <= 1 {
        return gemm(transA, transB, m, n, k, a, lda, b, ldb, c, ldc, beta: beta, direct: direct, bias: bias, aSums: aSums)
    }
    // Split by rows, every chunk sums its own rows, and all decide alike (the kernel's choice
    // depends on n and lda, which they share); split by columns, the first chunk sums all rows.
    // Either way the first chunk's answer is the product's.
    var summed = false
    withUnsafeMutablePointer(to: &summed) { summed in
        Parallel.forEachChunk(chunks) { chunk in
            let wrote: Bool
            if m >= n {
                let (i0, i1) = (m * chunk / chunks, m * (chunk + 1) / chunks)
                wrote = gemm(transA, transB, i1 - i0, n, k, a + (transA ? i0 : i0 * lda), lda, b, ldb, c + i0 * ldc, ldc,
                             beta: beta, direct: direct, bias: bias, aSums: aSums.map { $0 + i0 })
            } else {
                let panels = direct ? (n + 31) / 32 : n, width = direct ? 32 : 1
                let (j0, j1) = (Swift.min(n, panels * chunk / chunks * width), Swift.min(n, panels * (chunk + 1) / chunks * width))
                wrote = gemm(transA, transB, m, j1 - j0, k, a, lda, b + (transB ? j0 * ldb : j0), ldb, c + j0, ldc,
                             beta: beta, direct: direct, bias: bias.map { $0 + j0 }, aSums: chunk == 0 ? aSums : nil)
            }
            if chunk == 0 { summed.pointee = wrote }
        }
    }
    return summed
}

extension Tensor {
    /// The matrix product, following NumPy's `matmul`: 1-D × 1-D is a dot product; a 1-D
    /// operand is a row (left) or column (right) vector; operands of rank ≥ 2 are stacks
    /// of matrices whose batch dimensions broadcast.
    public func matmul(_ other: Tensor) -> Tensor {
        let a = self, b = other
        precondition(a.rank >= 1 && b.rank >= 1, "matmul: \(a.shape) × \(b.shape): operands must have rank ≥ 1")
        switch (a.rank, b.rank) {
        case (1, 1):
            return a.unsqueezed(axis: 0).matmul(b.unsqueezed(axis: 1)).reshape([])
        case (1, _):
            return a.unsqueezed(axis: 0).matmul(b).squeezed(axis: -2)
        case (_, 1):
            return a.matmul(b.unsqueezed(axis: 1)).squeezed(axis: -1)
        default:
            return Tensor.batchedMatmul(a, b)
        }
    }

    /// `a.matmul(b)`.
    public static func matmul(_ a: Tensor, _ b: Tensor) -> Tensor { a.matmul(b) }

    /// x·Wᵀ + b over the last axis of `x` (PyTorch's `nn.functional.linear`), as one op: the
    /// direct kernel (``HostKernels/usesDirectMatmul``) adds the bias as it stores the product,
    /// and through BLAS the bias is written into the output first and the product added to it,
    /// so the output is not written by a product and then again by a broadcast add.
    /// - Parameters:
    ///   - x: [..., in]; leading dimensions are merged into rows.
    ///   - weight: [out, in].
    ///   - bias: [out], or nil.
    /// - Returns: [..., out]. Gradients: G·W for x, Gᵀ·x for W, G summed over rows for b.
    public static func linear(_ x: Tensor, weight: Tensor, bias: Tensor? = nil) -> Tensor {
        precondition(weight.rank == 2 && x.rank >= 1 && x.shape.last == weight.shape[1],
                     "linear: input \(x.shape) does not end in the weight's \(weight.shape) input features")
        let (outFeatures, inFeatures) = (weight.shape[0], weight.shape[1])
        checkSameDType("linear", x, weight)
        if let bias {
            precondition(bias.shape == [outFeatures], "linear: bias \(bias.shape) is not [\(outFeatures)] (weight \(weight.shape))")
            checkSameDType("linear", x, bias)
        }
        let rows = x.rank == 2 ? x : x.reshape([-1, inFeatures])
        let out = Tensor(uninitialized: [rows.shape[0], outFeatures], dtype: x.dtype)
        switch x.dtype {
        case .float32: linearKernel(rows, weight, bias, out, Float.self)
        case .float64: linearKernel(rows, weight, bias, out, Double.self)
        }
        var inputs = [rows, weight]
        if let bias { inputs.append(bias) }
        Tape.record("linear", inputs, out) { g in
            let dx = rows._requiresGrad ? g.matmul(weight) : nil
            if let bias, weight._requiresGrad, bias._requiresGrad,
               let (dw, db) = linearParameterGradients(g, rows) {
                return [dx, dw, db]
            }
            var grads = [dx, weight._requiresGrad ? g.transposed().matmul(rows) : nil]
            if let bias { grads.append(bias._requiresGrad ? g.sum(alongAxis: 0) : nil) }
            return grads
        }
        return x.rank == 2 ? out : out.reshape(Array(x.shape.dropLast()) + [outFeatures])
    }

    private static func batchedMatmul(_ a: Tensor, _ b: Tensor) -> Tensor {
        checkSameDType("matmul", a, b)
        let (m, k) = (a.shape[a.rank - 2], a.shape[a.rank - 1])
        let (k2, n) = (b.shape[b.rank - 2], b.shape[b.rank - 1])
        precondition(k == k2, "matmul: \(a.shape) × \(b.shape): inner dimensions \(k) and \(k2) differ")
        let batchA = Array(a.shape.dropLast(2)), batchB = Array(b.shape.dropLast(2))
        guard let batch = broadcastShapes(batchA, batchB) else {
            preconditionFailure("matmul: \(a.shape) × \(b.shape): batch dimensions \(batchA) and \(batchB) cannot be broadcast")
        }
        let out = Tensor(uninitialized: batch + [m, n], dtype: a.dtype)
        switch a.dtype {
        case .float32: matmulKernel(a, b, out, batch, m, n, k, Float.self)
        case .float64: matmulKernel(a, b, out, batch, m, n, k, Double.self)
        }
        Tape.record("matmul", [a, b], out) { g in
            [a._requiresGrad ? g.matmul(b.transposed()) : nil,
             b._requiresGrad ? a.transposed().matmul(g) : nil]
        }
        return out
    }
}

/// A linear layer's weight and bias gradients, Gᵀ·x and G summed over rows, from one pass of
/// the direct kernel, which sums the rows of G as it copies them for the product: the same
/// values, bit for bit, as `g.transposed().matmul(rows)` and `g.sum(alongAxis: 0)` (both sum
/// the rows in order, one after the other, in Float32), without a second pass over G. `nil`
/// where that kernel does not take the product (see ``usesDirectProduct``; or G is not stored
/// row by row); the kernel may also decline the sums, which are then taken separately.
private func linearParameterGradients(_ g: Tensor, _ rows: Tensor) -> (Tensor, Tensor)? {
    let (r, outFeatures, inFeatures) = (rows.shape[0], g.shape[1], rows.shape[1])
    guard g.dtype == .float32, usesDirectProduct(Float.self, outFeatures, inFeatures, r),
          let opG = MatrixOperand(rows: r, cols: outFeatures, rowStride: g.strides[0], colStride: g.strides[1]),
          !opG.transpose else { return nil }
    let (x, opX) = MatrixOperand.of(rows)
    let dw = Tensor(uninitialized: [outFeatures, inFeatures], dtype: .float32)
    let db = Tensor(uninitialized: [outFeatures], dtype: .float32)
    let summed = parallelGemm(true, opX.transpose, outFeatures, inFeatures, r, UnsafePointer(g.pointer(Float.self)),
                              opG.ld, UnsafePointer(x.pointer(Float.self)), opX.ld, dw.pointer(Float.self), inFeatures,
                              direct: true, aSums: db.pointer(Float.self))
    return (dw, summed ? db : g.sum(alongAxis: 0))
}

/// The forward of ``Tensor/linear(_:weight:bias:)``: rows·Wᵀ + bias stored by the direct
/// kernel; through BLAS, each row of `out` [rows, out] set to the bias, then rows·Wᵀ added
/// (beta = 1), or written (beta = 0) without a bias.
private func linearKernel<T: TensorScalar>(_ rows: Tensor, _ weight: Tensor, _ bias: Tensor?, _ out: Tensor, _: T.Type) {
    let (m, n, k) = (out.shape[0], out.shape[1], rows.shape[1])
    let bias = bias.map { $0.isContiguous ? $0 : $0.contiguousData() }
    if let bias, usesDirectProduct(T.self, m, n, k) {
        // The direct kernel adds the bias as it stores each row of the product.
        matmulKernel(rows, weight.transposed(), out, [], m, n, k, T.self, bias: bias)
        return
    }
    if let bias {
        let pb = bias.pointer(T.self), po = out.pointer(T.self)
        Parallel.forEach(m, costPerItem: n) { r in
            for i in r { (po + i * n).update(from: pb, count: n) }
        }
    }
    matmulKernel(rows, weight.transposed(), out, [], m, n, k, T.self, beta: bias == nil ? 0 : 1)
}

/// out = a0·b0 (+ beta·out), batched; `bias` [n] (added to every row, a single product
/// only) needs the direct kernel (``usesDirectProduct``).
private func matmulKernel<T: TensorScalar>(_ a0: Tensor, _ b0: Tensor, _ out: Tensor, _ batch: [Int],
                                           _ m: Int, _ n: Int, _ k: Int, _: T.Type, beta: T = 0, bias: Tensor? = nil) {
    if m == 0 || n == 0 { return }
    if k == 0 {
        if beta == 0 { out.pointer(T.self).update(repeating: 0, count: out.count) }
        return
    }
    let (a, opA) = MatrixOperand.of(a0), (b, opB) = MatrixOperand.of(b0)
    let pa = a.pointer(T.self), pb = b.pointer(T.self), pc = out.pointer(T.self)
    let batchCount = shapeCount(batch)
    let bBatchStrides = broadcastStrides(shape: Array(b.shape.dropLast(2)), strides: Array(b.strides.dropLast(2)), to: batch)
    let aBatchStrides = broadcastStrides(shape: Array(a.shape.dropLast(2)), strides: Array(a.strides.dropLast(2)), to: batch)

    // One product when B is shared by every batch and A's batch and row dimensions merge
    // into one row dimension: [batch·M, K] × [K, N].
    if batchCount > 1 && bBatchStrides.allSatisfy({ $0 == 0 }) && !opA.transpose {
        let (s, st) = coalesce(batch + [m], [aBatchStrides + [a.strides[a.rank - 2]]])
        if s.count == 1 && st[0][0] == opA.ld {
            parallelGemm(false, opB.transpose, batchCount * m, n, k, pa, opA.ld, pb, opB.ld, pc, n, beta: beta,
                         direct: usesDirectProduct(T.self, batchCount * m, n, k))
            return
        }
    }
    if batchCount == 1 {
        let direct = usesDirectProduct(T.self, m, n, k)
        precondition(bias == nil || direct, "matmulKernel: a bias needs the direct kernel")
        parallelGemm(opA.transpose, opB.transpose, m, n, k, pa, opA.ld, pb, opB.ld, pc, n, beta: beta,
                     direct: direct, bias: bias.map { UnsafePointer($0.pointer(T.self)) })
        return
    }
    var offsets: [(a: Int, b: Int)] = []
    offsets.reserveCapacity(batchCount)
    forEachRun(batch, [aBatchStrides, bBatchStrides]) { off, step, runs in
        for i in 0..<runs { offsets.append((off[0] + i * step[0], off[1] + i * step[1])) }
    }
    // Many small products (attention: 192 of 65×64×65) are spread over the cores, each on
    // one thread; large ones are split themselves; tiny batches stay on the calling thread.
    let work = m * n * k
    let chunks = work < 1 << 21 && batchCount * work >= 1 << 18 ? Swift.min(Parallel.cores, batchCount) : 1
    if chunks > 1 {
        Parallel.forEachChunk(chunks) { chunk in
            for c in (batchCount * chunk / chunks)..<(batchCount * (chunk + 1) / chunks) {
                gemm(opA.transpose, opB.transpose, m, n, k, pa + offsets[c].a, opA.ld, pb + offsets[c].b, opB.ld, pc + c * m * n, n, beta: beta)
            }
        }
    } else {
        let direct = usesDirectProduct(T.self, m, n, k)
        for (c, o) in offsets.enumerated() {
            parallelGemm(opA.transpose, opB.transpose, m, n, k, pa + o.a, opA.ld, pb + o.b, opB.ld, pc + c * m * n, n, beta: beta,
                         direct: direct)
        }
    }
}
