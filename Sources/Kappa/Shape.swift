/// Shape arithmetic shared by the ops: element counts, strides, broadcasting, axes.

@inline(__always)
func shapeCount(_ shape: [Int]) -> Int {
    var n = 1
    for d in shape { n &*= d }
    return n
}

/// Row-major (C-order) strides of a contiguous tensor of `shape`, in elements.
func contiguousStrides(_ shape: [Int]) -> [Int] {
    var strides = [Int](repeating: 1, count: shape.count)
    var s = 1
    for i in stride(from: shape.count - 1, through: 0, by: -1) {
        strides[i] = s
        s *= shape[i]
    }
    return strides
}

/// The NumPy broadcast of two shapes, or `nil` when they are incompatible.
func broadcastShapes(_ a: [Int], _ b: [Int]) -> [Int]? {
    let n = max(a.count, b.count)
    var out = [Int](repeating: 1, count: n)
    for i in 0..<n {
        let da = i < n - a.count ? 1 : a[i - (n - a.count)]
        let db = i < n - b.count ? 1 : b[i - (n - b.count)]
        if da == db || db == 1 { out[i] = da } else if da == 1 { out[i] = db } else { return nil }
    }
    return out
}

/// Broadcasts two shapes or stops with a message naming the op and both shapes.
func broadcastOrFail(_ op: String, _ a: [Int], _ b: [Int]) -> [Int] {
    guard let s = broadcastShapes(a, b) else {
        preconditionFailure("\(op): \(a) and \(b) cannot be broadcast together")
    }
    return s
}

/// Strides for reading a tensor of `shape`/`strides` as if it had `target` shape (stride 0
/// along broadcast dimensions).
func broadcastStrides(shape: [Int], strides: [Int], to target: [Int]) -> [Int] {
    var out = [Int](repeating: 0, count: target.count)
    let lead = target.count - shape.count
    for i in 0..<shape.count where shape[i] != 1 {
        out[lead + i] = strides[i]
    }
    return out
}

/// Normalizes a possibly negative axis against `rank`, stopping with the op's name when it
/// is out of range.
func normalizeAxis(_ axis: Int, rank: Int, op: String, shape: [Int]) -> Int {
    let a = axis < 0 ? axis + rank : axis
    precondition(a >= 0 && a < rank, "\(op): axis \(axis) is out of range for shape \(shape)")
    return a
}

/// Normalizes, sorts and de-duplicates a set of axes.
func normalizeAxes(_ axes: [Int], rank: Int, op: String, shape: [Int]) -> [Int] {
    let n = axes.map { normalizeAxis($0, rank: rank, op: op, shape: shape) }
    precondition(Set(n).count == n.count, "\(op): repeated axis in \(axes) for shape \(shape)")
    return n.sorted()
}

/// Merges adjacent dimensions that every operand walks contiguously, and drops size-1
/// dimensions, so strided loops run long inner loops. Returns the merged shape and strides.
func coalesce(_ shape: [Int], _ strides: [[Int]]) -> ([Int], [[Int]]) {
    var outShape: [Int] = []
    var outStrides: [[Int]] = Array(repeating: [], count: strides.count)
    for i in 0..<shape.count where shape[i] != 1 {
        if let last = outShape.last,
           (0..<strides.count).allSatisfy({ outStrides[$0].last! == strides[$0][i] * shape[i] }) {
            outShape[outShape.count - 1] = last * shape[i]
            for k in 0..<strides.count { outStrides[k][outStrides[k].count - 1] = strides[k][i] }
        } else {
            outShape.append(shape[i])
            for k in 0..<strides.count { outStrides[k].append(strides[k][i]) }
        }
    }
    if outShape.isEmpty {
        outShape = [1]
        outStrides = Array(repeating: [0], count: strides.count)
    }
    return (outShape, outStrides)
}

/// Calls `body(offsets, steps, n)` for each run of the innermost dimension of `shape`
/// (after ``coalesce(_:_:)``), where `offsets[k]` is the element offset of operand `k` at
/// the start of the run and `steps[k]` its stride within the run.
@inline(__always)
func forEachRun(_ shape: [Int], _ strides: [[Int]],
                _ body: (UnsafeMutableBufferPointer<Int>, UnsafeMutableBufferPointer<Int>, Int) -> Void) {
    let (s, st) = coalesce(shape, strides)
    forEachCoalescedRun(s, st, body)
}

/// ``forEachRun(_:_:_:)`` over a shape and strides that ``coalesce(_:_:)`` has already
/// merged, each operand starting at `origin` (0 by default): allocates nothing, so a caller
/// that walks many sub-blocks of one layout (the row blocks of a split loop) coalesces once.
@inline(__always)
func forEachCoalescedRun(_ s: [Int], _ st: [[Int]], origin: [Int]? = nil,
                         _ body: (UnsafeMutableBufferPointer<Int>, UnsafeMutableBufferPointer<Int>, Int) -> Void) {
    let total = shapeCount(s)
    if total == 0 { return }
    let rank = s.count, k = st.count
    let inner = s[rank - 1]
    // The strides are copied into the temporary buffer ([d][j], d-major) and the shape too: indexing
    // the nested arrays in the loop retained and released an inner array on every run.
    withUnsafeTemporaryAllocation(of: Int.self, capacity: 2 * k + 2 * rank + k * rank) { buf in
        let offsets = UnsafeMutableBufferPointer(rebasing: buf[0..<k])
        let steps = UnsafeMutableBufferPointer(rebasing: buf[k..<(2 * k)])
        let index = UnsafeMutableBufferPointer(rebasing: buf[(2 * k)..<(2 * k + rank)])
        let extent = UnsafeMutableBufferPointer(rebasing: buf[(2 * k + rank)..<(2 * k + 2 * rank)])
        let stride = UnsafeMutableBufferPointer(rebasing: buf[(2 * k + 2 * rank)...])
        for j in 0..<k {
            offsets[j] = origin?[j] ?? 0
            steps[j] = st[j][rank - 1]
            for d in 0..<rank { stride[d * k + j] = st[j][d] }
        }
        for d in 0..<rank { index[d] = 0; extent[d] = s[d] }
        var done = 0
        while done < total {
            body(offsets, steps, inner)
            done += inner
            // Advance the outer index like an odometer.
            var d = rank - 2
            while d >= 0 {
                index[d] += 1
                for j in 0..<k { offsets[j] += stride[d * k + j] }
                if index[d] < extent[d] { break }
                for j in 0..<k { offsets[j] -= stride[d * k + j] * extent[d] }
                index[d] = 0
                d -= 1
            }
        }
    }
}
