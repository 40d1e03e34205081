import CKappaKernels
import RealModule

// Elementwise ops. Each unary function is one stanza: its value and its derivative
// dy/dx (given x and the saved output y), side by side; one generic driver runs the
// forward kernel and the fused backward kernel g · dy/dx for every function. Binary ops
// broadcast by NumPy's rules; their VJPs are one line per input, and the tape sums each
// gradient back to its input's shape.

/// A scalar function applied elementwise, with parameters `a`, `b` fixed per call.
protocol UnaryFunction {
    static func value<T: TensorScalar>(_ x: T, _ a: T, _ b: T) -> T
    /// dy/dx at x, where y = value(x).
    static func derivative<T: TensorScalar>(_ x: T, _ y: T, _ a: T, _ b: T) -> T
    /// The C kernels (`CKappaKernels`, compiled for the host's vector units) that compute
    /// value and g·derivative on contiguous Float32 runs, where they exist.
    static var float32Kernels: UnaryKernels? { get }
}

extension UnaryFunction {
    static var float32Kernels: UnaryKernels? { nil }
}

/// A unary op's Float32 C kernels: y = f(x) and gx = g·f′(x) over n elements (a, b are the
/// op's parameters).
struct UnaryKernels {
    let forward: (_ x: UnsafeMutablePointer<Float>, _ y: UnsafeMutablePointer<Float>, _ n: Int, _ a: Float, _ b: Float) -> Void
    let backward: (_ g: UnsafeMutablePointer<Float>, _ x: UnsafeMutablePointer<Float>, _ y: UnsafeMutablePointer<Float>,
                   _ gx: UnsafeMutablePointer<Float>, _ n: Int, _ a: Float, _ b: Float) -> Void
}

enum Negate: UnaryFunction {
    static func value<T: TensorScalar>(_ x: T, _ a: T, _ b: T) -> T { -x }
    static func derivative<T: TensorScalar>(_ x: T, _ y: T, _ a: T, _ b: T) -> T { -1 }
    static let float32Kernels: UnaryKernels? = UnaryKernels(
        // −1·x + (−0): −0 keeps −(+0) = −0 as plain negation does (+0 would turn it to +0).
        forward: { x, y, n, _, _ in kappa_affine_f32(x, y, n, -1, -0.0) },
        backward: { g, _, _, gx, n, _, _ in kappa_affine_f32(g, gx, n, -1, -0.0) })
}
/// a·x + b (scalar addition, subtraction and multiplication).
enum Affine: UnaryFunction {
    static func value<T: TensorScalar>(_ x: T, _ a: T, _ b: T) -> T { a * x + b }
    static func derivative<T: TensorScalar>(_ x: T, _ y: T, _ a: T, _ b: T) -> T { a }
    static let float32Kernels: UnaryKernels? = UnaryKernels(
        forward: { x, y, n, a, b in kappa_affine_f32(x, y, n, a, b) },
        backward: { g, _, _, gx, n, a, _ in kappa_affine_f32(g, gx, n, a, 0) })
}
/// x / a.
enum DivideByScalar: UnaryFunction {
    static func value<T: TensorScalar>(_ x: T, _ a: T, _ b: T) -> T { x / a }
    static func derivative<T: TensorScalar>(_ x: T, _ y: T, _ a: T, _ b: T) -> T { 1 / a }
}
/// a / x.
enum ScalarDivide: UnaryFunction {
    static func value<T: TensorScalar>(_ x: T, _ a: T, _ b: T) -> T { a / x }
    static func derivative<T: TensorScalar>(_ x: T, _ y: T, _ a: T, _ b: T) -> T { -y / x }
}
/// x^a for an integer a (defined for negative x).
enum IntegerPower: UnaryFunction {
    static func value<T: TensorScalar>(_ x: T, _ a: T, _ b: T) -> T { T.pow(x, Int(a)) }
    static func derivative<T: TensorScalar>(_ x: T, _ y: T, _ a: T, _ b: T) -> T {
        a == 0 ? 0 : a * T.pow(x, Int(a) - 1)
    }
}
/// x^a for a real a (NaN for negative x, as in PyTorch).
enum RealPower: UnaryFunction {
    static func value<T: TensorScalar>(_ x: T, _ a: T, _ b: T) -> T { x < 0 ? .nan : T.pow(x, a) }
    static func derivative<T: TensorScalar>(_ x: T, _ y: T, _ a: T, _ b: T) -> T { a * (x < 0 ? .nan : T.pow(x, a - 1)) }
}
enum SquareRoot: UnaryFunction {
    static func value<T: TensorScalar>(_ x: T, _ a: T, _ b: T) -> T { x.squareRoot() }
    static func derivative<T: TensorScalar>(_ x: T, _ y: T, _ a: T, _ b: T) -> T { 1 / (2 * y) }
}
enum ReciprocalSquareRoot: UnaryFunction {
    static func value<T: TensorScalar>(_ x: T, _ a: T, _ b: T) -> T { 1 / x.squareRoot() }
    static func derivative<T: TensorScalar>(_ x: T, _ y: T, _ a: T, _ b: T) -> T { -y * y * y / 2 }
}
enum Exp: UnaryFunction {
    static func value<T: TensorScalar>(_ x: T, _ a: T, _ b: T) -> T { kernelExp(x) }
    static func derivative<T: TensorScalar>(_ x: T, _ y: T, _ a: T, _ b: T) -> T { y }
    static let float32Kernels: UnaryKernels? = UnaryKernels(
        forward: { x, y, n, _, _ in kappa_exp_f32(x, y, n) },
        backward: { g, _, y, gx, n, _, _ in kappa_binary_f32(2, g, y, gx, n) })
}
enum Log: UnaryFunction {
    static func value<T: TensorScalar>(_ x: T, _ a: T, _ b: T) -> T { T.log(x) }
    static func derivative<T: TensorScalar>(_ x: T, _ y: T, _ a: T, _ b: T) -> T { 1 / x }
}
enum Log1p: UnaryFunction {
    static func value<T: TensorScalar>(_ x: T, _ a: T, _ b: T) -> T { T.log(onePlus: x) }
    static func derivative<T: TensorScalar>(_ x: T, _ y: T, _ a: T, _ b: T) -> T { 1 / (1 + x) }
}
enum Expm1: UnaryFunction {
    static func value<T: TensorScalar>(_ x: T, _ a: T, _ b: T) -> T { T.expMinusOne(x) }
    static func derivative<T: TensorScalar>(_ x: T, _ y: T, _ a: T, _ b: T) -> T { y + 1 }
}
/// |x|; the subgradient at 0 is 0, as PyTorch's sign(0) = 0.
enum Absolute: UnaryFunction {
    static func value<T: TensorScalar>(_ x: T, _ a: T, _ b: T) -> T { Swift.abs(x) }
    static func derivative<T: TensorScalar>(_ x: T, _ y: T, _ a: T, _ b: T) -> T { x > 0 ? 1 : (x < 0 ? -1 : 0) }
}
enum Sine: UnaryFunction {
    static func value<T: TensorScalar>(_ x: T, _ a: T, _ b: T) -> T { T.sin(x) }
    static func derivative<T: TensorScalar>(_ x: T, _ y: T, _ a: T, _ b: T) -> T { T.cos(x) }
}
enum Cosine: UnaryFunction {
    static func value<T: TensorScalar>(_ x: T, _ a: T, _ b: T) -> T { T.cos(x) }
    static func derivative<T: TensorScalar>(_ x: T, _ y: T, _ a: T, _ b: T) -> T { -T.sin(x) }
}
enum HyperbolicTangent: UnaryFunction {
    static func value<T: TensorScalar>(_ x: T, _ a: T, _ b: T) -> T { T.tanh(x) }
    static func derivative<T: TensorScalar>(_ x: T, _ y: T, _ a: T, _ b: T) -> T { 1 - y * y }
}
/// 1/(1 + e^{-x}), evaluated without overflow for either sign.
enum Sigmoid: UnaryFunction {
    static func value<T: TensorScalar>(_ x: T, _ a: T, _ b: T) -> T {
        if x >= 0 { return 1 / (1 + T.exp(-x)) }
        let e = T.exp(x)
        return e / (1 + e)
    }
    static func derivative<T: TensorScalar>(_ x: T, _ y: T, _ a: T, _ b: T) -> T { y * (1 - y) }
}
/// max(x, 0); the subgradient at 0 is 0, as PyTorch.
enum ReLU: UnaryFunction {
    static func value<T: TensorScalar>(_ x: T, _ a: T, _ b: T) -> T { x > 0 ? x : 0 }
    static func derivative<T: TensorScalar>(_ x: T, _ y: T, _ a: T, _ b: T) -> T { x > 0 ? 1 : 0 }
    static let float32Kernels: UnaryKernels? = UnaryKernels(
        forward: { x, y, n, _, _ in kappa_relu_f32(x, y, n) },
        backward: { g, x, _, gx, n, _, _ in kappa_relu_backward_f32(g, x, gx, n) })
}
/// x·Φ(x) with Φ the standard normal CDF (the exact GELU), Φ(x) = erfc(−x/√2)/2 so that
/// the lower tail keeps its relative accuracy. Float32 (relative error within 5·10⁻⁶ for
/// |x| ≤ 5 and 5·10⁻⁵ further into the lower tail, tested against the Double form): the C
/// kernel takes Φ(−|x|) = e^{log Q(|x|) − x²/2} for |x| ≤ 4, with Q(t) = e^{t²/2}Φ(−t) a
/// fitted polynomial (`Scripts/gelu_polynomial.py`), and the vectorizable erfc form of
/// ``fastNormalCDF(_:)`` beyond; strided operands use ``fastNormalCDF(_:)`` throughout.
enum GELU: UnaryFunction {
    @inline(__always) static func value<T: TensorScalar>(_ x: T, _ a: T, _ b: T) -> T {
        if T.self == Float.self {
            let f = unsafeBitCast(x, to: Float.self)
            return unsafeBitCast(f * fastNormalCDF(f), to: T.self)
        }
        // Φ(x) = erfc(−x/√2)/2: (1 + erf(x/√2))/2 would cancel in the lower tail.
        return x * T.erfc(-x * T(0.70710678118654752440)) / 2
    }
    @inline(__always) static func derivative<T: TensorScalar>(_ x: T, _ y: T, _ a: T, _ b: T) -> T {
        if T.self == Float.self {
            let f = unsafeBitCast(x, to: Float.self)
            return unsafeBitCast(fastNormalCDF(f) + f * fastNormalPDF(f), to: T.self)
        }
        let cdf = T.erfc(-x * T(0.70710678118654752440)) / 2
        let pdf = T.exp(-x * x / 2) * T(0.39894228040143267794)
        return cdf + x * pdf
    }
    static let float32Kernels: UnaryKernels? = UnaryKernels(
        forward: { x, y, n, _, _ in kappa_gelu_f32(x, y, n) },
        backward: { g, x, _, gx, n, _, _ in kappa_gelu_backward_f32(g, x, gx, n) })
}
/// ½x(1 + tanh(√(2/π)(x + 0.044715x³))), GELU's tanh approximation.
enum GELUTanh: UnaryFunction {
    static let c = 0.79788456080286535588  // √(2/π)
    static func value<T: TensorScalar>(_ x: T, _ a: T, _ b: T) -> T {
        x * (1 + T.tanh(T(c) * (x + T(0.044715) * x * x * x))) / 2
    }
    static func derivative<T: TensorScalar>(_ x: T, _ y: T, _ a: T, _ b: T) -> T {
        let k = T(c), x2 = x * x
        let t = T.tanh(k * (x + T(0.044715) * x2 * x))
        let dInner: T = k * (1 + T(3 * 0.044715) * x2)
        let half: T = (1 + t) / 2
        return half + x * (1 - t * t) * dInner / 2
    }
}
/// log(1 + e^{a·x})/a, stable for large |x|.
enum Softplus: UnaryFunction {
    static func value<T: TensorScalar>(_ x: T, _ a: T, _ b: T) -> T {
        let z = a * x
        return (Swift.max(z, 0) + T.log(onePlus: T.exp(-Swift.abs(z)))) / a
    }
    static func derivative<T: TensorScalar>(_ x: T, _ y: T, _ a: T, _ b: T) -> T { Sigmoid.value(a * x, 0, 0) }
}
/// min(max(x, a), b); gradient 1 on [a, b] (both ends included, as PyTorch), 0 outside.
enum Clamp: UnaryFunction {
    static func value<T: TensorScalar>(_ x: T, _ a: T, _ b: T) -> T { x.isNaN ? x : Swift.min(Swift.max(x, a), b) }
    // As PyTorch 2.15: the gradient passes strictly inside (a, b), 0 at the bounds.
    static func derivative<T: TensorScalar>(_ x: T, _ y: T, _ a: T, _ b: T) -> T { x > a && x < b ? 1 : 0 }
}
/// The sign, −1, 0 or 1 (no gradient).
enum Sign: UnaryFunction {
    static func value<T: TensorScalar>(_ x: T, _ a: T, _ b: T) -> T { x > 0 ? 1 : (x < 0 ? -1 : 0) }
    static func derivative<T: TensorScalar>(_ x: T, _ y: T, _ a: T, _ b: T) -> T { 0 }
}

// MARK: Unary driver

extension Tensor {
    /// Applies `F` elementwise and records its VJP `g · F.derivative(x, y)` as one fused kernel.
    func unary<F: UnaryFunction>(_ name: String, _: F.Type, _ a: Double = 0, _ b: Double = 0,
                                 differentiable: Bool = true) -> Tensor {
        let x = contiguousData()
        let y = Tensor(uninitialized: shape, dtype: dtype)
        switch dtype {
        case .float32: unaryForward(F.self, x, y, Float(a), Float(b))
        case .float64: unaryForward(F.self, x, y, a, b)
        }
        if differentiable {
            let ySaved = y.detached()
            Tape.record(name, [self], y) { g in
                let gx = Tensor(uninitialized: x.shape, dtype: x.dtype)
                let gc = g.contiguousData()
                switch x.dtype {
                case .float32: unaryBackward(F.self, gc, x, ySaved, gx, Float(a), Float(b))
                case .float64: unaryBackward(F.self, gc, x, ySaved, gx, a, b)
                }
                return [gx]
            }
        }
        return y
    }
}

private func unaryForward<F: UnaryFunction, T: TensorScalar>(_: F.Type, _ x: Tensor, _ y: Tensor, _ a: T, _ b: T) {
    let px = x.pointer(T.self), py = y.pointer(T.self)
    if T.self == Float.self, let k = F.float32Kernels {
        let (fa, fb) = (Float(a), Float(b))
        Parallel.forEach(x.count, costPerItem: 4) { r in k.forward(f32(px + r.lowerBound), f32(py + r.lowerBound), r.count, fa, fb) }
        return
    }
    Parallel.forEach(x.count, costPerItem: 8) { r in
        for i in r { py[i] = F.value(px[i], a, b) }
    }
}

private func unaryBackward<F: UnaryFunction, T: TensorScalar>(_: F.Type, _ g: Tensor, _ x: Tensor, _ y: Tensor,
                                                              _ gx: Tensor, _ a: T, _ b: T) {
    let pg = g.pointer(T.self), px = x.pointer(T.self), py = y.pointer(T.self), pgx = gx.pointer(T.self)
    if T.self == Float.self, let k = F.float32Kernels {
        let (fa, fb) = (Float(a), Float(b))
        Parallel.forEach(x.count, costPerItem: 4) { r in
            let o = r.lowerBound
            k.backward(f32(pg + o), f32(px + o), f32(py + o), f32(pgx + o), r.count, fa, fb)
        }
        return
    }
    Parallel.forEach(x.count, costPerItem: 8) { r in
        for i in r { pgx[i] = pg[i] * F.derivative(px[i], py[i], a, b) }
    }
}

// MARK: Unary ops

extension Tensor {
    /// −x.
    public static prefix func - (x: Tensor) -> Tensor { x.unary("neg", Negate.self) }
    /// √x.
    public func sqrt() -> Tensor { unary("sqrt", SquareRoot.self) }
    /// 1/√x.
    public func rsqrt() -> Tensor { unary("rsqrt", ReciprocalSquareRoot.self) }
    /// eˣ.
    public func exp() -> Tensor { unary("exp", Exp.self) }
    /// ln x.
    public func log() -> Tensor { unary("log", Log.self) }
    /// ln(1 + x), accurate near 0.
    public func log1p() -> Tensor { unary("log1p", Log1p.self) }
    /// eˣ − 1, accurate near 0.
    public func expm1() -> Tensor { unary("expm1", Expm1.self) }
    /// |x| (subgradient 0 at 0).
    public func abs() -> Tensor { unary("abs", Absolute.self) }
    /// sin x.
    public func sin() -> Tensor { unary("sin", Sine.self) }
    /// cos x.
    public func cos() -> Tensor { unary("cos", Cosine.self) }
    /// tanh x.
    public func tanh() -> Tensor { unary("tanh", HyperbolicTangent.self) }
    /// 1/(1 + e⁻ˣ).
    public func sigmoid() -> Tensor { unary("sigmoid", Sigmoid.self) }
    /// max(x, 0) (subgradient 0 at 0).
    public func relu() -> Tensor { unary("relu", ReLU.self) }
    /// GELU: x·Φ(x) exactly (erf form), or its tanh approximation when `approximate` is true.
    public func gelu(approximate: Bool = false) -> Tensor {
        approximate ? unary("gelu_tanh", GELUTanh.self) : unary("gelu", GELU.self)
    }
    /// log(1 + e^{βx})/β.
    public func softplus(beta: Double = 1) -> Tensor {
        precondition(beta > 0, "softplus: beta \(beta) is not positive")
        return unary("softplus", Softplus.self, beta)
    }
    /// x clamped to `[min, max]`; gradient 1 inside (ends included), 0 outside.
    public func clamped(min lo: Double = -.infinity, max hi: Double = .infinity) -> Tensor {
        precondition(lo <= hi, "clamp: min \(lo) is above max \(hi)")
        return unary("clamp", Clamp.self, lo, hi)
    }
    /// xᵖ for a scalar exponent (integer exponents accept negative x).
    public func pow(_ p: Double) -> Tensor {
        let isInteger = p.rounded() == p && Swift.abs(p) < 1e9
        return isInteger ? unary("pow", IntegerPower.self, p) : unary("pow", RealPower.self, p)
    }
    /// 1/x.
    public func reciprocal() -> Tensor { unary("reciprocal", ScalarDivide.self, 1) }
    /// −1, 0 or 1 by the sign of each element; no gradient.
    public func sign() -> Tensor { unary("sign", Sign.self, differentiable: false) }

    /// x + s elementwise.
    public static func + (x: Tensor, s: Double) -> Tensor { x.unary("add", Affine.self, 1, s) }
    /// s + x elementwise.
    public static func + (s: Double, x: Tensor) -> Tensor { x.unary("add", Affine.self, 1, s) }
    /// x − s elementwise.
    public static func - (x: Tensor, s: Double) -> Tensor { x.unary("sub", Affine.self, 1, -s) }
    /// s − x elementwise.
    public static func - (s: Double, x: Tensor) -> Tensor { x.unary("rsub", Affine.self, -1, s) }
    /// x · s elementwise.
    public static func * (x: Tensor, s: Double) -> Tensor { x.unary("mul", Affine.self, s, 0) }
    /// s · x elementwise.
    public static func * (s: Double, x: Tensor) -> Tensor { x.unary("mul", Affine.self, s, 0) }
    /// x / s elementwise.
    public static func / (x: Tensor, s: Double) -> Tensor { x.unary("div", DivideByScalar.self, s) }
    /// s / x elementwise.
    public static func / (s: Double, x: Tensor) -> Tensor { x.unary("rdiv", ScalarDivide.self, s) }
}

// MARK: Binary ops

/// A scalar function of two arguments applied elementwise with broadcasting.
protocol BinaryFunction {
    static func value<T: TensorScalar>(_ a: T, _ b: T) -> T
    /// The op code of `kappa_binary_f32` (0 +, 1 −, 2 ×, 3 ÷) for the four arithmetic ops.
    static var float32Op: Int32? { get }
}

extension BinaryFunction {
    static var float32Op: Int32? { nil }
}

enum Add: BinaryFunction {
    static func value<T: TensorScalar>(_ a: T, _ b: T) -> T { a + b }
    static var float32Op: Int32? { 0 }
}
enum Subtract: BinaryFunction {
    static func value<T: TensorScalar>(_ a: T, _ b: T) -> T { a - b }
    static var float32Op: Int32? { 1 }
}
enum Multiply: BinaryFunction {
    static func value<T: TensorScalar>(_ a: T, _ b: T) -> T { a * b }
    static var float32Op: Int32? { 2 }
}
enum Divide: BinaryFunction {
    static func value<T: TensorScalar>(_ a: T, _ b: T) -> T { a / b }
    static var float32Op: Int32? { 3 }
}
enum Power: BinaryFunction {
    static func value<T: TensorScalar>(_ a: T, _ b: T) -> T {
        if b.rounded() == b && Swift.abs(b) < T(1e9) { return T.pow(a, Int(b)) }
        return a < 0 ? .nan : T.pow(a, b)
    }
}
enum Minimum: BinaryFunction {
    static func value<T: TensorScalar>(_ a: T, _ b: T) -> T { a.isNaN || b.isNaN ? .nan : Swift.min(a, b) }
}
enum Maximum: BinaryFunction {
    static func value<T: TensorScalar>(_ a: T, _ b: T) -> T { a.isNaN || b.isNaN ? .nan : Swift.max(a, b) }
}
enum Greater: BinaryFunction { static func value<T: TensorScalar>(_ a: T, _ b: T) -> T { a > b ? 1 : 0 } }
enum GreaterEqual: BinaryFunction { static func value<T: TensorScalar>(_ a: T, _ b: T) -> T { a >= b ? 1 : 0 } }
enum Less: BinaryFunction { static func value<T: TensorScalar>(_ a: T, _ b: T) -> T { a < b ? 1 : 0 } }
enum LessEqual: BinaryFunction { static func value<T: TensorScalar>(_ a: T, _ b: T) -> T { a <= b ? 1 : 0 } }
enum Equal: BinaryFunction { static func value<T: TensorScalar>(_ a: T, _ b: T) -> T { a == b ? 1 : 0 } }
enum NotEqual: BinaryFunction { static func value<T: TensorScalar>(_ a: T, _ b: T) -> T { a != b ? 1 : 0 } }

func checkSameDType(_ op: String, _ a: Tensor, _ b: Tensor) {
    precondition(a.dtype == b.dtype, "\(op): dtypes \(a.dtype) and \(b.dtype) differ (\(a.shape) and \(b.shape)); convert one with to(_:)")
}

/// Applies `F` to broadcast `a` and `b` into a new contiguous tensor (not recorded).
func binaryKernel<F: BinaryFunction>(_ op: String, _: F.Type, _ a: Tensor, _ b: Tensor) -> Tensor {
    checkSameDType(op, a, b)
    let shape = a.shape == b.shape ? a.shape : broadcastOrFail(op, a.shape, b.shape)
    let out = Tensor(uninitialized: shape, dtype: a.dtype)
    switch a.dtype {
    case .float32: binaryLoop(F.self, a, b, out, Float.self)
    case .float64: binaryLoop(F.self, a, b, out, Double.self)
    }
    return out
}

private func binaryLoop<F: BinaryFunction, T: TensorScalar>(_: F.Type, _ a: Tensor, _ b: Tensor, _ out: Tensor, _: T.Type) {
    let pa = a.pointer(T.self), pb = b.pointer(T.self), po = out.pointer(T.self)
    let n = out.count
    if a.shape == b.shape && a.isContiguous && b.isContiguous {
        if T.self == Float.self, let op = F.float32Op {
            Parallel.forEach(n) { r in
                let o = r.lowerBound
                kappa_binary_f32(op, f32(pa + o), f32(pb + o), f32(po + o), r.count)
            }
            return
        }
        Parallel.forEach(n) { r in for i in r { po[i] = F.value(pa[i], pb[i]) } }
        return
    }
    if b.count == 1 && a.isContiguous && a.count == n {
        let s = pb[0]
        Parallel.forEach(n) { r in for i in r { po[i] = F.value(pa[i], s) } }
        return
    }
    if a.count == 1 && b.isContiguous && b.count == n {
        let s = pa[0]
        Parallel.forEach(n) { r in for i in r { po[i] = F.value(s, pb[i]) } }
        return
    }
    let sa = broadcastStrides(shape: a.shape, strides: a.strides, to: out.shape)
    let sb = broadcastStrides(shape: b.shape, strides: b.strides, to: out.shape)
    forEachRunSplit(out.shape, [sa, sb, out.strides]) { off, step, m in
        let x = pa + off[0], y = pb + off[1], z = po + off[2]
        switch (step[0], step[1]) {
        case (1, 1): for i in 0..<m { z[i] = F.value(x[i], y[i]) }
        case (1, 0): let s = y[0]; for i in 0..<m { z[i] = F.value(x[i], s) }
        case (0, 1): let s = x[0]; for i in 0..<m { z[i] = F.value(s, y[i]) }
        case let (u, v): for i in 0..<m { z[i] = F.value(x[i * u], y[i * v]) }
        }
    }
}

/// `forEachRun` over `shape`, split across cores along the first dimension when large.
func forEachRunSplit(_ shape: [Int], _ strides: [[Int]],
                     _ body: (UnsafeMutableBufferPointer<Int>, UnsafeMutableBufferPointer<Int>, Int) -> Void) {
    let n = shapeCount(shape)
    guard shape.count > 1, shape[0] > 1, n >= Parallel.grain else {
        forEachRun(shape, strides, body)
        return
    }
    // The rows share one layout: coalesce it once (each coalescing allocates its arrays), and
    // walk each thread's block of rows as one layout whose first dimension is the block (a walk
    // per row cost more than a row of 64 elements).
    let (inner, innerStrides) = coalesce(Array(shape.dropFirst()), strides.map { Array($0.dropFirst()) })
    let outer = strides.map { $0[0] }
    Parallel.forEach(shape[0], costPerItem: n / shape[0]) { r in
        let blockShape = [r.count] + inner
        let blockStrides = (0..<outer.count).map { [outer[$0]] + innerStrides[$0] }
        forEachCoalescedRun(blockShape, blockStrides, origin: outer.map { $0 * r.lowerBound }, body)
    }
}

extension Tensor {
    /// Records a binary op whose VJP is given in tensor ops.
    static func binary<F: BinaryFunction>(_ name: String, _ f: F.Type, _ a: Tensor, _ b: Tensor,
                                          vjp: @escaping (_ g: Tensor, _ y: Tensor) -> [Tensor?]) -> Tensor {
        let out = binaryKernel(name, F.self, a, b)
        let y = out.detached()
        Tape.record(name, [a, b], out) { g in vjp(g, y) }
        return out
    }

    /// a + b with broadcasting; the gradient of a broadcast input is summed back to its shape.
    public static func + (a: Tensor, b: Tensor) -> Tensor {
        binary("add", Add.self, a, b) { g, _ in [g, g] }
    }
    /// a − b with broadcasting.
    public static func - (a: Tensor, b: Tensor) -> Tensor {
        binary("sub", Subtract.self, a, b) { g, _ in [g, -g] }
    }
    // Gradients are computed only for inputs that need them (a mask or a constant operand
    // costs nothing on the way back).
    /// a ⊙ b (elementwise) with broadcasting.
    public static func * (a: Tensor, b: Tensor) -> Tensor {
        binary("mul", Multiply.self, a, b) { g, _ in [a._requiresGrad ? g * b : nil, b._requiresGrad ? g * a : nil] }
    }
    /// a / b elementwise with broadcasting.
    public static func / (a: Tensor, b: Tensor) -> Tensor {
        binary("div", Divide.self, a, b) { g, y in [a._requiresGrad ? g / b : nil, b._requiresGrad ? -g * y / b : nil] }
    }
    /// aᵇ elementwise. The gradient in b is g·y·ln a, taken as 0 where a = 0 and b ≥ 0 (as PyTorch).
    public func pow(_ exponent: Tensor) -> Tensor {
        let a = self, b = exponent
        return Tensor.binary("pow", Power.self, a, b) { g, y in
            let da = g * b * Kappa.binaryKernel("pow", Power.self, a, b - 1)
            let safe = Tensor.where(a.eq(0) * b.ge(0), Tensor(scalar: 1, dtype: a.dtype), a)
            let db = g * y * safe.log()
            return [da, db]
        }
    }
    /// The elementwise minimum; at ties each input gets half the gradient (as PyTorch).
    public static func minimum(_ a: Tensor, _ b: Tensor) -> Tensor {
        binary("minimum", Minimum.self, a, b) { g, _ in
            let wa = a.lt(b) + a.eq(b) * 0.5
            return [g * wa, g * (1 - wa)]
        }
    }
    /// The elementwise maximum; at ties each input gets half the gradient (as PyTorch).
    public static func maximum(_ a: Tensor, _ b: Tensor) -> Tensor {
        binary("maximum", Maximum.self, a, b) { g, _ in
            let wa = a.gt(b) + a.eq(b) * 0.5
            return [g * wa, g * (1 - wa)]
        }
    }

    // Comparisons: 1 where true, 0 where false, in this tensor's type; no gradient.

    /// 1 where self > other.
    public func gt(_ other: Tensor) -> Tensor { Kappa.binaryKernel("gt", Greater.self, self, other) }
    /// 1 where self ≥ other.
    public func ge(_ other: Tensor) -> Tensor { Kappa.binaryKernel("ge", GreaterEqual.self, self, other) }
    /// 1 where self < other.
    public func lt(_ other: Tensor) -> Tensor { Kappa.binaryKernel("lt", Less.self, self, other) }
    /// 1 where self ≤ other.
    public func le(_ other: Tensor) -> Tensor { Kappa.binaryKernel("le", LessEqual.self, self, other) }
    /// 1 where self = other.
    public func eq(_ other: Tensor) -> Tensor { Kappa.binaryKernel("eq", Equal.self, self, other) }
    /// 1 where self ≠ other.
    public func ne(_ other: Tensor) -> Tensor { Kappa.binaryKernel("ne", NotEqual.self, self, other) }
    /// 1 where x > s, else 0 (no gradient).
    public func gt(_ s: Double) -> Tensor { gt(Tensor(scalar: s, dtype: dtype)) }
    /// 1 where x ≥ s, else 0 (no gradient).
    public func ge(_ s: Double) -> Tensor { ge(Tensor(scalar: s, dtype: dtype)) }
    /// 1 where x < s, else 0 (no gradient).
    public func lt(_ s: Double) -> Tensor { lt(Tensor(scalar: s, dtype: dtype)) }
    /// 1 where x ≤ s, else 0 (no gradient).
    public func le(_ s: Double) -> Tensor { le(Tensor(scalar: s, dtype: dtype)) }
    /// 1 where x = s, else 0 (no gradient).
    public func eq(_ s: Double) -> Tensor { eq(Tensor(scalar: s, dtype: dtype)) }
    /// 1 where x ≠ s, else 0 (no gradient).
    public func ne(_ s: Double) -> Tensor { ne(Tensor(scalar: s, dtype: dtype)) }

    // MARK: where

    /// Elementwise `condition ≠ 0 ? a : b`, all three broadcast together. The gradient goes
    /// to `a` where the condition holds and to `b` elsewhere; the condition gets none.
    public static func `where`(_ condition: Tensor, _ a: Tensor, _ b: Tensor) -> Tensor {
        checkSameDType("where", a, b)
        checkSameDType("where", condition, a)
        let s1 = broadcastOrFail("where", condition.shape, a.shape)
        let shape = broadcastOrFail("where", s1, b.shape)
        let out = Tensor(uninitialized: shape, dtype: a.dtype)
        switch a.dtype {
        case .float32: whereLoop(condition, a, b, out, Float.self)
        case .float64: whereLoop(condition, a, b, out, Double.self)
        }
        let zero = Tensor(scalar: 0, dtype: a.dtype)
        Tape.record("where", [condition, a, b], out) { g in
            [nil, Tensor.where(condition, g, zero), Tensor.where(condition, zero, g)]
        }
        return out
    }

    /// `where(condition, scalar, self)`: `value` where `mask ≠ 0`, this tensor elsewhere
    /// (no gradient flows to the filled positions).
    public func maskedFill(_ mask: Tensor, _ value: Double) -> Tensor {
        Tensor.where(mask, Tensor(scalar: value, dtype: dtype), self)
    }
}

private func whereLoop<T: TensorScalar>(_ c: Tensor, _ a: Tensor, _ b: Tensor, _ out: Tensor, _: T.Type) {
    let pc = c.pointer(T.self), pa = a.pointer(T.self), pb = b.pointer(T.self), po = out.pointer(T.self)
    let sc = broadcastStrides(shape: c.shape, strides: c.strides, to: out.shape)
    let sa = broadcastStrides(shape: a.shape, strides: a.strides, to: out.shape)
    let sb = broadcastStrides(shape: b.shape, strides: b.strides, to: out.shape)
    forEachRunSplit(out.shape, [sc, sa, sb, out.strides]) { off, step, m in
        let x = pc + off[0], y = pa + off[1], z = pb + off[2], w = po + off[3]
        let (u, v, t) = (step[0], step[1], step[2])
        for i in 0..<m { w[i] = x[i * u] != 0 ? y[i * v] : z[i * t] }
    }
}
