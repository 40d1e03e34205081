/// e^x for Float in a form the compiler vectorizes: Cody–Waite range reduction
/// x = k·ln 2 + r, |r| ≤ ln2/2, with k rounded by the magic-number trick (add and subtract
/// 1.5·2²³, read k from the bits; a checked `Int32(_:)` conversion would block
/// vectorization), Cephes' degree-7 polynomial for e^r, and 2^k built in the exponent bits.
/// Relative error ≤ 2 ulp on [−87.3, 88.7] (checked in the tests); 0 below, +∞ above, NaN
/// propagates. Used by the Float32 softmax kernels.
@inline(__always)
func fastExp(_ x: Float) -> Float {
    let xc = Swift.min(Swift.max(x, -87.3), 88.7)
    let magic: Float = 12582912  // 1.5·2²³
    let t = xc * 1.442695041 + magic
    let k = t - magic
    let bits = Int32(bitPattern: t.bitPattern) &- 0x4B40_0000
    let r = (xc - k * 0.693359375) + k * 2.12194440e-4
    let z = r * r
    var p: Float = 1.9875691500e-4
    p = p * r + 1.3981999507e-3
    p = p * r + 8.3334519073e-3
    p = p * r + 4.1665795894e-2
    p = p * r + 1.6666665459e-1
    p = p * r + 5.0000001201e-1
    p = p * z + r + 1
    // 2^k split in two factors so that k = 128 (x near 88.7) does not overflow the exponent.
    let half = bits >> 1
    let s1 = Float(bitPattern: UInt32(bitPattern: (half &+ 127) << 23))
    let s2 = Float(bitPattern: UInt32(bitPattern: (bits &- half &+ 127) << 23))
    let y = p * s1 * s2
    return x < -87.3 ? 0 : (x > 88.7 ? .infinity : (x.isNaN ? x : y))
}

/// e^x: the vectorizable ``fastExp(_:)`` for Float, the libm function for Double.
@inline(__always)
func kernelExp<T: TensorScalar>(_ x: T) -> T {
    if T.self == Float.self { return unsafeBitCast(fastExp(unsafeBitCast(x, to: Float.self)), to: T.self) }
    return T.exp(x)
}

/// Φ(x), the standard normal CDF, for Float in a vectorizable form: Φ(x) = erfc(−x/√2)/2
/// with the Chebyshev-fitted erfc of Numerical Recipes (`erfcc`: fractional error below
/// 1.2·10⁻⁷ for every argument, so Φ keeps its relative accuracy deep in the lower tail,
/// where 1 + erf(x/√2) would cancel) and ``fastExp(_:)``. Used by the Float32 GELU.
@inline(__always)
func fastNormalCDF(_ x: Float) -> Float {
    let z = -x * 0.70710678118654752440
    let a = Swift.abs(z)
    let t = 1 / (1 + 0.5 * a)
    var p: Float = 0.17087277
    p = p * t - 0.82215223
    p = p * t + 1.48851587
    p = p * t - 1.13520398
    p = p * t + 0.27886807
    p = p * t - 0.18628806
    p = p * t + 0.09678418
    p = p * t + 0.37409196
    p = p * t + 1.00002368
    p = p * t - 1.26551223
    let erfcAbs = t * fastExp(-a * a + p)
    let erfc = z >= 0 ? erfcAbs : 2 - erfcAbs
    return x.isNaN ? x : erfc * 0.5
}

/// The standard normal density φ(x) = e^{−x²/2}/√(2π) with ``fastExp(_:)``.
@inline(__always)
func fastNormalPDF(_ x: Float) -> Float { fastExp(-0.5 * x * x) * 0.39894228040143267794 }
