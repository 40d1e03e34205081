import CKappaKernels
import RealModule

// The modified Bessel function of the first kind in log space, its ratio
// A_ν(κ) = I_{ν+1}(κ)/I_ν(κ), and the von Mises-Fisher normalizer
// log C_p(κ) = ν log κ − (p/2) log 2π − log I_ν(κ), ν = p/2 − 1.
//
// Evaluation, by regime (all in Float64; Float32 tensors are evaluated in Float64 and rounded):
//
// 1. Power series, when κ²/4 ≤ 4(ν + 1) + 36:
//        I_ν(κ) = (κ/2)^ν / Γ(ν + 1) · S,  S = Σ_k (κ²/4)^k / (k! (ν+1)_k).
//    Every term is positive, so S is summed to full relative precision; the loop stops
//    when a term falls below 1e-17·S (at most ~60 terms in this regime). log I and
//    log C_p are assembled from log S without cancellation, so log I_0(10⁻⁶) ≈ 2.5·10⁻¹³
//    keeps all its digits. The ratio is (κ/2)/(ν+1) · S_{ν+1}/S_ν.
// 2. Uniform asymptotic (Debye) expansion, when ν ≥ 25, with s = √(ν² + κ²), p = ν/s:
//        log I_ν(κ) = s + ν log(κ/(ν + s)) − ½ log(2πs) + log Σ_{k≤16} U_k(p)/ν^k,
//        A_ν(κ) = κ/(ν + s) − κ/(2s²) − (νκ/s³) · Σ U_k'(p)/ν^k / Σ U_k(p)/ν^k
//    (DLMF 10.41.3; U_k from Scripts/debye_coefficients.py). The truncation error is
//    below max|U_17|/ν^17 < 10⁻¹⁸ for ν ≥ 25, uniformly in κ; the leading terms of the
//    ratio are the paper's approximation, here with all corrections.
// 3. Otherwise (ν < 25, κ beyond the series regime): start at μ = ν + m ≥ 25 with the
//    Debye expansion and recur downward in order, r_{j−1} = 1/(2j/κ + r_j) with
//    r_j = I_{j+1}/I_j, which is stable (every term positive); then
//    log I_ν = log I_μ − Σ_{j=ν}^{μ−1} log r_j. At most 25 steps.
//
// Against the 50-digit mpmath table (`../shared/reference/vmf_logcp.csv`, p from 2 to 4096,
// κ from 10⁻⁶ to 10⁵) the worst relative errors are printed by the tests; they are at the
// level of a few ulps (≤ 10⁻¹⁴) for log I_ν, log C_p and the ratio.

enum Bessel {
    /// Orders from which the Debye expansion is used directly.
    static let debyeOrder = 25.0

    static func inSeriesRegime(_ nu: Double, _ kappa: Double) -> Bool {
        kappa * kappa / 4 <= 4 * (nu + 1) + 36
    }

    /// log S_ν(κ) of the power series (regime 1).
    static func logSeries(_ nu: Double, _ kappa: Double) -> Double {
        let x = kappa * kappa / 4
        var term = 1.0, sum = 0.0, k = 0.0
        while true {
            term *= x / ((k + 1) * (nu + k + 1))
            sum += term
            k += 1
            if term <= 1e-17 * (1 + sum) || k > 500 { break }
        }
        return Double.log(onePlus: sum)
    }

    /// (log I_ν(κ), A_ν(κ)) from the Debye expansion (regime 2).
    static func debye(_ nu: Double, _ kappa: Double) -> (logI: Double, ratio: Double) {
        let s = (nu * nu + kappa * kappa).squareRoot()
        let p = nu / s
        var u = 0.0, du = 0.0, scale = 1.0
        for (k, coefficients) in debyeCoefficients.enumerated() {
            // Every later term is below 1e-17 of the sum (|U_k| ≤ debyeBounds[k], ν ≥ 25).
            if k > 0 && scale * debyeBounds[k] < 1e-17 { break }
            // Horner for U_k(p) and U_k'(p).
            var v = 0.0, dv = 0.0
            for c in coefficients.reversed() {
                dv = dv * p + v
                v = v * p + c
            }
            u += v * scale
            du += dv * scale
            scale /= nu
        }
        let logI = s + nu * Double.log(kappa / (nu + s)) - 0.5 * Double.log(2 * Double.pi * s) + Double.log(u)
        let ratio = kappa / (nu + s) - kappa / (2 * s * s) - nu * kappa / (s * s * s) * du / u
        return (logI, ratio)
    }

    /// (log I_ν(κ), A_ν(κ)) for κ > 0 outside the series regime.
    static func largeArgument(_ nu: Double, _ kappa: Double) -> (logI: Double, ratio: Double) {
        if nu >= debyeOrder { return debye(nu, kappa) }
        let m = (debyeOrder - nu).rounded(.up)
        let mu = nu + m
        var (logI, r) = debye(mu, kappa)
        // r holds r_j, starting at j = μ; step down to j = ν.
        var j = mu
        while j > nu + 0.5 {
            r = 1 / (2 * j / kappa + r)
            j -= 1
            logI -= Double.log(r)
        }
        return (logI, r)
    }

    static func checkArguments(_ function: String, _ nu: Double, _ kappa: Double) {
        precondition(!(nu < 0), "\(function): order \(nu) is negative")
        precondition(!(kappa < 0), "\(function): κ = \(kappa) is negative")
    }

    static func logI(_ nu: Double, _ kappa: Double) -> Double {
        checkArguments("logBesselI", nu, kappa)
        if kappa.isNaN || nu.isNaN { return .nan }
        if kappa == 0 { return nu == 0 ? 0 : -.infinity }
        if kappa == .infinity { return .infinity }
        if inSeriesRegime(nu, kappa) {
            return nu * Double.log(kappa / 2) - Double.logGamma(nu + 1) + logSeries(nu, kappa)
        }
        return largeArgument(nu, kappa).logI
    }

    static func ratio(_ nu: Double, _ kappa: Double) -> Double {
        checkArguments("besselRatio", nu, kappa)
        if kappa.isNaN || nu.isNaN { return .nan }
        if kappa == 0 { return 0 }
        if kappa == .infinity { return 1 }
        if inSeriesRegime(nu, kappa) {
            return kappa / (2 * (nu + 1)) * Double.exp(logSeries(nu + 1, kappa) - logSeries(nu, kappa))
        }
        return largeArgument(nu, kappa).ratio
    }

    static func checkDimension(_ function: String, _ p: Int) {
        precondition(p >= 2, "\(function): dimension \(p) is below 2")
    }

    /// log C_p(κ), exact.
    static func logCp(_ p: Int, _ kappa: Double) -> Double {
        let nu = Double(p) / 2 - 1
        checkArguments("vmfLogNormalizer", nu, kappa)
        if kappa.isNaN { return .nan }
        let half = Double(p) / 2 * Double.log(2 * Double.pi)
        if inSeriesRegime(nu, kappa) {
            // ν log κ − log I_ν(κ) = ν log 2 + log Γ(ν + 1) − log S, without cancellation.
            return nu * Double.log(2) + Double.logGamma(nu + 1) - half - logSeries(nu, kappa)
        }
        if kappa == .infinity { return -.infinity }
        return nu * Double.log(kappa) - half - largeArgument(nu, kappa).logI
    }

    /// The paper's large-ν approximation of log C_p(κ), with the constant of the Debye
    /// expansion's leading term so that it also approximates the value:
    /// ν log(ν + s) − s + ¼ log(ν² + κ²) − ((p − 1)/2) log 2π.
    static func logCpApproximate(_ p: Int, _ kappa: Double) -> (value: Double, derivative: Double) {
        let nu = Double(p) / 2 - 1
        checkArguments("vmfLogNormalizer", nu, kappa)
        let s2 = nu * nu + kappa * kappa, s = s2.squareRoot()
        let value = nu * Double.log(nu + s) - s + 0.25 * Double.log(s2) - (Double(p) - 1) / 2 * Double.log(2 * Double.pi)
        return (value, -kappa / (nu + s) + kappa / (2 * s2))
    }
}

// MARK: Public scalar functions

/// log I_ν(κ), the logarithm of the modified Bessel function of the first kind, for any
/// real order ν ≥ 0 and κ ≥ 0 (log I_0(0) = 0; log I_ν(0) = −∞ for ν > 0). Finite wherever
/// the logarithm is representable: κ up to 10⁶ and beyond, ν up to 2,048 and beyond.
public func logBesselI(order nu: Double, _ kappa: Double) -> Double { Bessel.logI(nu, kappa) }

/// A_ν(κ) = I_{ν+1}(κ)/I_ν(κ), in [0, 1), evaluated without forming either function.
public func besselRatio(order nu: Double, _ kappa: Double) -> Double { Bessel.ratio(nu, kappa) }

/// How ``vmfLogNormalizer(dimension:kappa:approximation:)`` evaluates log C_p(κ).
public enum VMFNormalizerApproximation: Sendable {
    /// ν log κ − (p/2) log 2π − log I_ν(κ), with the log-space Bessel function.
    case exact
    /// The paper's uniform-asymptotic (large ν) form ν log(ν + s) − s + ¼ log(ν² + κ²) − ((p−1)/2) log 2π,
    /// s = √(ν² + κ²); the constant is the same for every component and cancels in a softmax.
    case largeOrder
}

/// The logarithm of the von Mises-Fisher normalizer on S^{p−1},
/// C_p(κ) = κ^{p/2−1} / ((2π)^{p/2} I_{p/2−1}(κ)), for p ≥ 2 and κ ≥ 0.
public func vmfLogNormalizer(dimension p: Int, kappa: Double,
                             approximation: VMFNormalizerApproximation = .largeOrder) -> Double {
    Bessel.checkDimension("vmfLogNormalizer", p)
    switch approximation {
    case .exact: return Bessel.logCp(p, kappa)
    case .largeOrder: return Bessel.logCpApproximate(p, kappa).value
    }
}

/// d/dκ log C_p(κ): −A_{p/2−1}(κ) for the exact form, −κ/(ν + s) + κ/(2s²) for the approximation.
public func vmfLogNormalizerDerivative(dimension p: Int, kappa: Double,
                                       approximation: VMFNormalizerApproximation = .largeOrder) -> Double {
    Bessel.checkDimension("vmfLogNormalizer", p)
    switch approximation {
    case .exact: return -Bessel.ratio(Double(p) / 2 - 1, kappa)
    case .largeOrder: return Bessel.logCpApproximate(p, kappa).derivative
    }
}

// MARK: Differentiable tensor forms

extension Tensor {
    /// Applies `value` elementwise (evaluated in Float64) and records the VJP g·`derivative`,
    /// through the public custom-op mechanism.
    func specialFunction<V: ScalarMap, D: ScalarMap>(_ name: String, value: V, derivative: D) -> Tensor {
        Tensor.custom(name, [self], forward: { t in t[0].mapDouble(value) },
                      vjp: { g, t, _ in [g * t[0].mapDouble(derivative)] })
    }

    func specialFunction(_ name: String, value: @escaping (Double) -> Double,
                         derivative: @escaping (Double) -> Double) -> Tensor {
        specialFunction(name, value: ClosureMap(f: value), derivative: ClosureMap(f: derivative))
    }

    /// A new tensor with `f` applied to every element in Float64, split over cores
    /// (specialized per map type, so a small map is inlined into the loop).
    func mapDouble<F: ScalarMap>(_ f: F) -> Tensor {
        let x = contiguousData()
        let out = Tensor(uninitialized: shape, dtype: dtype)
        let n = count
        switch dtype {
        case .float32:
            let px = x.pointer(Float.self), po = out.pointer(Float.self)
            Parallel.forEach(n, costPerItem: 64) { r in for i in r { po[i] = Float(f(Double(px[i]))) } }
        case .float64:
            let px = x.pointer(Double.self), po = out.pointer(Double.self)
            Parallel.forEach(n, costPerItem: 64) { r in for i in r { po[i] = f(px[i]) } }
        }
        return out
    }

    /// log I_ν(κ) of every element κ; differentiable: d/dκ = A_ν(κ) + ν/κ.
    public func logBesselI(order nu: Double) -> Tensor {
        specialFunction("logBesselI", value: { Bessel.logI(nu, $0) },
                        derivative: { k in k == 0 ? (nu == 0 ? 0 : .infinity) : Bessel.ratio(nu, k) + nu / k })
    }

    /// A_ν(κ) = I_{ν+1}(κ)/I_ν(κ) of every element; differentiable:
    /// dA/dκ = 1 − A² − (2ν + 1)A/κ.
    public func besselRatio(order nu: Double) -> Tensor {
        specialFunction("besselRatio", value: { Bessel.ratio(nu, $0) }, derivative: { k in
            if k == 0 { return 1 / (2 * (nu + 1)) }
            let a = Bessel.ratio(nu, k)
            return 1 - a * a - (2 * nu + 1) * a / k
        })
    }

    /// log C_p(κ) of every element κ (see ``vmfLogNormalizer(dimension:kappa:approximation:)``);
    /// differentiable: d/dκ = −A_{p/2−1}(κ) exactly, or the approximation's own derivative.
    public func vmfLogNormalizer(dimension p: Int, approximation: VMFNormalizerApproximation = .largeOrder) -> Tensor {
        Bessel.checkDimension("vmfLogNormalizer", p)
        switch approximation {
        case .exact:
            return specialFunction("vmfLogNormalizer", value: { Bessel.logCp(p, $0) },
                                   derivative: { -Bessel.ratio(Double(p) / 2 - 1, $0) })
        case .largeOrder:
            if dtype == .float32 && p >= 4 { return approximateLogCpFloat32(p) }
            return specialFunction("vmfLogNormalizerApprox", value: ApproximateLogCp(p: p),
                                   derivative: ApproximateLogCpDerivative(p: p))
        }
    }
}

/// A scalar function of a Float64, applied elementwise by `mapDouble`.
protocol ScalarMap {
    func callAsFunction(_ x: Double) -> Double
}

struct ClosureMap: ScalarMap {
    let f: (Double) -> Double
    func callAsFunction(_ x: Double) -> Double { f(x) }
}

/// The approximate log C_p(κ), inlined into the tensor loop.
struct ApproximateLogCp: ScalarMap {
    let nu: Double, c: Double
    init(p: Int) {
        nu = Double(p) / 2 - 1
        c = (Double(p) - 1) / 2 * Double.log(2 * Double.pi)
    }
    @inline(__always) func callAsFunction(_ kappa: Double) -> Double {
        precondition(!(kappa < 0), "vmfLogNormalizer: κ = \(kappa) is negative")
        let s2 = nu * nu + kappa * kappa, s = s2.squareRoot()
        return nu * Double.log(nu + s) - s + 0.25 * Double.log(s2) - c
    }
}

/// Its derivative −κ/(ν + s) + κ/(2s²).
struct ApproximateLogCpDerivative: ScalarMap {
    let nu: Double
    init(p: Int) { nu = Double(p) / 2 - 1 }
    @inline(__always) func callAsFunction(_ kappa: Double) -> Double {
        let s2 = nu * nu + kappa * kappa, s = s2.squareRoot()
        return -kappa / (nu + s) + kappa / (2 * s2)
    }
}

extension Tensor {
    /// The large-order log C_p of a Float32 tensor in one C kernel pass (vectorized; Float64
    /// runs the Float64 form above): within a few ulp of the Float64 value rounded to Float32
    /// (tested), for p ≥ 4 (ν ≥ 1, so no logarithm of a number below 1).
    fileprivate func approximateLogCpFloat32(_ p: Int) -> Tensor {
        let nu = Float(Double(p) / 2 - 1), c = Float((Double(p) - 1) / 2 * Double.log(2 * Double.pi))
        return Tensor.custom("vmfLogNormalizerApprox", [self], forward: { t in
            let x = t[0].contiguousData()
            let out = Tensor(uninitialized: x.shape, dtype: .float32)
            let px = x.pointer(Float.self), po = out.pointer(Float.self)
            var negative = 0
            withExtendedLifetime(x) {
                negative = kappa_vmf_logcp_approx_f32(px, po, x.count, nu, c)
            }
            precondition(negative == 0, "vmfLogNormalizer: \(negative) of the \(x.count) values of κ are negative")
            return out
        }, vjp: { g, t, _ in
            let x = t[0].contiguousData(), gc = g.contiguousData()
            let gk = Tensor(uninitialized: x.shape, dtype: .float32)
            withExtendedLifetime((x, gc)) {
                kappa_vmf_logcp_approx_backward_f32(gc.pointer(Float.self), x.pointer(Float.self), gk.pointer(Float.self), x.count, nu)
            }
            return [gk]
        })
    }
}
