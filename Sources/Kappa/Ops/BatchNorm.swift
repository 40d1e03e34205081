import CKappaKernels

// Batch normalization over the channel axis 1 of [N, C, *] as one fused op (PyTorch's
// `F.batch_norm`), kernels in C (`CKappaKernels`): per channel, one pass for the mean and
// one for the variance over the N·L elements of the channel (L the product of the trailing
// axes; sums in double, no permuted copy), one pass for y = x·γr + (β − μγr), and in backward
// one pass for the two channel sums and one for the input gradient:
//     x̂ = (x − μ)·r,  r = 1/√(σ² + eps),  M = N·L
//     dβ = Σ g,  dγ = Σ g·x̂
//     training:  dx = γr·(g − dβ/M − x̂·dγ/M)     (μ and σ² depend on x)
//     eval:      dx = γr·g                         (running statistics are constants)
// With `applyingReLU` the op returns max(y, 0) and g is taken as 0 where the output is 0.
// With `synchronizing` (SyncBatchNorm) the batch is split over processes: the statistics
// combine each process's count, mean and biased variance exactly (Chan et al.'s pairwise
// formula, two sums), M becomes the total count, and backward sums dβ and dγ over all
// processes for the input gradient, which is then that of the whole batch (dγ and dβ stay
// this process's: data-parallel training averages parameter gradients afterwards).

extension Tensor {
    /// Batch normalization of [N, C, *] over every axis but the channel axis 1, as PyTorch's
    /// `F.batch_norm`: in `training`, the batch statistics normalize (biased variance) and
    /// `runningMean`/`runningVariance`, when given, are updated in place with `momentum`
    /// (the unbiased variance, as PyTorch); otherwise the running statistics normalize.
    /// `weight` (γ) and `bias` (β) have shape [C] or are `nil`. With `applyingReLU` the result
    /// is max(·, 0), fused into the same passes (a ResNet's BN–ReLU).
    ///
    /// `synchronizing` makes it PyTorch's `SyncBatchNorm` when the batch is split over
    /// several processes: a function that sums a buffer of doubles elementwise over all of
    /// them (an allreduce), called twice in forward and once in backward, in the same order in
    /// every process. The statistics, the running statistics' update and the gradients are
    /// then those of the whole batch (γ's and β's gradients stay this process's part, to be
    /// averaged over processes with the other parameters'). Ignored in evaluation.
    public func batchNorm(weight: Tensor?, bias: Tensor?, runningMean: Tensor?, runningVariance: Tensor?,
                          training: Bool, momentum: Double = 0.1, eps: Double = 1e-5, applyingReLU: Bool = false,
                          synchronizing: ((UnsafeMutableBufferPointer<Double>) -> Void)? = nil) -> Tensor {
        precondition(rank >= 2, "batchNorm: input \(shape) has no channel axis 1")
        let (n, c) = (shape[0], shape[1])
        let l = n * c == 0 ? 0 : count / (n * c)
        for (name, p) in [("weight", weight), ("bias", bias), ("runningMean", runningMean), ("runningVariance", runningVariance)] {
            if let p {
                precondition(p.shape == [c], "batchNorm: \(name) \(p.shape) does not match the \(c) channels of input \(shape)")
                checkSameDType("batchNorm", self, p)
            }
        }
        precondition(!training || n * l > 1, "batchNorm: input \(shape) has one value per channel; training needs more")
        precondition(training || (runningMean != nil && runningVariance != nil),
                     "batchNorm: evaluation of input \(shape) needs runningMean and runningVariance")
        var inputs = [self]
        if let weight { inputs.append(weight) }
        if let bias { inputs.append(bias) }
        let (hasWeight, hasBias) = (weight != nil, bias != nil)
        let sync = training ? synchronizing : nil
        // The number of values per channel over every process (set in forward when synchronized).
        var total = Double(n * l)
        // Residuals: x, the statistics [5, C], γ, and with ReLU the output (its zeros mask g).
        return Tensor.custom(applyingReLU ? "batchNormReLU" : "batchNorm", inputs, forward: { t in
            let x = t[0].contiguousData()
            let out = Tensor(uninitialized: x.shape, dtype: x.dtype)
            // mean, biased variance, 1/σ, then scale γr and shift β − μγr: [5, C].
            let stats = Tensor(uninitialized: [5, c], dtype: x.dtype)
            let w = hasWeight ? t[1].contiguousData() : nil, b = hasBias ? t[t.count - 1].contiguousData() : nil
            let rm = runningMean?.contiguousData(), rv = runningVariance?.contiguousData()
            switch x.dtype {
            case .float32:
                total = batchNormForward(x, out, stats, w, b, rm, rv, training: training, eps: eps, relu: applyingReLU, sync: sync,
                                         n, c, l, Float.self)
            case .float64:
                total = batchNormForward(x, out, stats, w, b, rm, rv, training: training, eps: eps, relu: applyingReLU, sync: sync,
                                         n, c, l, Double.self)
            }
            if training, let runningMean, let runningVariance {
                let m = total
                runningMean.assign(runningMean * (1 - momentum) + stats[0] * momentum)
                runningVariance.assign(runningVariance * (1 - momentum) + stats[1] * (momentum * m / Swift.max(m - 1, 1)))
            }
            return ([out], [x, stats] + (w.map { [$0] } ?? []) + (applyingReLU ? [out] : []))
        }, vjp: { g, r in
            let (x, stats) = (r[0], r[1])
            let w = hasWeight ? r[2] : nil, y = applyingReLU ? r[r.count - 1] : nil
            let gc = g[0].contiguousData()
            let gx = Tensor(uninitialized: x.shape, dtype: x.dtype)
            let gw = Tensor(uninitialized: [c], dtype: x.dtype), gb = Tensor(uninitialized: [c], dtype: x.dtype)
            switch x.dtype {
            case .float32: batchNormBackward(x, gc, y, gx, gw, gb, stats, w, training: training, sync: sync, total: total, n, c, l, Float.self)
            case .float64: batchNormBackward(x, gc, y, gx, gw, gb, stats, w, training: training, sync: sync, total: total, n, c, l, Double.self)
            }
            var grads: [Tensor?] = [gx]
            if hasWeight { grads.append(gw) }
            if hasBias { grads.append(gb) }
            return grads
        })[0]
    }
}

/// The channels split over the cores, each chunk a C kernel call on channels c0..<c1.
private func forEachChannelRange(_ c: Int, work: Int, _ body: (Int, Int) -> Void) {
    Parallel.forEach(c, costPerItem: Swift.max(1, work / Swift.max(c, 1))) { r in body(r.lowerBound, r.upperBound) }
}

/// Returns the number of values per channel the statistics are over (all processes' when synchronized).
private func batchNormForward<T: TensorScalar>(_ x: Tensor, _ out: Tensor, _ stats: Tensor, _ w: Tensor?, _ b: Tensor?,
                                               _ rm: Tensor?, _ rv: Tensor?, training: Bool, eps: Double, relu: Bool,
                                               sync: ((UnsafeMutableBufferPointer<Double>) -> Void)?,
                                               _ n: Int, _ c: Int, _ l: Int, _: T.Type) -> Double {
    var total = Double(n * l)
    let px = x.pointer(T.self), po = out.pointer(T.self), ps = stats.pointer(T.self)
    let mean = ps, variance = ps + c, invstd = ps + 2 * c, scale = ps + 3 * c, shift = ps + 4 * c
    if training {
        forEachChannelRange(c, work: 2 * n * l * c) { c0, c1 in
            if T.self == Float.self {
                kappa_bn_stats_f32(f32(px), n, c, l, c0, c1, eps, f32(mean), f32(variance), f32(invstd))
            } else {
                kappa_bn_stats_f64(f64(px), n, c, l, c0, c1, eps, f64(mean), f64(variance), f64(invstd))
            }
        }
        if let sync {
            // Chan et al.: with local counts m_r, means μ_r and biased variances v_r, the whole
            // batch has M = Σ m_r, μ = Σ m_r μ_r / M and v = Σ m_r (v_r + (μ_r − μ)²) / M.
            let m = Double(n * l)
            var buffer = [Double](repeating: 0, count: c + 1)
            buffer.withUnsafeMutableBufferPointer { p in
                p[0] = m
                for ch in 0..<c { p[ch + 1] = m * Double(mean[ch]) }
                sync(p)
                total = p[0]
                for ch in 0..<c { p[ch + 1] /= total }
            }
            var spread = [Double](repeating: 0, count: c)
            spread.withUnsafeMutableBufferPointer { p in
                for ch in 0..<c {
                    let d = Double(mean[ch]) - buffer[ch + 1]
                    p[ch] = m * (Double(variance[ch]) + d * d)
                }
                sync(p)
                for ch in 0..<c {
                    let v = p[ch] / total
                    mean[ch] = T(buffer[ch + 1])
                    variance[ch] = T(v)
                    invstd[ch] = T(1 / (v + eps).squareRoot())
                }
            }
        }
    } else {
        let pm = rm!.pointer(T.self), pv = rv!.pointer(T.self)
        for ch in 0..<c {
            mean[ch] = pm[ch]
            variance[ch] = pv[ch]
            invstd[ch] = T(1 / (Double(pv[ch]) + eps).squareRoot())
        }
    }
    let pw = w?.pointer(T.self), pb = b?.pointer(T.self)
    for ch in 0..<c {
        scale[ch] = (pw?[ch] ?? 1) * invstd[ch]
        shift[ch] = (pb?[ch] ?? 0) - mean[ch] * scale[ch]
    }
    forEachChannelRange(c, work: n * l * c) { c0, c1 in
        if T.self == Float.self {
            kappa_bn_apply_f32(f32(px), f32(po), n, c, l, c0, c1, f32(scale), f32(shift), relu ? 1 : 0)
        } else {
            kappa_bn_apply_f64(f64(px), f64(po), n, c, l, c0, c1, f64(scale), f64(shift), relu ? 1 : 0)
        }
    }
    return total
}

private func batchNormBackward<T: TensorScalar>(_ x: Tensor, _ g: Tensor, _ y: Tensor?, _ gx: Tensor, _ gw: Tensor, _ gb: Tensor,
                                                _ stats: Tensor, _ w: Tensor?, training: Bool,
                                                sync: ((UnsafeMutableBufferPointer<Double>) -> Void)?, total: Double,
                                                _ n: Int, _ c: Int, _ l: Int, _: T.Type) {
    let px = x.pointer(T.self), pg = g.pointer(T.self), py = y?.pointer(T.self), pgx = gx.pointer(T.self)
    let ps = stats.pointer(T.self), mean = ps, invstd = ps + 2 * c
    let pw = w?.pointer(T.self)
    var sumG = [Double](repeating: 0, count: c), sumGX = [Double](repeating: 0, count: c)
    sumG.withUnsafeMutableBufferPointer { sg in
        sumGX.withUnsafeMutableBufferPointer { sgx in
            let sg = sg.baseAddress!, sgx = sgx.baseAddress!
            forEachChannelRange(c, work: 2 * n * l * c) { c0, c1 in
                if T.self == Float.self {
                    kappa_bn_backward_sums_f32(f32(px), f32(pg), py.map { f32($0) }, n, c, l, c0, c1, f32(mean), sg, sgx)
                } else {
                    kappa_bn_backward_sums_f64(f64(px), f64(pg), py.map { f64($0) }, n, c, l, c0, c1, f64(mean), sg, sgx)
                }
            }
        }
    }
    // dγ and dβ are this process's (the trainer averages parameter gradients over processes);
    // the input gradient needs the sums over the whole batch: both in one allreduce.
    var (allG, allGX) = (sumG, sumGX)
    if let sync {
        var both = sumG + sumGX
        both.withUnsafeMutableBufferPointer { sync($0) }
        allG = Array(both[0..<c])
        allGX = Array(both[c...])
    }
    // gx = a·g + b·(x − μ) + d per channel.
    let coefficients = Tensor(uninitialized: [3, c], dtype: x.dtype)
    let pc = coefficients.pointer(T.self), a = pc, bcoef = pc + c, d = pc + 2 * c
    let pgw = gw.pointer(T.self), pgb = gb.pointer(T.self)
    let m = total
    for ch in 0..<c {
        let r = Double(invstd[ch]), gamma = Double(pw?[ch] ?? 1)
        pgb[ch] = T(sumG[ch])
        pgw[ch] = T(sumGX[ch] * r)
        a[ch] = T(gamma * r)
        bcoef[ch] = training ? T(-gamma * r * r * r * allGX[ch] / m) : 0
        d[ch] = training ? T(-gamma * r * allG[ch] / m) : 0
    }
    forEachChannelRange(c, work: n * l * c) { c0, c1 in
        if T.self == Float.self {
            kappa_bn_backward_input_f32(f32(px), f32(pg), py.map { f32($0) }, f32(pgx), n, c, l, c0, c1, f32(mean), f32(a),
                                        f32(bcoef), f32(d))
        } else {
            kappa_bn_backward_input_f64(f64(px), f64(pg), py.map { f64($0) }, f64(pgx), n, c, l, c0, c1, f64(mean), f64(a),
                                        f64(bcoef), f64(d))
        }
    }
}

// The typed pointers of the C kernels, from a kernel's generic pointer (the caller has
// checked the element type).
@inline(__always) func f32<T>(_ p: UnsafeMutablePointer<T>) -> UnsafeMutablePointer<Float> {
    UnsafeMutableRawPointer(p).assumingMemoryBound(to: Float.self)
}
@inline(__always) func f64<T>(_ p: UnsafeMutablePointer<T>) -> UnsafeMutablePointer<Double> {
    UnsafeMutableRawPointer(p).assumingMemoryBound(to: Double.self)
}
