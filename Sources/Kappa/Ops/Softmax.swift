import CKappaKernels
import RealModule

// softmax and logSoftmax along an axis are fused kernels (forward and VJP), numerically
// stable by subtracting the maximum; L2 normalization and cross-entropy compose them.

extension Tensor {
    /// exp(x − max)/Σ exp(x − max) along `axis`. VJP: y ⊙ (g − Σ g ⊙ y).
    public func softmax(alongAxis axis: Int = -1) -> Tensor {
        softmaxOp(axis, log: false)
    }

    /// x − max − log Σ exp(x − max) along `axis`. VJP: g − exp(y) Σ g.
    public func logSoftmax(alongAxis axis: Int = -1) -> Tensor {
        softmaxOp(axis, log: true)
    }

    private func softmaxOp(_ axis: Int, log: Bool) -> Tensor {
        let name = log ? "logSoftmax" : "softmax"
        let L = ReductionLayout(self, axes: [axis], keepingDims: true, op: name)
        let out = Tensor(uninitialized: shape, dtype: dtype)
        switch dtype {
        case .float32: softmaxForward(L, out, log, Float.self)
        case .float64: softmaxForward(L, out, log, Double.self)
        }
        let y = out.detached()
        Tape.record(name, [self], out) { g in
            let gx = Tensor(uninitialized: y.shape, dtype: y.dtype)
            let gc = g.contiguousData()
            switch y.dtype {
            case .float32: softmaxBackward(L, gc, y, gx, log, Float.self)
            case .float64: softmaxBackward(L, gc, y, gx, log, Double.self)
            }
            return [gx]
        }
        return out
    }

    /// x / max(‖x‖₂, eps) along `axis` (PyTorch's `F.normalize`).
    public func l2Normalized(alongAxis axis: Int = -1, eps: Double = 1e-12) -> Tensor {
        self / norm(2, alongAxes: [axis], keepingDims: true).clamped(min: eps)
    }

    /// The cross-entropy −Σₖ tₖ log softmax(x)ₖ along `axis` between `logits` and target
    /// probabilities of the same shape, averaged over all other positions.
    public static func crossEntropy(logits: Tensor, targetProbabilities targets: Tensor, alongAxis axis: Int = -1) -> Tensor {
        precondition(logits.shape == targets.shape,
                     "crossEntropy: logits \(logits.shape) and targets \(targets.shape) differ")
        return -(targets * logits.logSoftmax(alongAxis: axis)).sum(alongAxis: axis).mean()
    }

    /// The cross-entropy of logits [N, C] against integer class labels, averaged over N.
    public static func crossEntropy(logits: Tensor, labels: [Int]) -> Tensor {
        precondition(logits.rank == 2 && logits.shape[0] == labels.count,
                     "crossEntropy: logits \(logits.shape) do not match \(labels.count) labels")
        let c = logits.shape[1]
        for l in labels { precondition(l >= 0 && l < c, "crossEntropy: label \(l) is out of range 0..<\(c)") }
        let index = Tensor(labels.map(Double.init), shape: [labels.count, 1], dtype: logits.dtype)
        return -logits.logSoftmax(alongAxis: 1).gather(alongAxis: 1, index: index).mean()
    }

    /// Zeroes each element with probability `probability` and scales the rest by
    /// 1/(1 − probability) when `training`; the identity otherwise.
    public func dropout(probability p: Double, training: Bool, using generator: inout RandomGenerator) -> Tensor {
        precondition(p >= 0 && p <= 1, "dropout: probability \(p) is outside [0, 1]")
        guard training && p > 0 else { return self }
        if p == 1 { return self * 0 }
        let mask = Tensor.bernoulli(shape, probability: 1 - p, dtype: dtype, using: &generator)
        return self * (mask / (1 - p))
    }
}

private func softmaxForward<T: TensorScalar>(_ L: ReductionLayout, _ out: Tensor, _ log: Bool, _: T.Type) {
    let px = L.data.pointer(T.self), py = out.pointer(T.self)
    let (outer, r, inner) = (L.outer, L.r, L.inner)
    if T.self == Float.self && inner == 1 {
        // Contiguous rows: the C kernel, compiled for the host's vector units.
        Parallel.forEach(outer, costPerItem: r * 4) { range in
            let o = range.lowerBound * r
            kappa_softmax_rows_f32(f32(px + o), f32(py + o), range.count, r, log ? 1 : 0)
        }
        return
    }
    Parallel.forEach(outer * inner, costPerItem: r * 4) { range in
        for item in range {
            let o = item / inner, i = item % inner
            let x = px + o * r * inner + i, y = py + o * r * inner + i
            // A NaN is skipped by the maximum but still propagates: exp(NaN − m) poisons the sum.
            var m = inner == 1 ? rowMax(x, r) : -T.infinity
            if inner > 1 { for j in 0..<r { let v = x[j * inner]; m = v > m ? v : m } }
            if m == -.infinity { m = 0 }  // all −∞: exp gives 0s, and log 0 = −∞ below
            var s: T = 0
            if inner == 1 {
                for j in 0..<r { y[j] = kernelExp(x[j] - m) }
                s = rowSum(y, r)
            } else {
                for j in 0..<r { let e = kernelExp(x[j * inner] - m); y[j * inner] = e; s += e }
            }
            if log {
                let ls = m + T.log(s)
                if inner == 1 {
                    for j in 0..<r { y[j] = x[j] - ls }
                } else {
                    for j in 0..<r { y[j * inner] = x[j * inner] - ls }
                }
            } else {
                let inv = 1 / s
                if inner == 1 {
                    for j in 0..<r { y[j] *= inv }
                } else {
                    for j in 0..<r { y[j * inner] *= inv }
                }
            }
        }
    }
}

private func softmaxBackward<T: TensorScalar>(_ L: ReductionLayout, _ g: Tensor, _ y: Tensor, _ gx: Tensor,
                                              _ log: Bool, _: T.Type) {
    let pg = g.pointer(T.self), py = y.pointer(T.self), pgx = gx.pointer(T.self)
    let (outer, r, inner) = (L.outer, L.r, L.inner)
    if T.self == Float.self && inner == 1 {
        Parallel.forEach(outer, costPerItem: r * 4) { range in
            let o = range.lowerBound * r
            kappa_softmax_backward_rows_f32(f32(pg + o), f32(py + o), f32(pgx + o), range.count, r, log ? 1 : 0)
        }
        return
    }
    Parallel.forEach(outer * inner, costPerItem: r * 4) { range in
        for item in range {
            let o = item / inner, i = item % inner
            let base = o * r * inner + i
            let gg = pg + base, yy = py + base, dx = pgx + base
            var s: T = 0
            if log {
                for j in 0..<r { s += gg[j * inner] }
                for j in 0..<r { dx[j * inner] = gg[j * inner] - kernelExp(yy[j * inner]) * s }
            } else {
                for j in 0..<r { s += gg[j * inner] * yy[j * inner] }
                for j in 0..<r { dx[j * inner] = yy[j * inner] * (gg[j * inner] - s) }
            }
        }
    }
}

/// max p[0..<n] with eight independent lanes (ignores NaN; callers propagate it otherwise).
@inline(__always)
func rowMax<T: TensorScalar>(_ p: UnsafeMutablePointer<T>, _ n: Int) -> T {
    var a = (-T.infinity, -T.infinity, -T.infinity, -T.infinity, -T.infinity, -T.infinity, -T.infinity, -T.infinity)
    var j = 0
    while j + 8 <= n {
        a.0 = p[j] > a.0 ? p[j] : a.0; a.1 = p[j + 1] > a.1 ? p[j + 1] : a.1
        a.2 = p[j + 2] > a.2 ? p[j + 2] : a.2; a.3 = p[j + 3] > a.3 ? p[j + 3] : a.3
        a.4 = p[j + 4] > a.4 ? p[j + 4] : a.4; a.5 = p[j + 5] > a.5 ? p[j + 5] : a.5
        a.6 = p[j + 6] > a.6 ? p[j + 6] : a.6; a.7 = p[j + 7] > a.7 ? p[j + 7] : a.7
        j += 8
    }
    while j < n { a.0 = p[j] > a.0 ? p[j] : a.0; j += 1 }
    return Swift.max(Swift.max(Swift.max(a.0, a.1), Swift.max(a.2, a.3)), Swift.max(Swift.max(a.4, a.5), Swift.max(a.6, a.7)))
}
