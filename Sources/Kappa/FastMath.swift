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
