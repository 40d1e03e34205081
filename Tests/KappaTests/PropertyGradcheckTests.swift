import Foundation
import Kappa
import PropertyBased
import Testing

/// Randomized gradient checking (OpInfo-style): random shapes, broadcast patterns,
/// non-contiguous layouts and random chains of two to four ops, each gradchecked in Float64.
///
/// CI draws `KAPPA_PROPERTY_COUNT` (default 300) cases from a fixed seed, so a run is
/// reproducible. `KAPPA_PROPERTY_RANDOM=N swift test -c release --filter PropertyGradcheck`
/// runs N cases from a fresh seed through `propertyCheck`, which shrinks a failing case and
/// prints the seed that replays it.
@Suite("Randomized gradcheck of op compositions")
struct PropertyGradcheckTests {
    /// One random program: input shape, the ops applied in order, the layout of the first
    /// input, which dimensions of the second input broadcast, and the seed of the values.
    struct Composition: CustomStringConvertible, Sendable {
        let shape: [Int], ops: [Int], layout: Int, broadcast: Int, seed: Int

        var description: String {
            let layouts = ["contiguous", "transposed view", "strided slice (step 2)"]
            return "shape \(shape), \(layouts[layout]), broadcast mask \(broadcast), seed \(seed): "
                + ops.map { PropertyGradcheckTests.ops[$0].name }.joined(separator: " → ")
        }

        /// The second operand's shape: dims of the mask broadcast (size 1); bit 2 also drops
        /// the leading dimension (rank broadcasting).
        var secondShape: [Int] {
            var s = shape.enumerated().map { broadcast & (1 << ($0.offset % 2)) != 0 ? 1 : $0.element }
            if broadcast & 4 != 0 && s.count > 1 { s.removeFirst() }
            return s
        }

        /// Dense inputs [x, y, w]: x as stored (transposed or wider when the layout asks).
        func inputs() -> [Tensor] {
            var g = RandomGenerator(seed: UInt64(seed))
            var stored = shape
            if layout == 1 && shape.count >= 2 { stored.swapAt(shape.count - 1, shape.count - 2) }
            if layout == 2 { stored[stored.count - 1] *= 2 }
            let n = shape[shape.count - 1]
            return [Tensor.randomNormal(stored, dtype: .float64, using: &g),
                    Tensor.randomNormal(secondShape, dtype: .float64, using: &g),
                    Tensor.randomNormal([n, n], dtype: .float64, using: &g) * (1 / Double(n).squareRoot())]
        }

        /// The program on the inputs, starting from the non-contiguous view of x.
        func run(_ t: [Tensor]) -> Tensor {
            var x = t[0]
            if layout == 1 && shape.count >= 2 { x = x.transposed() }
            if layout == 2 { x = x.slice(alongAxis: x.rank - 1, from: 0, to: x.shape[x.rank - 1], by: 2) }
            for op in ops { x = PropertyGradcheckTests.ops[op].apply(x, t[1], t[2]) }
            return x
        }
    }

    struct Op: Sendable {
        let name: String
        let apply: @Sendable (Tensor, Tensor, Tensor) -> Tensor
        init(_ name: String, _ apply: @escaping @Sendable (Tensor, Tensor, Tensor) -> Tensor) { (self.name, self.apply) = (name, apply) }
    }

    /// Ops that keep the shape (reductions come back through a broadcast), smooth at the
    /// drawn values (abs and relu have a kink only at 0).
    static let ops: [Op] = [
        Op("exp(t/2)") { t, _, _ in (t * 0.5).exp() },
        Op("tanh") { t, _, _ in t.tanh() },
        Op("sigmoid") { t, _, _ in t.sigmoid() },
        Op("gelu") { t, _, _ in t.gelu() },
        Op("softplus") { t, _, _ in t.softplus() },
        Op("sin") { t, _, _ in t.sin() },
        Op("t·t") { t, _, _ in t * t },
        Op("log(t²+1)") { t, _, _ in (t * t + 1).log() },
        Op("sqrt(t²+1)") { t, _, _ in (t * t + 1).sqrt() },
        Op("abs") { t, _, _ in t.abs() },
        Op("relu") { t, _, _ in t.relu() },
        Op("pow 3") { t, _, _ in t.pow(3) },
        Op("t + y") { t, y, _ in t + y },
        Op("t · y") { t, y, _ in t * y },
        Op("t / (y²+1)") { t, y, _ in t / (y * y + 1) },
        Op("y − t") { t, y, _ in y - t },
        Op("softmax(last)") { t, _, _ in t.softmax(alongAxis: t.rank - 1) },
        Op("logSoftmax(last)") { t, _, _ in t.logSoftmax(alongAxis: t.rank - 1) },
        Op("t − logSumExp(last)") { t, _, _ in t - t.logSumExp(alongAxes: [t.rank - 1], keepingDims: true) },
        Op("t + mean(first)") { t, _, _ in t + t.mean(alongAxis: 0, keepingDims: true) },
        Op("t · max(last)") { t, _, _ in t * t.max(alongAxis: t.rank - 1, keepingDims: true) },
        Op("t + sum()") { t, _, _ in t + t.sum() },
        Op("l2Normalized(last)") { t, _, _ in t.l2Normalized(alongAxis: t.rank - 1) },
        Op("t / (‖t‖+1)") { t, _, _ in t / (t.norm() + 1) },
        Op("t · std(all)") { t, _, _ in t.count > 1 ? t * t.standardDeviation() : t * 2 },
        Op("layerNorm(last)") { t, _, _ in t.shape[t.rank - 1] > 1 ? t.layerNorm(weight: nil, bias: nil) : t + 1 },
        Op("t @ w") { t, _, w in t.rank >= 2 ? t.matmul(w) : t.unsqueezed(axis: 0).matmul(w).squeezed(axis: 0) },
        Op("tanh(tᵀ)ᵀ") { t, _, _ in t.rank >= 2 ? t.transposed().tanh().transposed() : t.tanh() },
        Op("permute(reversed) · 2, back") { t, _, _ in
            let p = Array((0..<t.rank).reversed())
            return (t.permuted(p) * 2).permuted(p)
        },
        Op("t[::2] ⊕ t[1::2] (last)") { t, _, _ in
            let n = t.shape[t.rank - 1]
            guard n >= 2 else { return t * 3 }
            let even = t.slice(alongAxis: t.rank - 1, from: 0, to: n, by: 2)
            let odd = t.slice(alongAxis: t.rank - 1, from: 1, to: n, by: 2)
            return Tensor.concat([even.sin(), odd * odd], alongAxis: t.rank - 1)
        },
    ]

    /// The generator of compositions, from swift-property-based's generators.
    static let compositions = zip(Gen.int(in: 1...4).array(of: 1...3), Gen.int(in: 0...(ops.count - 1)).array(of: 2...4),
                                  Gen.int(in: 0...2), Gen.int(in: 0...7), Gen.int(in: 0...1_000_000))
        .map { Composition(shape: $0, ops: $1, layout: $2, broadcast: $3, seed: $4) }

    /// The gradcheck of a composition, or nil when its values leave the range where central
    /// differences in Float64 resolve the tolerance (|value| > 1e4: the rounding error of a
    /// difference quotient is about |value|·1e-10 at eps = 1e-6) or are not finite (exp of
    /// exp of a cube): such programs are drawn again.
    static func check(_ c: Composition) -> GradcheckReport? {
        let inputs = c.inputs()
        let values = withoutGradients { c.run(inputs) }.scalars(as: Double.self)
        guard values.allSatisfy({ $0.isFinite && abs($0) <= 1e4 }) else { return nil }
        return gradcheck(inputs, atol: 1e-5, rtol: 1e-3) { c.run($0) }
    }

    static var count: Int { ProcessInfo.processInfo.environment["KAPPA_PROPERTY_COUNT"].flatMap(Int.init) ?? 300 }

    @Test("compositions from a fixed seed (KAPPA_PROPERTY_COUNT, default 300)")
    func fixedSeed() {
        var rng = Xoshiro(seed: (0x4B41_5050_41, 0x9E37_79B9, 0xD1B5_4A32_D192_ED03, 7))
        var ops = Set<Int>(), failures = 0, checked = 0, overflowed = 0
        defer { print("randomized gradcheck: \(checked) compositions checked, \(overflowed) out of range drawn again") }
        while checked < Self.count {
            let c = Self.compositions.run(using: &rng)
            guard let report = Self.check(c) else { overflowed += 1; continue }
            checked += 1
            ops.formUnion(c.ops)
            if !report.passed {
                failures += 1
                Issue.record("\(c)\n\(report)")
            }
            if failures >= 5 { break }
        }
        if Self.count >= 300 { #expect(ops.count == Self.ops.count, "cases covered \(ops.count) of \(Self.ops.count) ops") }
        #expect(overflowed * 4 < checked, "\(overflowed) out-of-range cases for \(checked) checked")
    }

    @Test("compositions from a fresh seed, shrunk on failure (KAPPA_PROPERTY_RANDOM=N)",
          .enabled(if: ProcessInfo.processInfo.environment["KAPPA_PROPERTY_RANDOM"] != nil))
    func freshSeed() async {
        let n = ProcessInfo.processInfo.environment["KAPPA_PROPERTY_RANDOM"].flatMap(Int.init) ?? 1000
        await propertyCheck(count: n, input: Self.compositions) { c in
            if let report = Self.check(c) { #expect(report.passed, "\(c)\n\(report)") }
        }
    }

    /// Failures the randomized checks found, kept as regression tests.
    @Test("regressions found by the randomized checks")
    func regressions() {
        // The standard deviation of a constant had a NaN gradient (√ at 0); now 0, as norm's.
        let constantStd = Composition(shape: [3, 1], ops: [22, 9, 11, 24], layout: 2, broadcast: 4, seed: 472572)
        let report = Self.check(constantStd)
        #expect(report?.passed == true, "\(constantStd)\n\(report.map(String.init(describing:)) ?? "out of range")")
        // Values near 1e8 made the difference quotients noisier than the tolerance (a test
        // artefact, not an op bug): such cases are now drawn again.
        #expect(Self.check(Composition(shape: [2, 3], ops: [11, 6, 24, 20], layout: 0, broadcast: 0, seed: 0)) == nil)
    }
}
