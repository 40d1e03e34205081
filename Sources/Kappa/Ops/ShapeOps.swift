// Shape ops. Views (reshape of contiguous data, permute, transpose, squeeze, unsqueeze,
// expand, slicing) share storage and copy nothing; their VJPs undo the view on the
// gradient. Ops that must move data (concat, pad, index ops, gather, scatter) copy once.

extension Tensor {
    /// A view with other shape/strides/offset over this storage, recorded with `vjp`.
    func viewOp(_ name: String, shape: [Int], strides: [Int], offset: Int,
                vjp: @escaping (Tensor) -> [Tensor?]) -> Tensor {
        let out = view(shape: shape, strides: strides, offset: offset)
        Tape.record(name, [self], out, vjp)
        return out
    }

    /// A dense copy that is recorded (gradient passes through unchanged).
    public func copied() -> Tensor {
        let out = Tensor(uninitialized: shape, dtype: dtype)
        copyElements(from: self, to: out)
        Tape.record("copy", [self], out) { g in [g] }
        return out
    }

    /// This tensor with its elements in row-major order: `self` when already contiguous,
    /// else a recorded copy.
    public func contiguous() -> Tensor { isContiguous ? self : copied() }

    /// The tensor converted to `dtype` (recorded; the gradient is converted back).
    public func to(_ dtype: DType) -> Tensor {
        if dtype == self.dtype { return self }
        let out = Tensor(uninitialized: shape, dtype: dtype)
        copyElements(from: self, to: out)
        let from = self.dtype
        Tape.record("to(\(dtype))", [self], out) { g in [g.to(from)] }
        return out
    }

    // MARK: Reshape

    /// The same elements in another shape; one dimension may be -1 (inferred). A view when
    /// the data is contiguous, else a copy.
    public func reshape(_ newShape: [Int]) -> Tensor {
        var target = newShape
        let unknown = target.indices.filter { target[$0] == -1 }
        precondition(unknown.count <= 1, "reshape: more than one -1 in \(newShape)")
        if let u = unknown.first {
            let known = target.enumerated().filter { $0.offset != u }.reduce(1) { $0 * $1.element }
            precondition(known > 0 && count % known == 0, "reshape: cannot reshape \(shape) into \(newShape)")
            target[u] = count / known
        }
        precondition(target.allSatisfy { $0 >= 0 } && shapeCount(target) == count,
                     "reshape: cannot reshape \(shape) (\(count) elements) into \(newShape)")
        if target == shape { return self }
        let inShape = shape
        let source = contiguous()
        return source.viewOp("reshape", shape: target, strides: contiguousStrides(target), offset: source.offset) { g in
            [g.reshape(inShape)]
        }
    }

    /// All dimensions from `startAxis` through `endAxis` merged into one.
    public func flattened(startAxis: Int = 0, endAxis: Int = -1) -> Tensor {
        if rank == 0 { return reshape([1]) }
        let s = normalizeAxis(startAxis, rank: rank, op: "flatten", shape: shape)
        let e = normalizeAxis(endAxis, rank: rank, op: "flatten", shape: shape)
        precondition(s <= e, "flatten: start axis \(startAxis) is after end axis \(endAxis) for shape \(shape)")
        return reshape(Array(shape[..<s]) + [shapeCount(Array(shape[s...e]))] + Array(shape[(e + 1)...]))
    }

    // MARK: Permute

    /// An unrecorded permuted view (for kernels).
    func permuteView(_ perm: [Int]) -> Tensor {
        view(shape: perm.map { shape[$0] }, strides: perm.map { strides[$0] }, offset: offset)
    }

    /// The axes reordered: result axis i is input axis `permutation[i]`. A view.
    public func permuted(_ permutation: [Int]) -> Tensor {
        precondition(permutation.count == rank && Set(permutation) == Set(0..<rank),
                     "permute: \(permutation) is not a permutation of the axes of \(shape)")
        var inverse = [Int](repeating: 0, count: rank)
        for (i, p) in permutation.enumerated() { inverse[p] = i }
        return viewOp("permute", shape: permutation.map { shape[$0] }, strides: permutation.map { strides[$0] },
                      offset: offset) { g in [g.permuted(inverse)] }
    }

    /// Axes `a` and `b` swapped. A view.
    public func transposed(_ a: Int, _ b: Int) -> Tensor {
        let a = normalizeAxis(a, rank: rank, op: "transpose", shape: shape)
        let b = normalizeAxis(b, rank: rank, op: "transpose", shape: shape)
        var p = Array(0..<rank)
        p.swapAt(a, b)
        return permuted(p)
    }

    /// The last two axes swapped (the matrix transpose). A view.
    public func transposed() -> Tensor {
        precondition(rank >= 2, "transpose: tensor of shape \(shape) has fewer than 2 axes")
        return transposed(rank - 2, rank - 1)
    }

    // MARK: Squeeze, unsqueeze, expand

    /// A view without the size-1 axis `axis` (without every size-1 axis when `nil`).
    public func squeezed(axis: Int? = nil) -> Tensor {
        let keep: [Int]
        if let axis {
            let a = normalizeAxis(axis, rank: rank, op: "squeeze", shape: shape)
            precondition(shape[a] == 1, "squeeze: axis \(axis) of shape \(shape) has size \(shape[a]), not 1")
            keep = (0..<rank).filter { $0 != a }
        } else {
            keep = (0..<rank).filter { shape[$0] != 1 }
        }
        let inShape = shape
        return viewOp("squeeze", shape: keep.map { shape[$0] }, strides: keep.map { strides[$0] }, offset: offset) { g in
            [g.reshape(inShape)]
        }
    }

    /// A view with a new size-1 axis at position `axis` (negative counts from the end of the result).
    public func unsqueezed(axis: Int) -> Tensor {
        let a = axis < 0 ? axis + rank + 1 : axis
        precondition(a >= 0 && a <= rank, "unsqueeze: axis \(axis) is out of range for shape \(shape)")
        var s = shape, st = strides
        s.insert(1, at: a)
        st.insert(a < rank ? strides[a] * shape[a] : 1, at: a)
        let inShape = shape
        return viewOp("unsqueeze", shape: s, strides: st, offset: offset) { g in [g.reshape(inShape)] }
    }

    /// A view broadcast to `target` (NumPy rules; broadcast axes get stride 0). The gradient
    /// is summed back by the tape.
    public func expanded(to target: [Int]) -> Tensor {
        if target == shape { return self }
        precondition(broadcastShapes(shape, target) == target, "expand: \(shape) cannot be broadcast to \(target)")
        return viewOp("expand", shape: target, strides: broadcastStrides(shape: shape, strides: strides, to: target),
                      offset: offset) { g in [g] }
    }

    // MARK: Slicing

    /// An unrecorded view of elements start, start+step, ... below end along `axis`.
    func sliceView(_ axis: Int, _ start: Int, _ end: Int, _ step: Int) -> Tensor {
        var s = shape, st = strides
        s[axis] = Swift.max(0, (end - start + step - 1) / step)
        st[axis] = strides[axis] * step
        return view(shape: s, strides: st, offset: offset + (s[axis] > 0 ? start * strides[axis] : 0))
    }

    /// The elements `start, start + step, ...` below `end` along `axis`. Negative positions
    /// count from the end and are clamped to the axis, as in Python. A view.
    public func slice(alongAxis axis: Int, from start: Int = 0, to end: Int? = nil, by step: Int = 1) -> Tensor {
        let a = normalizeAxis(axis, rank: rank, op: "slice", shape: shape)
        precondition(step > 0, "slice: step \(step) is not positive")
        let n = shape[a]
        func clampIndex(_ i: Int) -> Int { Swift.min(Swift.max(i < 0 ? i + n : i, 0), n) }
        let lo = clampIndex(start), hi = Swift.max(lo, clampIndex(end ?? n))
        if lo == 0 && hi == n && step == 1 { return self }
        let inShape = shape, dt = dtype
        let v = sliceView(a, lo, hi, step)
        return viewOp("slice", shape: v.shape, strides: v.strides, offset: v.offset) { g in
            let z = Tensor.zeros(inShape, dtype: dt)
            copyElements(from: g, to: z.sliceView(a, lo, hi, step))
            return [z]
        }
    }

    /// The sub-tensor at `index` along `axis`, with that axis removed. A view.
    public func select(alongAxis axis: Int, index: Int) -> Tensor {
        let a = normalizeAxis(axis, rank: rank, op: "select", shape: shape)
        let i = index < 0 ? index + shape[a] : index
        precondition(i >= 0 && i < shape[a], "select: index \(index) is out of range for axis \(axis) of shape \(shape)")
        var s = shape, st = strides
        s.remove(at: a)
        st.remove(at: a)
        let inShape = shape, dt = dtype
        return viewOp("select", shape: s, strides: st, offset: offset + i * strides[a]) { g in
            let z = Tensor.zeros(inShape, dtype: dt)
            let row = z.sliceView(a, i, i + 1, 1)
            copyElements(from: g.reshape(row.shape), to: row)
            return [z]
        }
    }

    /// Indexing like NumPy: an integer selects (and removes the axis), a range slices,
    /// `.all` keeps an axis, `.newAxis` inserts one. `x[0]`, `x[.all, .range(1..<3)]`.
    public subscript(_ indices: TensorIndex...) -> Tensor {
        var t = self, axis = 0
        for index in indices {
            switch index {
            case .index(let i): t = t.select(alongAxis: axis, index: i)
            case .all: axis += 1
            case .newAxis: t = t.unsqueezed(axis: axis); axis += 1
            case let .slice(start, end, step):
                t = t.slice(alongAxis: axis, from: start ?? 0, to: end, by: step)
                axis += 1
            }
            precondition(axis <= t.rank, "subscript: too many indices for shape \(shape)")
        }
        return t
    }

    /// The elements in `range` along the first axis.
    public subscript(_ range: Range<Int>) -> Tensor { slice(alongAxis: 0, from: range.lowerBound, to: range.upperBound) }

    // MARK: Concatenate, stack, split

    /// The tensors joined along `axis`; all other dimensions must agree.
    public static func concat(_ tensors: [Tensor], alongAxis axis: Int = 0) -> Tensor {
        precondition(!tensors.isEmpty, "concat: no tensors")
        let first = tensors[0]
        let a = normalizeAxis(axis, rank: first.rank, op: "concat", shape: first.shape)
        for t in tensors {
            checkSameDType("concat", first, t)
            precondition(t.rank == first.rank && (0..<t.rank).allSatisfy { $0 == a || t.shape[$0] == first.shape[$0] },
                         "concat: shapes \(tensors.map(\.shape)) differ outside axis \(axis)")
        }
        var s = first.shape
        s[a] = tensors.reduce(0) { $0 + $1.shape[a] }
        let out = Tensor(uninitialized: s, dtype: first.dtype)
        var starts: [Int] = []
        var at = 0
        for t in tensors {
            starts.append(at)
            copyElements(from: t, to: out.sliceView(a, at, at + t.shape[a], 1))
            at += t.shape[a]
        }
        let sizes = tensors.map { $0.shape[a] }
        Tape.record("concat", tensors, out) { g in
            (0..<sizes.count).map { g.sliceView(a, starts[$0], starts[$0] + sizes[$0], 1) }
        }
        return out
    }

    /// The tensors, all of one shape, stacked along a new axis.
    public static func stack(_ tensors: [Tensor], alongAxis axis: Int = 0) -> Tensor {
        precondition(!tensors.isEmpty, "stack: no tensors")
        precondition(tensors.allSatisfy { $0.shape == tensors[0].shape }, "stack: shapes \(tensors.map(\.shape)) differ")
        return concat(tensors.map { $0.unsqueezed(axis: axis) }, alongAxis: axis)
    }

    /// Consecutive pieces along `axis` with the given sizes, which must add up to the axis. Views.
    public func split(sizes: [Int], alongAxis axis: Int = 0) -> [Tensor] {
        let a = normalizeAxis(axis, rank: rank, op: "split", shape: shape)
        precondition(sizes.allSatisfy { $0 >= 0 } && sizes.reduce(0, +) == shape[a],
                     "split: sizes \(sizes) do not add up to axis \(axis) of shape \(shape)")
        var at = 0
        return sizes.map { n in
            defer { at += n }
            return slice(alongAxis: a, from: at, to: at + n)
        }
    }

    /// `chunks` pieces along `axis` of size ⌈n/chunks⌉ (the last may be smaller). Views.
    public func chunk(_ chunks: Int, alongAxis axis: Int = 0) -> [Tensor] {
        let a = normalizeAxis(axis, rank: rank, op: "chunk", shape: shape)
        precondition(chunks > 0, "chunk: \(chunks) chunks")
        let size = (shape[a] + chunks - 1) / chunks
        var sizes: [Int] = []
        var left = shape[a]
        while left > 0 { sizes.append(Swift.min(size, left)); left -= size }
        return split(sizes: sizes, alongAxis: a)
    }

    // MARK: Pad

    /// Pads with `value`: `padding[i]` is (before, after) for axis i, listed from the first
    /// axis; missing trailing entries mean no padding.
    public func padded(_ padding: [(before: Int, after: Int)], value: Double = 0) -> Tensor {
        precondition(padding.count <= rank && padding.allSatisfy { $0.before >= 0 && $0.after >= 0 },
                     "pad: padding \(padding) does not fit shape \(shape)")
        var s = shape
        for (i, p) in padding.enumerated() { s[i] += p.before + p.after }
        let out = Tensor.full(s, value, dtype: dtype)
        func interior(_ t: Tensor) -> Tensor {
            var v = t
            for (i, p) in padding.enumerated() { v = v.sliceView(i, p.before, p.before + shape[i], 1) }
            return v
        }
        copyElements(from: self, to: interior(out))
        Tape.record("pad", [self], out) { g in [interior(g)] }
        return out
    }

    // MARK: Index ops

    /// The sub-tensors at `indices` along `axis`, in that order (repeats allowed). The
    /// gradient of a repeated index accumulates.
    public func indexSelect(alongAxis axis: Int, indices: [Int]) -> Tensor {
        let a = normalizeAxis(axis, rank: rank, op: "indexSelect", shape: shape)
        let n = shape[a]
        for i in indices { precondition(i >= 0 && i < n, "indexSelect: index \(i) is out of range for axis \(axis) of shape \(shape)") }
        let x = contiguousData()
        var s = shape
        s[a] = indices.count
        let out = Tensor(uninitialized: s, dtype: dtype)
        let outer = shapeCount(Array(shape[..<a])), inner = shapeCount(Array(shape[(a + 1)...]))
        switch dtype {
        case .float32: rowGather(x, out, indices, outer, n, inner, Float.self)
        case .float64: rowGather(x, out, indices, outer, n, inner, Double.self)
        }
        let inShape = shape, dt = dtype
        Tape.record("indexSelect", [self], out) { g in
            let gx = Tensor.zeros(inShape, dtype: dt)
            let gc = g.contiguousData()
            switch dt {
            case .float32: rowScatterAdd(gc, gx, indices, outer, n, inner, Float.self)
            case .float64: rowScatterAdd(gc, gx, indices, outer, n, inner, Double.self)
            }
            return [gx]
        }
        return out
    }

    /// PyTorch's `gather`: along `axis`, out[..., j, ...] = self[..., index[..., j, ...], ...].
    /// `index` has this tensor's rank, integral values, and no dimension larger than this
    /// tensor's except along `axis`.
    public func gather(alongAxis axis: Int, index: Tensor) -> Tensor {
        let a = normalizeAxis(axis, rank: rank, op: "gather", shape: shape)
        precondition(index.rank == rank && (0..<rank).allSatisfy { $0 == a || index.shape[$0] <= shape[$0] },
                     "gather: index of shape \(index.shape) does not fit input \(shape) along axis \(axis)")
        let out = Tensor(uninitialized: index.shape, dtype: dtype)
        let x = contiguousData()
        let pairs = indexWalk("gather", index, a, shape)
        switch dtype {
        case .float32: moveScalars(x, out, pairs, add: false, Float.self)
        case .float64: moveScalars(x, out, pairs, add: false, Double.self)
        }
        let inShape = shape, dt = dtype
        Tape.record("gather", [self], out) { g in
            [Tensor.zeros(inShape, dtype: dt).scatterAdd(alongAxis: a, index: index, source: g)]
        }
        return out
    }

    /// PyTorch's `scatter_add`: a copy of this tensor with, along `axis`,
    /// out[..., index[..., j, ...], ...] += source[..., j, ...]. Differentiable in both
    /// this tensor and `source`.
    public func scatterAdd(alongAxis axis: Int, index: Tensor, source: Tensor) -> Tensor {
        let a = normalizeAxis(axis, rank: rank, op: "scatterAdd", shape: shape)
        checkSameDType("scatterAdd", self, source)
        precondition(index.rank == rank && source.shape == index.shape
                     && (0..<rank).allSatisfy { $0 == a || index.shape[$0] <= shape[$0] },
                     "scatterAdd: index \(index.shape) and source \(source.shape) do not fit \(shape) along axis \(axis)")
        let out = copiedData()
        let src = source.contiguousData()
        let pairs = indexWalk("scatterAdd", index, a, shape).map { ($0.1, $0.0) }
        switch dtype {
        case .float32: moveScalars(src, out, pairs, add: true, Float.self)
        case .float64: moveScalars(src, out, pairs, add: true, Double.self)
        }
        Tape.record("scatterAdd", [self, source], out) { g in [g, g.gather(alongAxis: a, index: index)] }
        return out
    }

    /// Rows of one-hot vectors: shape `[labels.count, classes]`; no gradient.
    public static func oneHot(_ labels: [Int], classes: Int, dtype: DType = .float32) -> Tensor {
        for l in labels { precondition(l >= 0 && l < classes, "oneHot: label \(l) is out of range 0..<\(classes)") }
        let t = Tensor.zeros([labels.count, classes], dtype: dtype)
        for (i, l) in labels.enumerated() { t.setScalar(i * classes + l, 1) }
        return t
    }

    /// The image batch [B, C, H, W] cut into non-overlapping P×P patches, flattened in
    /// (C, P, P) order: [B, (H/P)·(W/P), C·P·P], patches in row-major order (the ViT patch
    /// embedding as one matmul).
    public func unfoldPatches(size p: Int) -> Tensor {
        precondition(rank == 4, "unfoldPatches: expected [B, C, H, W], got \(shape)")
        let (b, c, h, w) = (shape[0], shape[1], shape[2], shape[3])
        precondition(p > 0 && h % p == 0 && w % p == 0, "unfoldPatches: \(h)×\(w) image is not divisible into \(p)×\(p) patches")
        return reshape([b, c, h / p, p, w / p, p]).permuted([0, 2, 4, 1, 3, 5]).reshape([b, (h / p) * (w / p), c * p * p])
    }

    // MARK: Scalar access helpers

    func copiedData() -> Tensor {
        let out = Tensor(uninitialized: shape, dtype: dtype)
        copyElements(from: self, to: out)
        return out
    }

    func setScalar(_ linear: Int, _ v: Double) {
        switch dtype {
        case .float32: pointer(Float.self)[linear] = Float(v)
        case .float64: pointer(Double.self)[linear] = v
        }
    }
}

/// An index of a subscript: `x[2]`, `x[.all, .range(1..<3)]`, `x[.newAxis]`.
public enum TensorIndex: ExpressibleByIntegerLiteral {
    /// One position; the axis is removed.
    case index(Int)
    /// Positions start, start+step, ... below end (`nil` ends mean the axis' ends).
    case slice(start: Int?, end: Int?, step: Int)
    /// The whole axis.
    case all
    /// A new axis of size 1.
    case newAxis

    public init(integerLiteral value: Int) { self = .index(value) }

    /// The positions in `r`, every `step`-th.
    public static func range(_ r: Range<Int>, step: Int = 1) -> TensorIndex { .slice(start: r.lowerBound, end: r.upperBound, step: step) }
    /// The positions in `r`.
    public static func range(_ r: ClosedRange<Int>) -> TensorIndex { .slice(start: r.lowerBound, end: r.upperBound + 1, step: 1) }
    /// The positions from `start` to the end.
    public static func from(_ start: Int) -> TensorIndex { .slice(start: start, end: nil, step: 1) }
}

/// For each element of `index` (row-major), the pair (linear offset into a dense tensor of
/// `shape` at the indexed position, linear offset into a dense tensor of index's shape).
private func indexWalk(_ op: String, _ index: Tensor, _ axis: Int, _ shape: [Int]) -> [(Int, Int)] {
    let idx = index.scalars(as: Double.self)
    let istrides = contiguousStrides(index.shape), xstrides = contiguousStrides(shape)
    var pairs: [(Int, Int)] = []
    pairs.reserveCapacity(idx.count)
    for (k, v) in idx.enumerated() {
        let j = Int(v)
        precondition(Double(j) == v && j >= 0 && j < shape[axis],
                     "\(op): index value \(v) is out of range for axis \(axis) of shape \(shape)")
        var rem = k, off = 0
        for d in 0..<index.rank {
            let c = rem / istrides[d]
            rem %= istrides[d]
            off += (d == axis ? j : c) * xstrides[d]
        }
        pairs.append((off, k))
    }
    return pairs
}

/// dst[to] = src[from] (or += when `add`) for each pair (from, to) of linear offsets.
private func moveScalars<T: TensorScalar>(_ src: Tensor, _ dst: Tensor, _ pairs: [(Int, Int)], add: Bool, _: T.Type) {
    let ps = src.pointer(T.self), pd = dst.pointer(T.self)
    if add { for (f, t) in pairs { pd[t] += ps[f] } } else { for (f, t) in pairs { pd[t] = ps[f] } }
}

private func rowGather<T: TensorScalar>(_ x: Tensor, _ out: Tensor, _ indices: [Int], _ outer: Int, _ n: Int,
                                        _ inner: Int, _: T.Type) {
    let px = x.pointer(T.self), po = out.pointer(T.self)
    let k = indices.count
    for o in 0..<outer {
        for (j, i) in indices.enumerated() {
            (po + (o * k + j) * inner).update(from: px + (o * n + i) * inner, count: inner)
        }
    }
}

private func rowScatterAdd<T: TensorScalar>(_ g: Tensor, _ gx: Tensor, _ indices: [Int], _ outer: Int, _ n: Int,
                                            _ inner: Int, _: T.Type) {
    let pg = g.pointer(T.self), px = gx.pointer(T.self)
    let k = indices.count
    for o in 0..<outer {
        for (j, i) in indices.enumerated() {
            let src = pg + (o * k + j) * inner, dst = px + (o * n + i) * inner
            for e in 0..<inner { dst[e] += src[e] }
        }
    }
}
