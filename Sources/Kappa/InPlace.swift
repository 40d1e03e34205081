// Raw access and in-place updates, for optimizers, EMA teachers, checkpoints and
// initializers. None of these is recorded on the tape; each refuses a tensor that an op
// recorded (changing it in place would corrupt saved residuals).

extension Tensor {
    private func checkWritable(_ op: String) {
        precondition(gradFn == nil, "\(op): cannot modify a tensor produced by a recorded op in place")
        precondition(isContiguous, "\(op): tensor of shape \(shape) and strides \(strides) is not contiguous")
    }

    /// Calls `body` with the elements as a mutable buffer (row-major). The tensor must be
    /// contiguous, of type `T`, and a leaf.
    public func withMutableScalars<T: TensorScalar, R>(as _: T.Type, _ body: (UnsafeMutableBufferPointer<T>) throws -> R) rethrows -> R {
        checkWritable("withMutableScalars")
        precondition(T.dtype == dtype, "withMutableScalars: tensor is \(dtype), not \(T.dtype)")
        return try withExtendedLifetime(self) { try body(UnsafeMutableBufferPointer(start: pointer(T.self), count: count)) }
    }

    /// Calls `body` with the elements as a read-only buffer (row-major), copying first when
    /// the tensor is not contiguous.
    public func withScalars<T: TensorScalar, R>(as _: T.Type, _ body: (UnsafeBufferPointer<T>) throws -> R) rethrows -> R {
        precondition(T.dtype == dtype, "withScalars: tensor is \(dtype), not \(T.dtype)")
        let c = contiguousData()
        return try withExtendedLifetime(c) { try body(UnsafeBufferPointer(start: c.pointer(T.self), count: c.count)) }
    }

    /// Overwrites this tensor's elements with `source`'s (same shape; converted when the
    /// types differ). Not recorded.
    public func assign(_ source: Tensor) {
        checkWritable("assign")
        precondition(source.shape == shape, "assign: source \(source.shape) does not match \(shape)")
        copyElements(from: source, to: self)
    }

    /// The raw little-endian bytes of the elements, row-major.
    public func rawBytes() -> [UInt8] {
        let c = contiguousData()
        return withExtendedLifetime(c) {
            let p = UnsafeRawPointer(c.storage.pointer) + c.offset * dtype.byteSize
            return Array(UnsafeRawBufferPointer(start: p, count: c.count * dtype.byteSize))
        }
    }

    /// A tensor of `shape` and `dtype` from raw little-endian bytes, or `nil` when the byte
    /// count does not match.
    public convenience init?(rawBytes bytes: UnsafeRawBufferPointer, shape: [Int], dtype: DType) {
        guard shape.allSatisfy({ $0 >= 0 }), shapeCount(shape) * dtype.byteSize == bytes.count else { return nil }
        self.init(uninitialized: shape, dtype: dtype)
        if !bytes.isEmpty { storage.pointer.copyMemory(from: bytes.baseAddress!, byteCount: bytes.count) }
    }
}
