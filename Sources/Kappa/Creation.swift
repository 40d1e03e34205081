import RealModule

extension Tensor {
    /// A tensor of zeros.
    public static func zeros(_ shape: [Int], dtype: DType = .float32) -> Tensor {
        Tensor(uninitialized: shape, dtype: dtype, zeroed: true)
    }

    /// A tensor of ones.
    public static func ones(_ shape: [Int], dtype: DType = .float32) -> Tensor {
        full(shape, 1, dtype: dtype)
    }

    /// A tensor with every element equal to `value`.
    public static func full(_ shape: [Int], _ value: Double, dtype: DType = .float32) -> Tensor {
        let t = Tensor(uninitialized: shape, dtype: dtype)
        let n = t.count
        switch dtype {
        case .float32: t.pointer(Float.self).update(repeating: Float(value), count: n)
        case .float64: t.pointer(Double.self).update(repeating: value, count: n)
        }
        return t
    }

    /// Zeros of this tensor's shape and type.
    public func zerosLike() -> Tensor { Tensor.zeros(shape, dtype: dtype) }

    /// Ones of this tensor's shape and type.
    public func onesLike() -> Tensor { Tensor.ones(shape, dtype: dtype) }

    /// The values `start, start + step, ...` below `end` (above it for a negative step).
    public static func arange(_ start: Double = 0, _ end: Double, step: Double = 1, dtype: DType = .float32) -> Tensor {
        precondition(step != 0, "arange: step is 0")
        let n = Swift.max(0, Int(((end - start) / step).rounded(.up)))
        return fill([n], dtype: dtype) { i in start + Double(i) * step }
    }

    /// `count` values evenly spaced from `start` to `end`, both included.
    public static func linspace(_ start: Double, _ end: Double, count: Int, dtype: DType = .float32) -> Tensor {
        precondition(count >= 0, "linspace: count \(count) is negative")
        let step = count > 1 ? (end - start) / Double(count - 1) : 0
        return fill([count], dtype: dtype) { i in i == count - 1 ? end : start + Double(i) * step }
    }

    /// The `n × n` identity matrix.
    public static func eye(_ n: Int, dtype: DType = .float32) -> Tensor {
        fill([n, n], dtype: dtype) { i in i / n == i % n ? 1 : 0 }
    }

    /// Uniform samples in `[low, high)`.
    public static func randomUniform(_ shape: [Int], low: Double = 0, high: Double = 1, dtype: DType = .float32,
                                     using generator: inout RandomGenerator) -> Tensor {
        fill(shape, dtype: dtype) { _ in low + (high - low) * generator.nextUniform() }
    }

    /// Normal samples with the given mean and standard deviation.
    public static func randomNormal(_ shape: [Int], mean: Double = 0, std: Double = 1, dtype: DType = .float32,
                                    using generator: inout RandomGenerator) -> Tensor {
        fill(shape, dtype: dtype) { _ in mean + std * generator.nextNormal() }
    }

    /// Normal samples redrawn until they fall in `[lower, upper]` (absolute bounds, as
    /// PyTorch's `trunc_normal_`; DINO initializes weights with std 0.02 in [-2, 2]).
    public static func truncatedNormal(_ shape: [Int], mean: Double = 0, std: Double = 1,
                                       lower: Double = -2, upper: Double = 2, dtype: DType = .float32,
                                       using generator: inout RandomGenerator) -> Tensor {
        precondition(lower < upper, "truncatedNormal: lower bound \(lower) is not below upper bound \(upper)")
        // Rejection needs the interval to hold a fair share of the mass.
        let mass = 0.5 * (Double.erf((upper - mean) / (std * 2.0.squareRoot()))
                          - Double.erf((lower - mean) / (std * 2.0.squareRoot())))
        precondition(mass > 1e-3, "truncatedNormal: [\(lower), \(upper)] holds only \(mass) of N(\(mean), \(std)²)")
        return fill(shape, dtype: dtype) { _ in
            while true {
                let x = mean + std * generator.nextNormal()
                if x >= lower && x <= upper { return x }
            }
        }
    }

    /// A tensor of ones with probability `probability`, else zeros.
    public static func bernoulli(_ shape: [Int], probability: Double, dtype: DType = .float32,
                                 using generator: inout RandomGenerator) -> Tensor {
        fill(shape, dtype: dtype) { _ in generator.nextUniform() < probability ? 1 : 0 }
    }

    /// A contiguous tensor whose element `i` (row-major) is `value(i)`.
    static func fill(_ shape: [Int], dtype: DType, _ value: (Int) -> Double) -> Tensor {
        let t = Tensor(uninitialized: shape, dtype: dtype)
        let n = t.count
        switch dtype {
        case .float32:
            let p = t.pointer(Float.self)
            for i in 0..<n { p[i] = Float(value(i)) }
        case .float64:
            let p = t.pointer(Double.self)
            for i in 0..<n { p[i] = value(i) }
        }
        return t
    }
}
