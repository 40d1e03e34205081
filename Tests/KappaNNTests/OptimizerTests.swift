import Foundation
import Kappa
import KappaNN
import Testing

@Suite("Optimizers, schedules, clipping, EMA")
struct OptimizerTests {
    /// One parameter p = [1, −2] with gradient g = [0.5, 0.25].
    func parameter() -> (Tensor, [ParameterGroup]) {
        let p = Tensor([1.0, -2], shape: [1, 2]).requiringGrad()
        p.grad = Tensor([0.5, 0.25], shape: [1, 2])
        return (p, [ParameterGroup(name: "regularized", parameters: [("w", p)], learningRate: 0.1, weightDecay: 0.01)])
    }

    @Test func adamW() {
        let (p, groups) = parameter()
        let opt = AdamW(groups: groups)
        opt.step()
        // Step 1: m̂ = g, v̂ = g², so p ← p(1 − lr·wd) − lr·g/(|g| + ε).
        let expected = [1.0 * (1 - 0.001) - 0.1 * 0.5 / (0.5 + 1e-8), -2.0 * (1 - 0.001) - 0.1 * 0.25 / (0.25 + 1e-8)]
        let got = p.scalars(as: Double.self)
        #expect(Swift.abs(got[0] - expected[0]) < 1e-15 && Swift.abs(got[1] - expected[1]) < 1e-15)
        // Step 2 with the same gradient: m = g, v = g², bias corrections cancel again.
        opt.step()
        let e2 = expected[0] * (1 - 0.001) - 0.1 * 0.5 / (0.5 + 1e-8)
        #expect(Swift.abs(p.scalars(as: Double.self)[0] - e2) < 1e-14)
        #expect(opt.namedState().map(\.name) == ["exp_avg.w", "exp_avg_sq.w"])
    }

    @Test func sgdWithNesterovMomentum() {
        let (p, groups) = parameter()
        let opt = SGD(groups: groups, momentum: 0.9, nesterov: true)
        opt.step()
        // d = g + wd·p; buf = d; update = d + μ·buf.
        let d0 = 0.5 + 0.01 * 1.0
        let p0 = 1.0 - 0.1 * (d0 + 0.9 * d0)
        #expect(Swift.abs(p.scalars(as: Double.self)[0] - p0) < 1e-15)
        opt.step()
        let d1 = 0.5 + 0.01 * p0, buf = 0.9 * d0 + d1
        #expect(Swift.abs(p.scalars(as: Double.self)[0] - (p0 - 0.1 * (d1 + 0.9 * buf))) < 1e-15)
    }

    @Test func larsTrustRatio() {
        let (p, groups) = parameter()
        let opt = LARS(groups: groups, momentum: 0.9, eta: 0.001)
        opt.step()
        let d = [0.5 + 0.01, 0.25 - 0.02]
        let q = 0.001 * Foundation.sqrt(5.0) / Foundation.sqrt(d[0] * d[0] + d[1] * d[1])
        let got = p.scalars(as: Double.self)
        #expect(Swift.abs(got[0] - (1 - 0.1 * q * d[0])) < 1e-15 && Swift.abs(got[1] - (-2 - 0.1 * q * d[1])) < 1e-15)
    }

    @Test func dinoGroupsSkipBiasesAndNorms() {
        var g = RandomGenerator(seed: 0)
        let head = DINOHead(inFeatures: 4, prototypes: 6, hidden: 5, bottleneck: 3, normLastLayer: false, using: &g)
        let groups = ParameterGroup.dinoGroups(head, learningRate: 1e-3, weightDecay: 0.04)
        #expect(groups[0].parameters.map(\.name).contains("lastLayerScale"), "DINO decays g of shape [K, 1]")
        #expect(groups[1].parameters.allSatisfy { $0.name.hasSuffix("bias") })
        #expect(groups[1].weightDecay == 0)
        let kept = ParameterGroup.dinoGroups(head, learningRate: 1e-3, weightDecay: 0.04, decayPrototypeScale: false)
        #expect(kept[1].parameters.map(\.name).contains("lastLayerScale"))
    }

    @Test func groupsByName() {
        var g = RandomGenerator(seed: 4)
        let mlp = MLP(2, hidden: 3, using: &g)
        let fast = ParameterGroup.matching(mlp, name: "fc2", learningRate: 0.1, weightDecay: 0, learningRateScale: 10) { $0.hasPrefix("fc2") }
        let rest = ParameterGroup.matching(mlp, name: "regularized", learningRate: 0.1, weightDecay: 0.05) { !$0.hasPrefix("fc2") }
        #expect(fast.parameters.map(\.name) == ["fc2.weight", "fc2.bias"] && rest.parameters.count == 2)
        let opt = SGD(groups: [fast, rest])
        opt.setSchedule(learningRate: 0.5, weightDecay: 0.2)
        #expect(opt.groups[0].learningRate == 5 && opt.groups[1].learningRate == 0.5)
        #expect(opt.groups[0].weightDecay == 0 && opt.groups[1].weightDecay == 0.2)
    }

    @Test func duplicateNamesAcrossGroupsAreRefused() async {
        await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            var g = RandomGenerator(seed: 5)
            let a = MLP(2, hidden: 3, using: &g), b = MLP(2, hidden: 3, using: &g)
            _ = AdamW(groups: ParameterGroup.dinoGroups(a, learningRate: 1, weightDecay: 0) + ParameterGroup.dinoGroups(b, learningRate: 1, weightDecay: 0))
        }.map { result in
            #expect(String(decoding: result.standardErrorContent, as: UTF8.self).contains("parameter name 'fc1.weight' appears twice"))
        }
        var g = RandomGenerator(seed: 5)
        let a = MLP(2, hidden: 3, using: &g), b = MLP(2, hidden: 3, using: &g)
        let opt = AdamW(groups: ParameterGroup.dinoGroups(a, learningRate: 1, weightDecay: 0, prefix: "a.")
                        + ParameterGroup.dinoGroups(b, learningRate: 1, weightDecay: 0, prefix: "b."))
        #expect(opt.groups.flatMap(\.parameters).map(\.name).contains("b.fc2.bias"))
    }

    @Test func schedules() {
        let s = Schedule.cosine(base: 1, final: 0.1, epochs: 10, iterationsPerEpoch: 5, warmupEpochs: 2, warmupStart: 0)
        #expect(s.count == 50)
        #expect(s[0] == 0 && s[9] == 1)           // linear warmup reaches base at its last iteration
        #expect(s[4] == 4.0 / 9)
        #expect(s[10] == 1)                       // cosine starts at base
        let last = 0.1 + 0.45 * (1 + Foundation.cos(Double.pi * 39 / 40))
        #expect(Swift.abs(s[49] - last) < 1e-15)
        #expect(Schedule.step(base: 1, gamma: 0.5, milestones: [2, 4], iterations: 6) == [1, 1, 0.5, 0.5, 0.25, 0.25])
        #expect(Schedule.constant(3, iterations: 2) == [3, 3])
    }

    @Test func clippingAndFreezing() {
        var g = RandomGenerator(seed: 1)
        let lin = Linear(2, 2, dtype: .float64, using: &g)
        lin.weight.grad = Tensor([3.0, 4, 0, 0], shape: [2, 2])
        lin.bias!.grad = Tensor([0.3, 0.4])
        let norms = Gradients.clipPerParameter(lin, maxNorm: 1)
        #expect(norms.map(\.norm) == [5, 0.5])
        let clipped = lin.weight.grad!.norm().item()
        #expect(Swift.abs(clipped - 5 / (5 + 1e-6)) < 1e-12)
        #expect(lin.bias!.grad!.scalars(as: Double.self) == [0.3, 0.4])
        lin.weight.grad = Tensor([3.0, 4, 0, 0], shape: [2, 2])
        let total = Gradients.clipGlobalNorm(lin.parameters, maxNorm: 1)
        #expect(Swift.abs(total - (25.25 as Double).squareRoot()) < 1e-12)
        let after = (lin.weight.grad!.norm().item() * lin.weight.grad!.norm().item() + lin.bias!.grad!.norm().item() * lin.bias!.grad!.norm().item()).squareRoot()
        #expect(Swift.abs(after - 1) < 1e-5)
        let head = DINOHead(inFeatures: 2, prototypes: 3, hidden: 4, bottleneck: 2, normLastLayer: false, using: &g)
        for p in head.parameters { p.grad = p.onesLike() }
        head.cancelLastLayerGradients()
        #expect(head.lastLayerDirection.grad == nil && head.lastLayerScale.grad == nil)
        #expect(head.parameters.filter { $0.grad != nil }.count == head.parameters.count - 2)
    }

    @Test func ema() {
        var g = RandomGenerator(seed: 2)
        let student = MLP(3, hidden: 4, using: &g), teacher = MLP(3, hidden: 4, using: &g)
        let before = teacher.fc1.weight.scalars(as: Float.self), s = student.fc1.weight.scalars(as: Float.self)
        emaUpdate(teacher: teacher, student: student, momentum: 0.996)
        let after = teacher.fc1.weight.scalars(as: Float.self)
        for i in before.indices { #expect(Swift.abs(after[i] - (0.996 * before[i] + 0.004 * s[i])) < 1e-7) }
        #expect(teacher.fc1.weight.isLeaf && teacher.fc1.weight.grad == nil)
    }

    @Test func trainingReducesALoss() {
        // A two-layer MLP learns XOR-like labels with AdamW: the loss must fall.
        var g = RandomGenerator(seed: 3)
        let mlp = MLP(2, hidden: 16, out: 2, using: &g)
        let x = Tensor([0, 0, 0, 1, 1, 0, 1, 1], shape: [4, 2]) as Tensor
        let labels = [0, 1, 1, 0]
        let opt = AdamW(groups: ParameterGroup.dinoGroups(mlp, learningRate: 0.05, weightDecay: 0))
        var first = 0.0, last = 0.0
        for i in 0..<150 {
            opt.zeroGrad()
            let loss = Tensor.crossEntropy(logits: mlp(x * 4 - 2), labels: labels)
            loss.backward()
            opt.step()
            if i == 0 { first = loss.item() }
            last = loss.item()
        }
        #expect(last < 0.1 * first, "loss \(first) → \(last)")
    }
}

extension Tensor {
    convenience init(_ values: [Int], shape: [Int]) { self.init(values.map(Float.init), shape: shape) }
}
