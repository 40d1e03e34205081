import RealModule

// Reductions. A reduction over a set of axes is laid out as [outer, r, inner] (the reduced
// axes, made adjacent by a permutation when they are not, in the middle), so every kernel is
// one loop nest over raw buffers. sum, max/min along one axis and the p-norm are kernels
// with VJPs; mean, variance, standard deviation and logsumexp are compositions of them.

/// A tensor's data arranged for reducing `axes`: dense, with the reduced axes forming the
/// middle block of an [outer, r, inner] layout.
struct ReductionLayout {
    let data: Tensor
    let outer: Int, r: Int, inner: Int
    /// The input's shape with reduced axes kept as 1.
    let keptShape: [Int]
    /// The result's shape (`keptShape`, or without the reduced axes).
    let resultShape: [Int]

    init(_ x: Tensor, axes: [Int]?, keepingDims: Bool, op: String) {
        let rank = x.rank
        let shapes = ReductionShapes(x.shape, axes: axes, keepingDims: keepingDims, op: op)
        let ax = shapes.axes
        keptShape = shapes.kept
        resultShape = shapes.result
        let isBlock = ax.isEmpty || ax.last! - ax.first! + 1 == ax.count
        if isBlock {
            data = x.contiguousData()
            let a0 = ax.first ?? rank, a1 = ax.last ?? (rank - 1)
            outer = shapeCount(Array(x.shape[..<a0]))
            r = ax.isEmpty ? 1 : shapeCount(Array(x.shape[a0...a1]))
            inner = ax.isEmpty ? 1 : shapeCount(Array(x.shape[(a1 + 1)...]))
        } else {
            let keptAxes = (0..<rank).filter { !ax.contains($0) }
            let perm = keptAxes + ax
            data = x.permuteView(perm).contiguousData()
            outer = shapeCount(keptAxes.map { x.shape[$0] })
            r = shapeCount(ax.map { x.shape[$0] })
            inner = 1
        }
    }
}

/// The shapes of a reduction, computed without touching the data.
struct ReductionShapes {
    /// The reduced axes, normalized and sorted.
    let axes: [Int]
    /// The input's shape with reduced axes kept as 1.
    let kept: [Int]
    /// The result's shape (`kept`, or without the reduced axes).
    let result: [Int]
    /// How many elements each result element reduces.
    let reducedCount: Int

    init(_ shape: [Int], axes: [Int]?, keepingDims: Bool, op: String) {
        let ax = axes.map { normalizeAxes($0, rank: shape.count, op: op, shape: shape) } ?? Array(0..<shape.count)
        var kept = shape
        for a in ax { kept[a] = 1 }
        self.axes = ax
        self.kept = kept
        result = keepingDims ? kept : shape.enumerated().filter { !ax.contains($0.offset) }.map(\.element)
        reducedCount = ax.reduce(1) { $0 * shape[$1] }
    }
}

extension Tensor {
    /// The sum over `axes` (all axes when `nil`), keeping them as size 1 when `keepingDims`.
    public func sum(alongAxes axes: [Int]? = nil, keepingDims: Bool = false) -> Tensor {
        let shapes = ReductionShapes(shape, axes: axes, keepingDims: keepingDims, op: "sum")
        let ax = shapes.axes
        let out: Tensor
        if let groups = InterleavedReduction(shape, reduced: ax) {
            // Reduced axes not side by side ([0, 2, 3] of [N, C, H, W]: per-channel sums, the
            // sum-to-shape of a broadcast bias): summed in place, no permuted copy.
            out = Tensor(uninitialized: shapes.result, dtype: dtype)
            let x = contiguousData()
            switch dtype {
            case .float32: groups.sum(x, out, Float.self)
            case .float64: groups.sum(x, out, Double.self)
            }
        } else {
            let layout = ReductionLayout(self, axes: axes, keepingDims: keepingDims, op: "sum")
            out = Tensor(uninitialized: layout.resultShape, dtype: dtype)
            switch dtype {
            case .float32: sumKernel(layout, out, Float.self)
            case .float64: sumKernel(layout, out, Double.self)
            }
        }
        let inShape = shape, kept = shapes.kept
        Tape.record("sum", [self], out) { g in [g.reshape(kept).expanded(to: inShape)] }
        return out
    }

    /// The sum along one axis.
    public func sum(alongAxis axis: Int, keepingDims: Bool = false) -> Tensor {
        sum(alongAxes: [axis], keepingDims: keepingDims)
    }

    /// Sums broadcast dimensions away so the result has `target` shape: the reverse of
    /// broadcasting `target` to this tensor's shape (the tape applies it to every gradient).
    public func sum(toShape target: [Int]) -> Tensor {
        if shape == target { return self }
        precondition(broadcastShapes(target, shape) == shape,
                     "sum(toShape:): \(shape) is not a broadcast of \(target)")
        let lead = rank - target.count
        var axes = Array(0..<lead)
        for i in 0..<target.count where target[i] == 1 && shape[lead + i] != 1 { axes.append(lead + i) }
        return sum(alongAxes: axes, keepingDims: true).reshape(target)
    }

    /// The mean over `axes` (all axes when `nil`).
    public func mean(alongAxes axes: [Int]? = nil, keepingDims: Bool = false) -> Tensor {
        let n = ReductionShapes(shape, axes: axes, keepingDims: keepingDims, op: "mean").reducedCount
        return sum(alongAxes: axes, keepingDims: keepingDims) / Double(n)
    }

    /// The mean along one axis.
    public func mean(alongAxis axis: Int, keepingDims: Bool = false) -> Tensor {
        mean(alongAxes: [axis], keepingDims: keepingDims)
    }

    /// The variance over `axes`: Σ(x − x̄)²/(n − correction); `correction: 1` is Bessel's
    /// unbiased estimate (PyTorch's default), 0 the population variance.
    public func variance(alongAxes axes: [Int]? = nil, correction: Int = 1, keepingDims: Bool = false) -> Tensor {
        let n = ReductionShapes(shape, axes: axes, keepingDims: keepingDims, op: "variance").reducedCount
        let d = self - mean(alongAxes: axes, keepingDims: true)
        return (d * d).sum(alongAxes: axes, keepingDims: keepingDims) / Double(Swift.max(n - correction, 0))
    }

    /// The standard deviation over `axes`, √variance. Where it is 0 (constant input) the
    /// gradient is taken as 0, a subgradient, as for ``norm(_:alongAxes:keepingDims:)``;
    /// √ alone would give 0 · ∞ = NaN there.
    public func standardDeviation(alongAxes axes: [Int]? = nil, correction: Int = 1, keepingDims: Bool = false) -> Tensor {
        let v = variance(alongAxes: axes, correction: correction, keepingDims: keepingDims)
        let out = withoutGradients { v.sqrt() }
        let y = out.detached()
        Tape.record("standardDeviation", [v], out) { g in
            let zero = y.eq(0)
            let safe = Tensor.where(zero, Tensor(scalar: 1, dtype: y.dtype), y)
            return [Tensor.where(zero, Tensor(scalar: 0, dtype: y.dtype), g / (safe * 2))]
        }
        return out
    }

    /// log Σ exp(x) over `axes`, computed as m + log Σ exp(x − m) with m the maximum, so it
    /// neither overflows nor underflows; its gradient is the softmax.
    public func logSumExp(alongAxes axes: [Int]? = nil, keepingDims: Bool = false) -> Tensor {
        let m = withoutGradients {
            let m = max(alongAxes: axes, keepingDims: true)
            return Tensor.where(m.abs().eq(.infinity), Tensor(scalar: 0, dtype: dtype), m)
        }
        let lse = (self - m).exp().sum(alongAxes: axes, keepingDims: true).log() + m
        return keepingDims ? lse : lse.reshape(ReductionShapes(shape, axes: axes, keepingDims: false, op: "logSumExp").result)
    }

    /// The p-norm (Σ|x|ᵖ)^{1/p} over `axes`, for p > 0. Where the norm is 0 the gradient is
    /// taken as 0 (a subgradient), as PyTorch does.
    public func norm(_ p: Double = 2, alongAxes axes: [Int]? = nil, keepingDims: Bool = false) -> Tensor {
        precondition(p > 0, "norm: p = \(p) is not positive")
        let x = self
        let kept = ReductionShapes(shape, axes: axes, keepingDims: keepingDims, op: "norm").kept
        let out = withoutGradients { () -> Tensor in
            let s = p == 2 ? (x * x).sum(alongAxes: axes, keepingDims: keepingDims)
                           : x.abs().pow(p).sum(alongAxes: axes, keepingDims: keepingDims)
            return p == 2 ? s.sqrt() : s.pow(1 / p)
        }
        let y = out.detached()
        Tape.record("norm", [self], out) { g in
            let nk = y.reshape(kept), gk = g.reshape(kept)
            let safe = Tensor.where(nk.eq(0), Tensor(scalar: 1, dtype: x.dtype), nk)
            let scale = Tensor.where(nk.eq(0), Tensor(scalar: 0, dtype: x.dtype), gk / safe.pow(p - 1))
            let dx = p == 2 ? x * scale : x.sign() * x.abs().pow(p - 1) * scale
            return [dx]
        }
        return out
    }

    /// The maximum over `axes` (all when `nil`), as PyTorch's `amax`/`max()`: the gradient is
    /// shared equally among the positions that attain the maximum.
    public func max(alongAxes axes: [Int]? = nil, keepingDims: Bool = false) -> Tensor {
        extremum(axes, keepingDims, max: true)
    }

    /// The minimum over `axes` (all when `nil`), as PyTorch's `amin`/`min()`: the gradient is
    /// shared equally among the minima.
    public func min(alongAxes axes: [Int]? = nil, keepingDims: Bool = false) -> Tensor {
        extremum(axes, keepingDims, max: false)
    }

    /// The maximum along one axis, as `torch.max(x, dim)`: the gradient goes to the first
    /// position attaining it (the one ``argmax(alongAxis:keepingDims:)`` names).
    public func max(alongAxis axis: Int, keepingDims: Bool = false) -> Tensor {
        extremumAlong(axis, keepingDims, max: true).values
    }

    /// The minimum along one axis, as `torch.min(x, dim)`: the gradient goes to the first minimum.
    public func min(alongAxis axis: Int, keepingDims: Bool = false) -> Tensor {
        extremumAlong(axis, keepingDims, max: false).values
    }

    /// The index of the first maximum along `axis` (of the flattened tensor when `nil`),
    /// as integral values in this tensor's type; no gradient.
    public func argmax(alongAxis axis: Int? = nil, keepingDims: Bool = false) -> Tensor {
        guard let axis else { return reshape([count]).argmax(alongAxis: 0) }
        return withoutGradients { extremumAlong(axis, keepingDims, max: true).indices }
    }

    /// The index of the first minimum along `axis` (of the flattened tensor when `nil`).
    public func argmin(alongAxis axis: Int? = nil, keepingDims: Bool = false) -> Tensor {
        guard let axis else { return reshape([count]).argmin(alongAxis: 0) }
        return withoutGradients { extremumAlong(axis, keepingDims, max: false).indices }
    }

    private func extremum(_ axes: [Int]?, _ keepingDims: Bool, max: Bool) -> Tensor {
        let op = max ? "max" : "min"
        let ax = axes.map { normalizeAxes($0, rank: rank, op: op, shape: shape) } ?? Array(0..<rank)
        if ax.isEmpty { return self }
        // Move the axes last and merge them, then reduce the merged axis with the gradient
        // shared among ties.
        let keptAxes = (0..<rank).filter { !ax.contains($0) }
        let merged = permuted(keptAxes + ax).reshape(keptAxes.map { shape[$0] } + [ax.reduce(1) { $0 * shape[$1] }])
        let v = merged.extremumSharingTies(max: max)
        return v.reshape(ReductionShapes(shape, axes: ax, keepingDims: keepingDims, op: op).result)
    }

    /// The extremum along the last axis; the VJP gives each of the r positions that attain it g/r.
    private func extremumSharingTies(max: Bool) -> Tensor {
        let op = max ? "max" : "min"
        let n = shape[rank - 1]
        precondition(n > 0, "\(op): cannot reduce an empty axis of shape \(shape)")
        return Tensor.custom(op, [self], forward: { t in
            let v = t[0].extremumAlong(t[0].rank - 1, false, max: max).values
            return ([v], [t[0].contiguousData(), v])
        }, vjp: { g, r in
            let (x, v) = (r[0], r[1])
            let gx = Tensor.zeros(x.shape, dtype: x.dtype)
            switch x.dtype {
            case .float32: shareAmongTies(x, v, g[0].contiguousData(), gx, n, Float.self)
            case .float64: shareAmongTies(x, v, g[0].contiguousData(), gx, n, Double.self)
            }
            return [gx]
        })[0]
    }

    private func extremumAlong(_ axis: Int, _ keepingDims: Bool, max: Bool) -> (values: Tensor, indices: Tensor) {
        let op = max ? "max" : "min"
        precondition(rank > 0 && shape[normalizeAxis(axis, rank: rank, op: op, shape: shape)] > 0,
                     "\(op): cannot reduce an empty axis of shape \(shape)")
        let layout = ReductionLayout(self, axes: [axis], keepingDims: keepingDims, op: op)
        let values = Tensor(uninitialized: layout.resultShape, dtype: dtype)
        let indices = Tensor(uninitialized: layout.resultShape, dtype: dtype)
        switch dtype {
        case .float32: extremumKernel(layout, values, indices, max, Float.self)
        case .float64: extremumKernel(layout, values, indices, max, Double.self)
        }
        let inShape = shape, dt = dtype
        Tape.record(op, [self], values) { g in
            let gx = Tensor.zeros(inShape, dtype: dt)
            switch dt {
            case .float32: scatterExtremumGrad(layout, g.contiguousData(), indices, gx, Float.self)
            case .float64: scatterExtremumGrad(layout, g.contiguousData(), indices, gx, Double.self)
            }
            return [gx]
        }
        return (values, indices)
    }
}

/// gx[i, j] = g[i] / (number of j′ with x[i, j′] = v[i]) where x[i, j] = v[i], for rows of n.
private func shareAmongTies<T: TensorScalar>(_ x: Tensor, _ v: Tensor, _ g: Tensor, _ gx: Tensor, _ n: Int, _: T.Type) {
    let px = x.pointer(T.self), pv = v.contiguousData().pointer(T.self), pg = g.pointer(T.self), po = gx.pointer(T.self)
    for i in 0..<(x.count / n) {
        let row = px + i * n, m = pv[i]
        var ties = 0
        for j in 0..<n where row[j] == m { ties += 1 }
        guard ties > 0 else { continue }  // a NaN extremum: no position equals it
        let share = pg[i] / T(ties)
        for j in 0..<n where row[j] == m { po[i * n + j] = share }
    }
}

private func sumKernel<T: TensorScalar>(_ L: ReductionLayout, _ out: Tensor, _: T.Type) {
    let px = L.data.pointer(T.self), po = out.pointer(T.self)
    let (outer, r, inner) = (L.outer, L.r, L.inner)
    if inner == 1 {
        if outer == 1 && r >= 2 * Parallel.grain {
            // One long sum: fixed-size blocks summed in parallel, then combined in order, so
            // the result does not depend on the number of threads.
            let block = Parallel.grain
            let blocks = (r + block - 1) / block
            var partial = [T](repeating: 0, count: blocks)
            partial.withUnsafeMutableBufferPointer { pp in
                Parallel.forEach(blocks, costPerItem: block) { range in
                    for b in range {
                        let lo = b * block
                        pp[b] = rowSum(px + lo, Swift.min(block, r - lo))
                    }
                }
            }
            var s: T = 0
            for v in partial { s += v }
            po[0] = s
            return
        }
        Parallel.forEach(outer, costPerItem: r) { range in
            for o in range { po[o] = rowSum(px + o * r, r) }
        }
        return
    }
    Parallel.forEach(outer * inner, costPerItem: r) { range in
        // Work is split over (o, i-chunk); here each item is one output element, processed in
        // runs of consecutive i so the inner loop is a vectorizable column sum.
        var idx = range.lowerBound
        while idx < range.upperBound {
            let o = idx / inner, i0 = idx % inner
            let i1 = Swift.min(inner, i0 + (range.upperBound - idx))
            let dst = po + o * inner
            let src = px + o * r * inner
            for i in i0..<i1 { dst[i] = 0 }
            for j in 0..<r {
                let row = src + j * inner
                for i in i0..<i1 { dst[i] += row[i] }
            }
            idx += i1 - i0
        }
    }
}

/// Σ p[0..<n] with eight independent accumulators (faster, and more accurate than one).
@inline(__always)
func rowSum<T: TensorScalar>(_ p: UnsafeMutablePointer<T>, _ n: Int) -> T {
    var a0: T = 0, a1: T = 0, a2: T = 0, a3: T = 0, a4: T = 0, a5: T = 0, a6: T = 0, a7: T = 0
    var j = 0
    while j + 8 <= n {
        a0 += p[j]; a1 += p[j + 1]; a2 += p[j + 2]; a3 += p[j + 3]
        a4 += p[j + 4]; a5 += p[j + 5]; a6 += p[j + 6]; a7 += p[j + 7]
        j += 8
    }
    while j < n { a0 += p[j]; j += 1 }
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
}

private func extremumKernel<T: TensorScalar>(_ L: ReductionLayout, _ values: Tensor, _ indices: Tensor,
                                             _ isMax: Bool, _: T.Type) {
    let px = L.data.pointer(T.self), pv = values.pointer(T.self), pi = indices.pointer(T.self)
    let (outer, r, inner) = (L.outer, L.r, L.inner)
    Parallel.forEach(outer, costPerItem: r * inner) { range in
        for o in range {
            for i in 0..<inner {
                let base = px + o * r * inner + i
                var best = base[0], at = 0
                if !best.isNaN {
                    for j in 1..<r {
                        let v = base[j * inner]
                        // NaN wins and stops the search, as in PyTorch.
                        if v.isNaN { best = v; at = j; break }
                        if isMax ? v > best : v < best { best = v; at = j }
                    }
                }
                pv[o * inner + i] = best
                pi[o * inner + i] = T(at)
            }
        }
    }
}

private func scatterExtremumGrad<T: TensorScalar>(_ L: ReductionLayout, _ g: Tensor, _ indices: Tensor,
                                                  _ gx: Tensor, _: T.Type) {
    let pg = g.pointer(T.self), pi = indices.pointer(T.self), px = gx.pointer(T.self)
    let (outer, r, inner) = (L.outer, L.r, L.inner)
    for o in 0..<outer {
        for i in 0..<inner {
            let k = o * inner + i
            px[o * r * inner + Int(pi[k]) * inner + i] = pg[k]
        }
    }
}

/// A sum over reduced axes that are not one block, on the dense input as it lies: the axes
/// merged into alternating groups of kept and reduced ones, the last group's contiguous runs
/// summed (a reduced run) or added to the output row (a kept run) as the groups before it are
/// walked in order. `nil` when the reduced axes form one block (``ReductionLayout`` handles
/// that without copying).
struct InterleavedReduction {
    /// Group sizes, outermost first, and whether each group is reduced.
    let sizes: [Int], reduced: [Bool]

    init?(_ shape: [Int], reduced axes: [Int]) {
        guard axes.count >= 2, axes.last! - axes.first! + 1 != axes.count else { return nil }
        var sizes: [Int] = [], flags: [Bool] = []
        for (i, n) in shape.enumerated() where n != 1 {
            let r = axes.contains(i)
            if let last = flags.last, last == r { sizes[sizes.count - 1] *= n } else { sizes.append(n); flags.append(r) }
        }
        guard flags.count >= 3 else { return nil }  // after merging, one block after all
        self.sizes = sizes
        self.reduced = flags
    }

    func sum<T: TensorScalar>(_ x: Tensor, _ out: Tensor, _: T.Type) {
        let px = x.pointer(T.self), po = out.pointer(T.self)
        let outCount = out.count
        po.update(repeating: 0, count: outCount)
        let last = sizes.count - 1, run = sizes[last], lastReduced = reduced[last]
        // Output strides of the kept groups (0 for reduced ones), innermost kept group stride 1.
        var outStride = [Int](repeating: 0, count: sizes.count)
        var s = 1
        for g in stride(from: last, through: 0, by: -1) where !reduced[g] { outStride[g] = s; s *= sizes[g] }
        var index = [Int](repeating: 0, count: last)
        var offset = 0, outOffset = 0
        let runs = x.count / Swift.max(run, 1)
        for _ in 0..<runs {
            let src = px + offset
            if lastReduced {
                po[outOffset] += rowSum(src, run)
            } else {
                let dst = po + outOffset
                for k in 0..<run { dst[k] += src[k] }
            }
            offset += run
            // Advance the multi-index of the outer groups.
            var g = last - 1
            while g >= 0 {
                index[g] += 1
                outOffset += outStride[g]
                if index[g] < sizes[g] { break }
                outOffset -= outStride[g] * sizes[g]
                index[g] = 0
                g -= 1
            }
        }
    }
}
