import RealModule

/// The one seeded random number generator of Kappa: xoshiro256** (Blackman and Vigna),
/// seeded through SplitMix64. The same seed gives the same stream, and so bit-identical
/// tensors, on every run and machine. A value type: copy it to fork a stream, save
/// ``state`` to resume one.
public struct RandomGenerator: RandomNumberGenerator, Sendable, Equatable {
    /// The four words of generator state; ``init(state:)`` resumes from them.
    public private(set) var state: (UInt64, UInt64, UInt64, UInt64)

    public static func == (a: RandomGenerator, b: RandomGenerator) -> Bool {
        a.state == b.state
    }

    /// A generator whose stream is determined by `seed`.
    public init(seed: UInt64) {
        var z = seed
        func splitMix() -> UInt64 {
            z &+= 0x9E37_79B9_7F4A_7C15
            var x = z
            x = (x ^ (x >> 30)) &* 0xBF58_476D_1CE4_E5B9
            x = (x ^ (x >> 27)) &* 0x94D0_49BB_1331_11EB
            return x ^ (x >> 31)
        }
        state = (splitMix(), splitMix(), splitMix(), splitMix())
    }

    /// A generator resumed from a saved ``state``.
    public init(state: (UInt64, UInt64, UInt64, UInt64)) {
        precondition(state != (0, 0, 0, 0), "RandomGenerator: the all-zero state is invalid")
        self.state = state
    }

    @inline(__always)
    private static func rotl(_ x: UInt64, _ k: UInt64) -> UInt64 { (x << k) | (x >> (64 - k)) }

    /// The next 64 random bits.
    @inline(__always)
    public mutating func next() -> UInt64 {
        let result = RandomGenerator.rotl(state.1 &* 5, 7) &* 9
        let t = state.1 << 17
        state.2 ^= state.0
        state.3 ^= state.1
        state.1 ^= state.2
        state.0 ^= state.3
        state.2 ^= t
        state.3 = RandomGenerator.rotl(state.3, 45)
        return result
    }

    /// A uniform double in [0, 1) with 53 random bits.
    @inline(__always)
    public mutating func nextUniform() -> Double {
        Double(next() >> 11) * 0x1.0p-53
    }

    /// A standard normal double (Box–Muller on two uniforms; one draw per call, so the
    /// stream does not depend on how many values the caller takes).
    @inline(__always)
    public mutating func nextNormal() -> Double {
        let u1 = 1 - nextUniform()  // in (0, 1]
        let u2 = nextUniform()
        return (-2 * Double.log(u1)).squareRoot() * Double.cos(2 * Double.pi * u2)
    }

    /// A uniform integer in `0..<bound`.
    public mutating func nextInt(below bound: Int) -> Int {
        precondition(bound > 0, "nextInt(below:): bound \(bound) is not positive")
        return Int(next(upperBound: UInt64(bound)))
    }
}
