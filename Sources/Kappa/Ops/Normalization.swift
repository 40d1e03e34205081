import CKappaKernels
import RealModule

// Layer normalization over the last axis as one fused kernel: the forward pass saves the
// per-row mean and 1/σ, and the VJP is
//     x̂ = (x − μ)/σ,  ĝ = g ⊙ w,
//     dx = (ĝ − mean(ĝ) − x̂ ⊙ mean(ĝ ⊙ x̂)) / σ,  dw = Σ_rows g ⊙ x̂,  db = Σ_rows g.

extension Tensor {
    /// (x − mean)/√(var + eps) · weight + bias over the last axis (biased variance, as
    /// PyTorch's `LayerNorm`); `weight` and `bias` have the last axis' size or are `nil`.
    public func layerNorm(weight: Tensor?, bias: Tensor?, eps: Double = 1e-5) -> Tensor {
        precondition(rank >= 1, "layerNorm: input of shape \(shape) has no axis")
        let d = shape[rank - 1]
        for (name, p) in [("weight", weight), ("bias", bias)] {
            if let p {
                precondition(p.shape == [d], "layerNorm: \(name) \(p.shape) does not match the last axis of \(shape)")
                checkSameDType("layerNorm", self, p)
            }
        }
        var inputs = [self]
        if let weight { inputs.append(weight) }
        if let bias { inputs.append(bias) }
        let (hasWeight, hasBias) = (weight != nil, bias != nil)
        let rows = count / Swift.max(d, 1)
        // Residuals: x, the per-row mean and 1/σ, and the weight.
        return Tensor.custom("layerNorm", inputs, forward: { t in
            let x = t[0].contiguousData()
            let out = Tensor(uninitialized: x.shape, dtype: x.dtype)
            let stats = Tensor(uninitialized: [rows, 2], dtype: x.dtype)  // mean, 1/σ
            let w = hasWeight ? t[1].contiguousData() : nil, b = hasBias ? t[t.count - 1].contiguousData() : nil
            switch x.dtype {
            case .float32: layerNormForward(x, w, b, out, stats, rows, d, Float(eps), Float.self)
            case .float64: layerNormForward(x, w, b, out, stats, rows, d, eps, Double.self)
            }
            return ([out], [x, stats] + (w.map { [$0] } ?? []))
        }, vjp: { g, r in
            let (x, stats, w) = (r[0], r[1], hasWeight ? r[2] : nil)
            let gc = g[0].contiguousData()
            let gx = Tensor(uninitialized: x.shape, dtype: x.dtype)
            let gw = Tensor.zeros([d], dtype: x.dtype), gb = Tensor.zeros([d], dtype: x.dtype)
            switch x.dtype {
            case .float32: layerNormBackward(x, w, gc, stats, gx, gw, gb, rows, d, Float.self)
            case .float64: layerNormBackward(x, w, gc, stats, gx, gw, gb, rows, d, Double.self)
            }
            var grads: [Tensor?] = [gx]
            if hasWeight { grads.append(gw) }
            if hasBias { grads.append(gb) }
            return grads
        })[0]
    }
}

private func layerNormForward<T: TensorScalar>(_ x: Tensor, _ w: Tensor?, _ b: Tensor?, _ out: Tensor, _ stats: Tensor,
                                               _ rows: Int, _ d: Int, _ eps: T, _: T.Type) {
    let px = x.pointer(T.self), po = out.pointer(T.self), ps = stats.pointer(T.self)
    let pw = w?.pointer(T.self), pb = b?.pointer(T.self)
    if T.self == Float.self {
        // The C kernel, compiled for the host's vector units.
        Parallel.forEach(rows, costPerItem: 4 * d) { range in
            let o = range.lowerBound
            kappa_layernorm_rows_f32(f32(px + o * d), pw.map { f32($0) }, pb.map { f32($0) }, f32(po + o * d), f32(ps + 2 * o),
                                     range.count, d, Float(eps))
        }
        return
    }
    Parallel.forEach(rows, costPerItem: 4 * d) { range in
        for r in range {
            let row = px + r * d, y = po + r * d
            let mean = rowSum(row, d) / T(d)
            var v: T = 0
            for j in 0..<d { let c = row[j] - mean; v += c * c }
            let rstd = 1 / (v / T(d) + eps).squareRoot()
            ps[2 * r] = mean
            ps[2 * r + 1] = rstd
            switch (pw, pb) {
            case let (w?, b?): for j in 0..<d { y[j] = (row[j] - mean) * rstd * w[j] + b[j] }
            case let (w?, nil): for j in 0..<d { y[j] = (row[j] - mean) * rstd * w[j] }
            case let (nil, b?): for j in 0..<d { y[j] = (row[j] - mean) * rstd + b[j] }
            case (nil, nil): for j in 0..<d { y[j] = (row[j] - mean) * rstd }
            }
        }
    }
}

private func layerNormBackward<T: TensorScalar>(_ x: Tensor, _ w: Tensor?, _ g: Tensor, _ stats: Tensor, _ gx: Tensor,
                                                _ gw: Tensor, _ gb: Tensor, _ rows: Int, _ d: Int, _: T.Type) {
    let px = x.pointer(T.self), pg = g.pointer(T.self), ps = stats.pointer(T.self), pgx = gx.pointer(T.self)
    let pw = w?.pointer(T.self), pgw = gw.pointer(T.self), pgb = gb.pointer(T.self)
    if T.self == Float.self {
        Parallel.forEach(rows, costPerItem: 6 * d) { range in
            let o = range.lowerBound
            kappa_layernorm_backward_rows_f32(f32(px + o * d), pw.map { f32($0) }, f32(pg + o * d), f32(ps + 2 * o),
                                              f32(pgx + o * d), range.count, d)
        }
        kappa_layernorm_param_grads_f32(f32(px), f32(pg), f32(ps), f32(pgw), f32(pgb), rows, d)
        return
    }
    // Input gradient: rows are independent.
    Parallel.forEach(rows, costPerItem: 6 * d) { range in
        for r in range {
            let row = px + r * d, gr = pg + r * d, out = pgx + r * d
            let mean = ps[2 * r], rstd = ps[2 * r + 1]
            var sg: T = 0, sgx: T = 0
            for j in 0..<d {
                let gh = pw.map { gr[j] * $0[j] } ?? gr[j]
                sg += gh
                sgx += gh * (row[j] - mean) * rstd
            }
            let mg = sg / T(d), mgx = sgx / T(d)
            for j in 0..<d {
                let gh = pw.map { gr[j] * $0[j] } ?? gr[j]
                out[j] = (gh - mg - (row[j] - mean) * rstd * mgx) * rstd
            }
        }
    }
    // Parameter gradients: sums over rows, vectorized along the row.
    for r in 0..<rows {
        let row = px + r * d, gr = pg + r * d
        let mean = ps[2 * r], rstd = ps[2 * r + 1]
        for j in 0..<d {
            pgw[j] += gr[j] * (row[j] - mean) * rstd
            pgb[j] += gr[j]
        }
    }
}
