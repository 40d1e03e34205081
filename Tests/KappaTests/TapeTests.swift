import Foundation
import Kappa
import Testing

@Suite("Tape, custom ops, anomaly mode and the checker itself")
struct TapeTests {
    @Test func gradientsAccumulateAcrossBackwardCalls() {
        let x = Tensor([1.0, 2, 3]).requiringGrad()
        (x * x).sum().backward()
        #expect(x.grad!.doubles == [2, 4, 6])
        (x * 3).sum().backward()
        #expect(x.grad!.doubles == [5, 7, 9])
        x.zeroGrad()
        #expect(x.grad == nil)
        // A tensor used twice in one graph gets both contributions.
        let y = x * 2
        (y * y + y).sum().backward()
        #expect(x.grad!.doubles == [10, 18, 26])
    }

    @Test func backwardWithOutputGradient() {
        let x = Tensor([1.0, 2]).requiringGrad()
        (x.exp()).backward(Tensor([1.0, -1]))
        #expect(x.grad!.doubles == [Foundation.exp(1.0), -Foundation.exp(2.0)])
    }

    @Test func noGradientScopesAndDetach() {
        let w = Tensor([2.0]).requiringGrad()
        let t = withoutGradients { w * 3 }
        #expect(!t.requiresGrad && t.isLeaf)
        let d = (w * 3).detached()
        #expect(!d.requiresGrad)
        let y = w * d + w
        y.backward()
        #expect(w.grad!.doubles == [7])  // d/dw (6 + w) with d held constant
        let nested = withoutGradients { withGradients { w * 2 } }
        #expect(nested.requiresGrad)
    }

    @Test func graphIsReleasedAfterBackward() {
        weak var saved: Tensor?
        let x = Tensor([1.0, 2, 3]).requiringGrad()
        do {
            let y = x.exp()        // saves its output
            let z = y.sum()
            saved = y
            z.backward()
        }
        #expect(saved == nil, "intermediate tensors must be freed once the graph is gone")
        // A graph that was never differentiated is freed with its output too.
        weak var unused: Tensor?
        do {
            let y = x.exp()
            unused = y
            _ = (y * 2).sum()
        }
        #expect(unused == nil)
    }

    @Test func retainGraphAllowsSecondBackward() {
        let x = Tensor([1.0, 2]).requiringGrad()
        let y = (x * x).sum()
        y.backward(retainGraph: true)
        y.backward()
        #expect(x.grad!.doubles == [4, 8])
    }

    func cube(_ x: Tensor) -> Tensor {
        Tensor.custom("cube", [x], forward: { $0[0] * $0[0] * $0[0] },
                      vjp: { g, inputs, _ in [g * 3 * inputs[0] * inputs[0]] })
    }

    @Test func customOpIsDifferentiable() {
        let report = gradcheck([randn([4], seed: 1)]) { cube($0[0]).sin() }
        #expect(report.passed, "\(report)")
        // Custom ops compose with library ops and use the output they saved.
        let softsign = { (x: Tensor) -> Tensor in
            Tensor.custom("softsign", [x], forward: { $0[0] / (1 + $0[0].abs()) },
                          vjp: { g, inputs, _ in [g / ((1 + inputs[0].abs()) * (1 + inputs[0].abs()))] })
        }
        let r2 = gradcheck([awayFromZero([3, 2], seed: 2), randn([2], seed: 3)]) { softsign($0[0] * $0[1]).sum(alongAxis: 0) }
        #expect(r2.passed, "\(r2)")
    }

    /// sin and cos of x as one op with two outputs; the VJP reads the residuals (both outputs),
    /// not the input, and counts its calls.
    final class Calls { var vjp = 0 }
    func sinCos(_ x: Tensor, _ calls: Calls) -> (sin: Tensor, cos: Tensor) {
        let r = Tensor.custom("sinCos", [x], forward: { t in
            let (s, c) = (t[0].sin(), t[0].cos())
            return (outputs: [s, c], residuals: [s, c])
        }, vjp: { g, r in
            calls.vjp += 1
            return [g[0] * r[1] - g[1] * r[0]]
        })
        return (r[0], r[1])
    }

    @Test func customOpWithResidualsAndTwoOutputs() {
        let calls = Calls()
        // Both outputs reach the loss, with different weights and shapes downstream.
        let report = gradcheck([randn([3, 2], seed: 11)]) { t in
            let (s, c) = sinCos(t[0], calls)
            return (s * 2 + c.pow(2)).sum(alongAxis: 0)
        }
        #expect(report.passed, "\(report)")
        // Only one output used: the other's gradient arrives as zeros; the VJP runs once per backward.
        calls.vjp = 0
        let x = Tensor([0.3, -1.2, 2.0]).requiringGrad()
        sinCos(x, calls).cos.sum().backward()
        #expect(calls.vjp == 1)
        for (g, v) in zip(x.grad!.doubles, [0.3, -1.2, 2.0]) { #expect(Swift.abs(g + Foundation.sin(v)) < 1e-15) }
        // Without gradients nothing is recorded and the outputs are plain tensors.
        let off = withoutGradients { sinCos(x, calls) }
        #expect(!off.sin.requiresGrad && !off.cos.requiresGrad)
    }

    @Test func customOpResidualsAreFreedWithTheGraph() {
        // A residual that is the output itself must not keep the graph alive: the node holds
        // detached residuals, so once the output and the loss go, the input's graph is gone.
        weak var weakOutput: Tensor?
        do {
            let x = Tensor([1.0, 2]).requiringGrad()
            let y = Tensor.custom("square", [x], forward: { t in
                let y = t[0] * t[0]
                return ([y], [t[0], y])
            }, vjp: { g, r in [g[0] * 2 * r[0]] })[0]
            weakOutput = y
            y.sum().backward()
            #expect(x.grad!.doubles == [2, 4])
        }
        #expect(weakOutput == nil)
    }

    @Test func checkerCatchesAWrongVJP() {
        // y = x₀·x₁ with the gradient of x₁ deliberately wrong (x₀ + 1 instead of x₀).
        let wrong = { (a: Tensor, b: Tensor) -> Tensor in
            Tensor.custom("wrong_mul", [a, b], forward: { $0[0] * $0[1] },
                          vjp: { g, x, _ in [g * x[1], g * (x[0] + 1)] })
        }
        for mode in [GradcheckMode.full, .fast] {
            let report = gradcheck([randn([3], seed: 4), randn([3], seed: 5)], mode: mode) { wrong($0[0], $0[1]) }
            #expect(!report.passed)
            #expect(report.failures.map(\.input) == [1], "only input 1 is wrong: \(report)")
            #expect(report.description.contains("FAIL output 0, input 1"))
        }
    }

    @Test func checkerCatchesANonzeroGradientForZeroInput() {
        let leaky = { (a: Tensor) -> Tensor in
            Tensor.custom("leaky", [a], forward: { $0[0] * 2 }, vjp: { g, x, _ in [g * 2 + 1e-3] })
        }
        let report = gradcheck([randn([2], seed: 6)]) { leaky($0[0]) }
        #expect(!report.passed)
        #expect(report.problems.contains { $0.contains("zero output gradient") })
    }

    @Test func gradcheckRestoresInputs() {
        let x = randn([3, 2], seed: 7).transposed()
        let before = x.doubles
        _ = gradcheck([x]) { $0[0].exp() }
        #expect(x.doubles == before)
    }

    @Test func anomalyModeNamesTheFirstBadOp() throws {
        let x = Tensor([1.0, -1, 2]).requiringGrad()
        let error = #expect(throws: AnomalyError.self) {
            try withAnomalyDetection { (x.log() * 2).sum() }
        }
        #expect(error?.op == "log" && error?.phase == "forward" && error?.inputShapes == [[3]])
        // A backward anomaly: sqrt at 0 has an infinite derivative.
        let z = Tensor([0.0, 4]).requiringGrad()
        let back = #expect(throws: AnomalyError.self) {
            try withAnomalyDetection { z.sqrt().sum().backward() }
        }
        #expect(back?.op == "sqrt" && back?.phase == "backward")
        #expect(back?.description.contains("backward of 'sqrt'") == true)
        // Finite work passes through.
        let fine = try withAnomalyDetection { (x * x).sum().item() }
        #expect(fine == 6)
    }

    @Test("onGradientReady reports each leaf once, with its complete gradient, as soon as it is complete")
    func gradientReadyHook() {
        let x = randn([4], seed: 401)                       // no gradient: never reported
        let w1 = randn([4], seed: 402).requiringGrad(), w2 = randn([4], seed: 403).requiringGrad()
        let b = randn([4], seed: 404).requiringGrad()
        let unused = randn([4], seed: 405).requiringGrad()  // not in the graph
        // w1 is used twice, once deep in the graph; w2 only in the last product.
        let h = ((x * w1).tanh() + w1 * b).exp()
        let y = (h * w2).sum()
        var reports: [(id: ObjectIdentifier, grad: [Double], w1Ready: Bool)] = []
        y.backward(onGradientReady: { t in
            reports.append((ObjectIdentifier(t), t.grad!.scalars(as: Double.self), w1.grad != nil))
        })
        let ids = reports.map(\.id)
        #expect(Set(ids) == [ObjectIdentifier(w1), ObjectIdentifier(w2), ObjectIdentifier(b)])
        #expect(ids.count == 3, "each leaf once")
        for t in [w1, w2, b] {
            let r = ids.firstIndex(of: ObjectIdentifier(t))!
            #expect(reports[r].grad == t.grad!.scalars(as: Double.self), "reported before its gradient was complete")
        }
        // w2's gradient is complete after the first VJP, before backward reaches w1.
        #expect(ids.first == ObjectIdentifier(w2) && reports[0].w1Ready == false)
        #expect(unused.grad == nil)
        // A leaf as the root is reported too.
        var rootReported = false
        let z = randn([1], seed: 406).requiringGrad()
        z.backward(Tensor.ones([1], dtype: .float64), onGradientReady: { rootReported = $0 === z })
        #expect(rootReported)
    }
}

import Foundation
