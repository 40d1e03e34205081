import CKappaKernels

// Multi-head self-attention as one op, on the packed projections of a fused qkv layer:
// qkv [B, N, 3·D] holds q, k and v of every head side by side (head h's q at columns
// h·dh..<(h+1)·dh, its k D columns later, its v 2D later), so each head's Q, K, V are
// N × dh matrices read in place with leading dimension 3D: no permuted copies. Per (image,
// head), with s the scale:
//     S = s·Q Kᵀ,  P = softmax(S) (rows),  O = P V   (written into out [B, N, D] at the head's columns)
// and the VJP, with P the one [N, N] residual per (image, head) it keeps:
//     dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ⊙ (dP − rowsum(dP ⊙ P)),  dQ = s·dS K,  dK = s·dSᵀ Q
// all written into one gradient [B, N, 3D] laid out as qkv. The (image, head) pairs are
// split over the cores.

extension Tensor {
    /// Multi-head scaled dot-product self-attention softmax(s·QKᵀ)V of packed projections
    /// `qkv` [B, N, 3·D] (q, k, v of all heads side by side, as a fused qkv linear layer
    /// produces them; D = heads·dh), returning the heads' outputs concatenated, [B, N, D], and
    /// the attention probabilities [B, heads, N, N] (a detached view of what backward keeps).
    /// `scale` defaults to 1/√dh.
    public func selfAttention(heads: Int, scale: Double? = nil) -> (output: Tensor, attention: Tensor) {
        precondition(rank == 3 && heads > 0 && shape[2] % (3 * heads) == 0,
                     "selfAttention: qkv \(shape) is not [B, N, 3·heads·dh] for \(heads) heads")
        let (b, n, d) = (shape[0], shape[1], shape[2] / 3)
        let dh = d / heads
        let s = scale ?? 1 / Double(dh).squareRoot()
        let geometry = AttentionGeometry(b: b, n: n, heads: heads, dh: dh, scale: s)
        var attention: Tensor?
        // Residuals: qkv and P, the one [N, N] matrix per (image, head) backward needs.
        let out = Tensor.custom("selfAttention", [self], forward: { t in
            let x = t[0].contiguousData()
            let out = Tensor(uninitialized: [b, n, d], dtype: x.dtype)
            let probabilities = Tensor(uninitialized: [b, heads, n, n], dtype: x.dtype)
            switch x.dtype {
            case .float32: attentionForward(x, out, probabilities, geometry, Float.self)
            case .float64: attentionForward(x, out, probabilities, geometry, Double.self)
            }
            attention = probabilities.detached()
            return ([out], [x, probabilities])
        }, vjp: { g, r in
            let (x, p) = (r[0], r[1])
            let gc = g[0].contiguousData()
            let gx = Tensor(uninitialized: x.shape, dtype: x.dtype)
            switch x.dtype {
            case .float32: attentionBackward(x, p, gc, gx, geometry, Float.self)
            case .float64: attentionBackward(x, p, gc, gx, geometry, Double.self)
            }
            return [gx]
        })[0]
        guard let attention else { preconditionFailure("selfAttention: forward produced no probabilities") }
        return (out, attention)
    }
}

struct AttentionGeometry {
    let b: Int, n: Int, heads: Int, dh: Int, scale: Double
    var d: Int { heads * dh }
    var pairs: Int { b * heads }
    /// Where (image, head) pair `i`'s q starts in qkv; its k is d later, its v 2d later.
    func qkvOffset(_ i: Int) -> Int { (i / heads) * n * 3 * d + (i % heads) * dh }
    /// Where pair `i`'s output columns start in [B, N, D].
    func outOffset(_ i: Int) -> Int { (i / heads) * n * d + (i % heads) * dh }
}

/// Runs `body` over the (image, head) pairs split into one chunk per core, each chunk with
/// `scratch` elements of its own.
private func forEachPairChunk<T: TensorScalar>(_ g: AttentionGeometry, scratch: Int, _: T.Type,
                                               _ body: (Range<Int>, UnsafeMutablePointer<T>) -> Void) {
    let work = g.pairs * g.n * g.n * g.dh * 4
    let chunks = Swift.max(1, Swift.min(Parallel.cores, g.pairs, work / Parallel.grain))
    let buffer = Tensor(uninitialized: [chunks, Swift.max(scratch, 1)], dtype: T.dtype)
    let pb = buffer.pointer(T.self)
    let range = { (c: Int) in (g.pairs * c / chunks)..<(g.pairs * (c + 1) / chunks) }
    Parallel.forEachChunk(chunks) { c in body(range(c), pb + c * scratch) }
}

/// Softmax of `rows` rows of `n`, from `x` into another buffer `y`.
@inline(__always)
private func softmaxRows<T: TensorScalar>(_ x: UnsafeMutablePointer<T>, _ y: UnsafeMutablePointer<T>, rows: Int, _ n: Int) {
    if T.self == Float.self {
        kappa_softmax_rows_f32(f32(x), f32(y), rows, n, 0)
        return
    }
    for r in 0..<rows {
        let xr = x + r * n, yr = y + r * n
        var m = -T.infinity
        for j in 0..<n where xr[j] > m { m = xr[j] }
        if m == -.infinity { m = 0 }
        var s: T = 0
        for j in 0..<n { yr[j] = T.exp(xr[j] - m); s += yr[j] }
        let inv = 1 / s
        for j in 0..<n { yr[j] *= inv }
    }
}

/// Softmax's backward on `rows` rows of `n`: gx = y ⊙ (g − Σ g ⊙ y); gx must not be g.
@inline(__always)
private func softmaxBackwardRows<T: TensorScalar>(_ g: UnsafeMutablePointer<T>, _ y: UnsafeMutablePointer<T>,
                                                  _ gx: UnsafeMutablePointer<T>, rows: Int, _ n: Int) {
    if T.self == Float.self {
        kappa_softmax_backward_rows_f32(f32(g), f32(y), f32(gx), rows, n, 0)
        return
    }
    for r in 0..<rows {
        let gr = g + r * n, yr = y + r * n, out = gx + r * n
        var s: T = 0
        for j in 0..<n { s += gr[j] * yr[j] }
        for j in 0..<n { out[j] = yr[j] * (gr[j] - s) }
    }
}

private func attentionForward<T: TensorScalar>(_ x: Tensor, _ out: Tensor, _ probabilities: Tensor, _ g: AttentionGeometry,
                                               _: T.Type) {
    let px = x.pointer(T.self), po = out.pointer(T.self), pp = probabilities.pointer(T.self)
    let (n, d, dh, ld) = (g.n, g.d, g.dh, 3 * g.d)
    // Over few tokens, the scores of several pairs go through one softmax call (their
    // probabilities are adjacent), so that its kernel has enough short rows to vectorize.
    let group = n <= 32 ? Swift.max(1, 256 / n) : 1
    forEachPairChunk(g, scratch: group * n * n, T.self) { pairs, scores in
        for first in stride(from: pairs.lowerBound, to: pairs.upperBound, by: group) {
            let last = Swift.min(first + group, pairs.upperBound)
            for i in first..<last {
                let q = px + g.qkvOffset(i), k = q + d
                gemm(false, true, n, n, dh, q, ld, k, ld, scores + (i - first) * n * n, n, alpha: T(g.scale))
            }
            softmaxRows(scores, pp + first * n * n, rows: (last - first) * n, n)
            for i in first..<last {
                let v = px + g.qkvOffset(i) + 2 * d
                gemm(false, false, n, dh, n, pp + i * n * n, n, v, ld, po + g.outOffset(i), d)
            }
        }
    }
}

private func attentionBackward<T: TensorScalar>(_ x: Tensor, _ probabilities: Tensor, _ gout: Tensor, _ gx: Tensor,
                                                _ g: AttentionGeometry, _: T.Type) {
    let px = x.pointer(T.self), pp = probabilities.pointer(T.self), pg = gout.pointer(T.self), pgx = gx.pointer(T.self)
    let (n, d, dh, ld) = (g.n, g.d, g.dh, 3 * g.d)
    forEachPairChunk(g, scratch: 2 * n * n, T.self) { pairs, dp in
        let ds = dp + n * n  // the row kernels take distinct input and output
        for i in pairs {
            let q = px + g.qkvOffset(i), k = q + d, v = q + 2 * d
            let dq = pgx + g.qkvOffset(i), dk = dq + d, dv = dq + 2 * d
            let p = pp + i * n * n, dout = pg + g.outOffset(i)
            gemm(true, false, n, dh, n, p, n, dout, d, dv, ld)              // dV = Pᵀ dO
            gemm(false, true, n, n, dh, dout, d, v, ld, dp, n)              // dP = dO Vᵀ
            softmaxBackwardRows(dp, p, ds, rows: n, n)                      // dS (unscaled)
            gemm(false, false, n, dh, n, ds, n, k, ld, dq, ld, alpha: T(g.scale))  // dQ = s·dS K
            gemm(true, false, n, dh, n, ds, n, q, ld, dk, ld, alpha: T(g.scale))   // dK = s·dSᵀ Q
        }
    }
}
