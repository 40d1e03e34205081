/// A dense, row-major n-dimensional array of `Float` or `Double` that can record the ops
/// applied to it, for reverse-mode differentiation.
///
/// A tensor is a view: a shape and strides (in elements) over a reference-counted storage.
/// Reshaping contiguous data, transposing, permuting, slicing and expanding make views that
/// share storage; ``contiguous()`` copies only when a kernel needs dense data.
///
/// Tensors are values for all the library's ops: no op writes into its inputs. A tensor with
/// ``requiresGrad`` set is a leaf whose ``grad`` receives gradients from ``backward(_:retainGraph:onGradientReady:)``.
public final class Tensor {
    /// The size of each dimension.
    public let shape: [Int]
    /// The step, in elements, between neighbours along each dimension.
    public let strides: [Int]
    /// The element type.
    public let dtype: DType
    let offset: Int
    let storage: Storage

    /// The node of the tape that produced this tensor, or `nil` for a leaf.
    var gradFn: Node?
    var _requiresGrad = false

    /// The accumulated gradient of a leaf after ``backward(_:retainGraph:onGradientReady:)``, or `nil`.
    public var grad: Tensor?

    init(storage: Storage, shape: [Int], strides: [Int], offset: Int, dtype: DType) {
        self.storage = storage
        self.shape = shape
        self.strides = strides
        self.offset = offset
        self.dtype = dtype
    }

    /// A new contiguous tensor whose elements are not initialized (kernels overwrite them).
    init(uninitialized shape: [Int], dtype: DType, zeroed: Bool = false) {
        precondition(shape.allSatisfy { $0 >= 0 }, "Tensor: negative dimension in shape \(shape)")
        self.shape = shape
        self.strides = contiguousStrides(shape)
        self.dtype = dtype
        self.offset = 0
        self.storage = Storage(byteCount: shapeCount(shape) * dtype.byteSize, zeroed: zeroed)
    }

    /// A tensor of `shape` holding `values` in row-major order, in the type of the values.
    public convenience init<T: TensorScalar>(_ values: [T], shape: [Int]? = nil) {
        self.init(values, shape: shape ?? [values.count], dtype: T.dtype)
    }

    /// A tensor of `shape` holding `values` converted to `dtype`.
    public convenience init<T: TensorScalar>(_ values: [T], shape: [Int], dtype: DType) {
        precondition(shapeCount(shape) == values.count,
                     "Tensor: \(values.count) values do not fill shape \(shape)")
        self.init(uninitialized: shape, dtype: dtype)
        values.withUnsafeBufferPointer { src in
            switch dtype {
            case .float32:
                let p = pointer(Float.self)
                for i in 0..<src.count { p[i] = Float(src[i]) }
            case .float64:
                let p = pointer(Double.self)
                for i in 0..<src.count { p[i] = Double(src[i]) }
            }
        }
    }

    /// A tensor from nested rows: `Tensor(rows: [[1, 2], [3, 4]])` has shape `[2, 2]`.
    public convenience init<T: TensorScalar>(rows: [[T]], dtype: DType = T.dtype) {
        let cols = rows.first?.count ?? 0
        precondition(rows.allSatisfy { $0.count == cols }, "Tensor(rows:): rows have different lengths")
        self.init(rows.flatMap { $0 }, shape: [rows.count, cols], dtype: dtype)
    }

    /// A rank-0 tensor holding `value`.
    public convenience init(scalar value: Double, dtype: DType = .float32) {
        self.init([value], shape: [], dtype: dtype)
    }

    // MARK: Properties

    /// The number of dimensions.
    public var rank: Int { shape.count }

    /// The number of elements.
    public var count: Int { shapeCount(shape) }

    /// Whether the elements lie in row-major order without gaps.
    public var isContiguous: Bool {
        var expected = 1
        for i in stride(from: shape.count - 1, through: 0, by: -1) where shape[i] != 1 {
            if strides[i] != expected { return false }
            expected *= shape[i]
        }
        return true
    }

    /// Whether gradients flow to this tensor: set it on leaves (parameters, inputs);
    /// results of ops on such tensors require gradients too.
    public var requiresGrad: Bool {
        get { _requiresGrad }
        set {
            precondition(gradFn == nil || newValue,
                         "requiresGrad: cannot turn off gradients of a non-leaf tensor; use detached()")
            _requiresGrad = newValue
        }
    }

    /// Whether this tensor was created by the user rather than recorded by an op.
    public var isLeaf: Bool { gradFn == nil }

    /// Sets ``requiresGrad`` and returns the tensor, for chaining at creation.
    @discardableResult
    public func requiringGrad(_ flag: Bool = true) -> Tensor {
        requiresGrad = flag
        return self
    }

    /// Clears the accumulated gradient.
    public func zeroGrad() { grad = nil }

    // MARK: Raw access

    /// A typed pointer to the first element of this view. The caller keeps `self` alive
    /// while it uses the pointer.
    @inline(__always)
    func pointer<T: TensorScalar>(_: T.Type) -> UnsafeMutablePointer<T> {
        precondition(T.dtype == dtype, "internal: \(dtype) tensor read as \(T.self)")
        return storage.pointer.assumingMemoryBound(to: T.self) + offset
    }

    /// The elements in row-major order, converted to `T`.
    public func scalars<T: TensorScalar>(as _: T.Type = T.self) -> [T] {
        let c = contiguousData()
        let n = c.count
        switch dtype {
        case .float32:
            let p = c.pointer(Float.self)
            return (0..<n).map { T(p[$0]) }
        case .float64:
            let p = c.pointer(Double.self)
            return (0..<n).map { T(p[$0]) }
        }
    }

    /// The value of a one-element tensor.
    public func item() -> Double {
        precondition(count == 1, "item: tensor of shape \(shape) has \(count) elements, not 1")
        return scalars(as: Double.self)[0]
    }

    /// The value at a multi-index.
    public subscript(element index: [Int]) -> Double {
        precondition(index.count == rank && zip(index, shape).allSatisfy { $0 >= 0 && $0 < $1 },
                     "subscript(element:): index \(index) is out of range for shape \(shape)")
        var off = offset
        for i in 0..<rank { off += index[i] * strides[i] }
        switch dtype {
        case .float32: return Double(storage.pointer.assumingMemoryBound(to: Float.self)[off])
        case .float64: return storage.pointer.assumingMemoryBound(to: Double.self)[off]
        }
    }

    /// A dense copy, or `self` when already dense; never recorded (kernels use it).
    func contiguousData() -> Tensor {
        if isContiguous { return self }
        let out = Tensor(uninitialized: shape, dtype: dtype)
        copyElements(from: self, to: out)
        return out
    }

    /// A new tensor viewing the same storage.
    func view(shape: [Int], strides: [Int], offset: Int) -> Tensor {
        Tensor(storage: storage, shape: shape, strides: strides, offset: offset, dtype: dtype)
    }

    /// A tensor sharing this one's data that is cut from the tape: no gradient flows through
    /// it (stop-gradient).
    public func detached() -> Tensor {
        view(shape: shape, strides: strides, offset: offset)
    }

    /// Whether two tensors view the same storage.
    public func sharesStorage(with other: Tensor) -> Bool { storage === other.storage }
}

/// Copies `src` into `dst` element by element, following both tensors' strides and
/// converting between element types. Shapes must match.
func copyElements(from src: Tensor, to dst: Tensor) {
    precondition(src.shape == dst.shape, "copy: shapes \(src.shape) and \(dst.shape) differ")
    switch (src.dtype, dst.dtype) {
    case (.float32, .float32): stridedCopy(src, dst, Float.self, Float.self)
    case (.float64, .float64): stridedCopy(src, dst, Double.self, Double.self)
    case (.float32, .float64): stridedCopy(src, dst, Float.self, Double.self)
    case (.float64, .float32): stridedCopy(src, dst, Double.self, Float.self)
    }
}

private func stridedCopy<S: TensorScalar, D: TensorScalar>(_ src: Tensor, _ dst: Tensor, _: S.Type, _: D.Type) {
    let ps = src.pointer(S.self), pd = dst.pointer(D.self)
    if src.isContiguous && dst.isContiguous {
        let n = src.count
        Parallel.forEach(n) { r in
            for i in r { pd[i] = D(ps[i]) }
        }
        return
    }
    forEachRun(src.shape, [src.strides, dst.strides]) { off, step, n in
        let a = ps + off[0], b = pd + off[1]
        let (ia, ib) = (step[0], step[1])
        if ia == 1 && ib == 1 {
            for i in 0..<n { b[i] = D(a[i]) }
        } else {
            for i in 0..<n { b[i * ib] = D(a[i * ia]) }
        }
    }
}
