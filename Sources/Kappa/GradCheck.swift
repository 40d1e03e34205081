import Foundation

/// Gradient checking by finite differences, with PyTorch's `gradcheck` defaults: Float64
/// only, central differences with eps 1e-6, and an element passes when
/// |analytic − numeric| ≤ atol + rtol·|numeric| with atol 1e-5, rtol 1e-3.

/// How thoroughly ``gradcheck(_:eps:atol:rtol:mode:seed:_:)`` compares derivatives.
public enum GradcheckMode: Sendable {
    /// Every entry of every Jacobian: one backward pass per output element and two
    /// evaluations per input element.
    case full
    /// One random projection vᵀJu per (output, input) pair: two evaluations and one
    /// backward pass per pair; catches almost every wrong VJP at a fraction of the cost.
    case fast
}

/// What ``gradcheck(_:eps:atol:rtol:mode:seed:_:)`` found.
public struct GradcheckReport: CustomStringConvertible, Sendable {
    /// The comparison of one output with one input.
    public struct Entry: Sendable {
        /// The output's position among the function's outputs.
        public let output: Int
        /// The input's position among the checked inputs.
        public let input: Int
        /// The largest |analytic − numeric| over the Jacobian's entries (or of the projection in fast mode).
        public let maxAbsoluteError: Double
        /// The largest |analytic − numeric| / |numeric| over the entries with numeric ≠ 0.
        public let maxRelativeError: Double
        /// Where the worst entry was: the input element's and the output element's multi-index
        /// (empty in fast mode).
        public let inputIndex: [Int]
        /// (See ``inputIndex``.)
        public let outputIndex: [Int]
        /// The worst entry's value from backward.
        public let analytic: Double
        /// The worst entry's value from central differences.
        public let numeric: Double
        /// Whether every entry is within atol + rtol·|numeric|.
        public let passed: Bool
    }

    /// Full Jacobians or random projections.
    public let mode: GradcheckMode
    /// One comparison per (output, input) pair.
    public let entries: [Entry]
    /// Failures of the extra checks: a zero output gradient must give zero input gradients,
    /// and backward must be repeatable bit for bit.
    public let problems: [String]

    /// Whether every comparison and every extra check passed.
    public var passed: Bool { problems.isEmpty && entries.allSatisfy(\.passed) }

    /// The failing entries.
    public var failures: [Entry] { entries.filter { !$0.passed } }

    public var description: String {
        var lines = ["gradcheck \(passed ? "passed" : "FAILED") (\(mode == .full ? "full Jacobian" : "fast vᵀJu"))"]
        for e in entries {
            var at = ""
            if !e.inputIndex.isEmpty || !e.outputIndex.isEmpty { at = " at input \(e.inputIndex), output \(e.outputIndex)" }
            lines.append("  \(e.passed ? "ok  " : "FAIL") output \(e.output), input \(e.input): max abs error \(fmt(e.maxAbsoluteError))"
                         + "\(at) (analytic \(fmt(e.analytic)), numeric \(fmt(e.numeric))), max rel error \(fmt(e.maxRelativeError))")
        }
        for p in problems { lines.append("  FAIL \(p)") }
        return lines.joined(separator: "\n")
    }

    private func fmt(_ x: Double) -> String {
        x == 0 ? "0" : String(format: "%.3g", x)
    }
}

/// Compares the VJPs that `f` records with central finite differences at `inputs`, which
/// must be Float64. Inputs keep their layout (a transposed or sliced input stays one), are
/// perturbed in place and restored bit for bit. An input that is a leaf requiring gradients
/// (a layer's parameter) is differentiated as it is, so `f` may use the layer directly;
/// its `grad` is cleared afterwards. Returns the worst absolute and relative
/// error per (output, input) with where it occurred; print the report to read it.
///
/// ```swift
/// let report = gradcheck([x, w]) { t in (t[0].matmul(t[1])).tanh().sum(alongAxis: 1) }
/// ```
public func gradcheck(_ inputs: [Tensor], eps: Double = 1e-6, atol: Double = 1e-5, rtol: Double = 1e-3,
                      mode: GradcheckMode = .full, seed: UInt64 = 0,
                      _ f: ([Tensor]) -> Tensor) -> GradcheckReport {
    gradcheck(inputs, eps: eps, atol: atol, rtol: rtol, mode: mode, seed: seed, outputs: { [f($0)] })
}

/// ``gradcheck(_:eps:atol:rtol:mode:seed:_:)`` for a function with several outputs.
public func gradcheck(_ inputs: [Tensor], eps: Double = 1e-6, atol: Double = 1e-5, rtol: Double = 1e-3,
                      mode: GradcheckMode = .full, seed: UInt64 = 0,
                      outputs f: ([Tensor]) -> [Tensor]) -> GradcheckReport {
    for (j, x) in inputs.enumerated() {
        precondition(x.dtype == .float64, "gradcheck: input \(j) is \(x.dtype); gradients are checked in float64")
        precondition(zip(x.shape, x.strides).allSatisfy { $0.0 <= 1 || $0.1 != 0 },
                     "gradcheck: input \(j) of shape \(x.shape) is an expanded view; pass a dense tensor")
    }
    // A leaf that already requires gradients (a module's parameter) is used as it is, so
    // that a layer can be checked with respect to its own weights; its grad is cleared.
    let leaves = inputs.map { $0.isLeaf && $0.requiresGrad ? $0 : $0.detached().requiringGrad() }
    let positions = leaves.map { elementOffsets($0) }
    let raw = leaves.map { $0.storage.pointer.assumingMemoryBound(to: Double.self) }

    func evaluate() -> [[Double]] {
        withoutGradients { f(leaves).map { $0.to(.float64).scalars(as: Double.self) } }
    }
    /// (f(x + eps·u) − f(x − eps·u)) / 2eps for input j, where u is one-hot at `element`
    /// or the direction `direction`.
    func difference(_ j: Int, element: Int?, direction: [Double]?) -> [[Double]] {
        let offs = element.map { [positions[j][$0]] } ?? positions[j]
        let dir = direction ?? [1]
        let saved = offs.map { raw[j][$0] }
        for (k, o) in offs.enumerated() { raw[j][o] = saved[k] + eps * dir[k] }
        let plus = evaluate()
        for (k, o) in offs.enumerated() { raw[j][o] = saved[k] - eps * dir[k] }
        let minus = evaluate()
        for (k, o) in offs.enumerated() { raw[j][o] = saved[k] }
        return zip(plus, minus).map { p, m in zip(p, m).map { ($0 - $1) / (2 * eps) } }
    }

    let outs = f(leaves)
    /// Input gradients for output `o` with output gradient `v`.
    func vjp(_ o: Int, _ v: [Double]) -> [[Double]] {
        for l in leaves { l.zeroGrad() }
        let y = outs[o]
        if y._requiresGrad {
            y.backward(Tensor(v, shape: y.shape, dtype: y.dtype), retainGraph: true)
        }
        return leaves.map { $0.grad?.scalars(as: Double.self) ?? [Double](repeating: 0, count: $0.count) }
    }

    var entries: [GradcheckReport.Entry] = []
    var problems: [String] = []
    var rng = RandomGenerator(seed: seed)
    func close(_ a: Double, _ n: Double) -> Bool { Swift.abs(a - n) <= atol + rtol * Swift.abs(n) }

    switch mode {
    case .full:
        // numeric[j][e][o] = column e of the Jacobian of output o with respect to input j.
        let numeric = (0..<leaves.count).map { j in (0..<leaves[j].count).map { difference(j, element: $0, direction: nil) } }
        for o in 0..<outs.count {
            let n = outs[o].count
            var analytic = [[[Double]]](repeating: [], count: n)  // [out element][input][element]
            for i in 0..<n {
                var v = [Double](repeating: 0, count: n)
                v[i] = 1
                analytic[i] = vjp(o, v)
            }
            for j in 0..<leaves.count {
                var worst = (abs: 0.0, rel: 0.0, e: 0, i: 0), passed = true
                var worstFail: (e: Int, i: Int)?
                for e in 0..<leaves[j].count {
                    for i in 0..<n {
                        let a = analytic[i][j][e], nu = numeric[j][e][o][i]
                        let err = Swift.abs(a - nu)
                        if !(err <= worst.abs) { worst.abs = err; worst.e = e; worst.i = i }
                        if nu != 0 { worst.rel = Swift.max(worst.rel, err / Swift.abs(nu)) }
                        if !close(a, nu) || a.isNaN != nu.isNaN {
                            passed = false
                            if worstFail == nil { worstFail = (e, i) }
                        }
                    }
                }
                let (e, i) = worstFail ?? (worst.e, worst.i)
                let hasElements = leaves[j].count > 0 && n > 0
                entries.append(.init(output: o, input: j, maxAbsoluteError: worst.abs, maxRelativeError: worst.rel,
                                     inputIndex: hasElements ? multiIndex(e, leaves[j].shape) : [],
                                     outputIndex: hasElements ? multiIndex(i, outs[o].shape) : [],
                                     analytic: hasElements ? analytic[i][j][e] : 0,
                                     numeric: hasElements ? numeric[j][e][o][i] : 0, passed: passed))
            }
        }
    case .fast:
        let us = leaves.map { l in (0..<l.count).map { _ in rng.nextNormal() } }
        let numeric = (0..<leaves.count).map { difference($0, element: nil, direction: us[$0]) }
        for o in 0..<outs.count {
            let v = (0..<outs[o].count).map { _ in rng.nextNormal() }
            let g = vjp(o, v)
            for j in 0..<leaves.count {
                let a = zip(g[j], us[j]).reduce(0) { $0 + $1.0 * $1.1 }
                let nu = zip(numeric[j][o], v).reduce(0) { $0 + $1.0 * $1.1 }
                let err = Swift.abs(a - nu)
                entries.append(.init(output: o, input: j, maxAbsoluteError: err,
                                     maxRelativeError: nu != 0 ? err / Swift.abs(nu) : 0,
                                     inputIndex: [], outputIndex: [], analytic: a, numeric: nu,
                                     passed: close(a, nu) && a.isNaN == nu.isNaN))
            }
        }
    }

    // Extra checks: zero in, zero out; and backward twice gives the same bits.
    for o in 0..<outs.count where outs[o]._requiresGrad {
        let zero = vjp(o, [Double](repeating: 0, count: outs[o].count))
        for j in 0..<leaves.count where zero[j].contains(where: { $0 != 0 }) {
            problems.append("output \(o), input \(j): a zero output gradient gave a nonzero input gradient")
        }
        let v = (0..<outs[o].count).map { _ in rng.nextNormal() }
        let first = vjp(o, v), second = vjp(o, v)
        for j in 0..<leaves.count where first[j] != second[j] && !first[j].contains(where: \.isNaN) {
            problems.append("output \(o), input \(j): backward is not repeatable (two runs gave different gradients)")
        }
    }
    for l in leaves { l.zeroGrad() }
    return GradcheckReport(mode: mode, entries: entries, problems: problems)
}

/// The storage offset of each element of `t`, in row-major order of its shape.
private func elementOffsets(_ t: Tensor) -> [Int] {
    var out: [Int] = []
    out.reserveCapacity(t.count)
    for k in 0..<t.count {
        out.append(t.offset + zip(multiIndex(k, t.shape), t.strides).reduce(0) { $0 + $1.0 * $1.1 })
    }
    return out
}

func multiIndex(_ linear: Int, _ shape: [Int]) -> [Int] {
    var rem = linear
    var idx = [Int](repeating: 0, count: shape.count)
    for d in stride(from: shape.count - 1, through: 0, by: -1) where shape[d] > 0 {
        idx[d] = rem % shape[d]
        rem /= shape[d]
    }
    return idx
}
