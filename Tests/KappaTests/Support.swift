import Kappa
import Testing

/// Float64 normal samples, deterministic per seed.
func randn(_ shape: [Int], seed: UInt64, dtype: DType = .float64) -> Tensor {
    var g = RandomGenerator(seed: seed)
    return Tensor.randomNormal(shape, dtype: dtype, using: &g)
}

/// Float64 uniform samples in [low, high).
func randu(_ shape: [Int], _ low: Double, _ high: Double, seed: UInt64) -> Tensor {
    var g = RandomGenerator(seed: seed)
    return Tensor.randomUniform(shape, low: low, high: high, dtype: .float64, using: &g)
}

/// Normal samples pushed at least `margin` away from 0 (for ops with a kink at 0).
func awayFromZero(_ shape: [Int], seed: UInt64, margin: Double = 0.1) -> Tensor {
    let x = randn(shape, seed: seed).scalars(as: Double.self).map { $0 + ($0 >= 0 ? margin : -margin) }
    return Tensor(x, shape: shape)
}

/// Asserts that gradcheck passes, printing the report on failure.
func expectGradients(_ inputs: [Tensor], mode: GradcheckMode = .full, atol: Double = 1e-5, rtol: Double = 1e-3,
                     sourceLocation: SourceLocation = #_sourceLocation, _ f: ([Tensor]) -> Tensor) {
    let report = gradcheck(inputs, atol: atol, rtol: rtol, mode: mode, f)
    #expect(report.passed, "\(report)", sourceLocation: sourceLocation)
    #expect(!report.entries.isEmpty, sourceLocation: sourceLocation)
}

/// Asserts elementwise closeness of two value lists.
func expectClose(_ a: [Double], _ b: [Double], tol: Double = 1e-9, sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(a.count == b.count, "counts \(a.count) and \(b.count) differ", sourceLocation: sourceLocation)
    let worst = zip(a, b).map { Swift.abs($0 - $1) }.max() ?? 0
    #expect(worst <= tol, "max difference \(worst) > \(tol): \(a.prefix(8)) vs \(b.prefix(8))", sourceLocation: sourceLocation)
}

/// The largest elementwise difference of `a` from `expected`, relative to the largest
/// magnitude in `expected` (how far a Float32 path is from a Float64 reference).
func worstRelativeError(_ a: Tensor, _ expected: Tensor) -> Double {
    let scale = expected.doubles.map(abs).max()!
    return zip(a.doubles, expected.doubles).map { abs($0 - $1) }.max()! / scale
}

extension Tensor {
    var doubles: [Double] { scalars(as: Double.self) }
}
