import Foundation
import Kappa
import KappaNN
import KappaSSL
import Testing

func softmax(_ x: [Double]) -> [Double] {
    let m = x.max()!
    let e = x.map { Foundation.exp($0 - m) }
    let s = e.reduce(0, +)
    return e.map { $0 / s }
}

func randn(_ shape: [Int], seed: UInt64) -> Tensor {
    var g = RandomGenerator(seed: seed)
    return Tensor.randomNormal(shape, dtype: .float64, using: &g)
}

@Suite("DINO / DINO-vMF losses and centering")
struct LossTests {
    // One image, K = 3 prototypes, views: 2 global + 1 local.
    let student: [[Double]] = [[0.2, -0.1, 0.4], [0.0, 0.3, -0.2], [0.5, 0.1, 0.1]]
    let teacher: [[Double]] = [[0.3, 0.1, -0.3], [0.1, 0.2, 0.0]]
    let norms: [Double] = [1.0, 1.5, 0.7]

    func tensors(_ rows: [[Double]]) -> [Tensor] { rows.map { Tensor($0, shape: [1, 3]) } }

    /// The loss written out by hand for one sample.
    func handLoss(vmf: Bool, p: Int = 16, ts: Double = 0.1, tt: Double = 0.04) -> Double {
        func logits(_ dots: [Double], _ tau: Double) -> [Double] {
            dots.enumerated().map { k, d in d / tau + (vmf ? vmfLogNormalizer(dimension: p, kappa: norms[k] / tau) : 0) }
        }
        var total = 0.0, pairs = 0.0
        for q in 0..<2 {
            let target = softmax(logits(teacher[q], tt))  // initial centers are neutral
            for v in 0..<3 where v != q {
                let ps = softmax(logits(student[v], ts))
                total += -zip(target, ps).map { $0 * Foundation.log($1) }.reduce(0, +)
                pairs += 1
            }
        }
        return total / pairs
    }

    @Test func dinoMatchesHandComputation() {
        var config = DINOLossConfiguration.dino
        config.dimension = 16
        let loss = DINOLoss(prototypes: 3, configuration: config, dtype: .float64)
        let ones = Tensor([1.0, 1, 1])
        let r = loss(studentDots: tensors(student), studentNorms: ones, teacherDots: tensors(teacher), teacherNorms: ones, epoch: 0)
        #expect(Swift.abs(r.loss.item() - handLoss(vmf: false)) < 1e-12)
    }

    @Test func dinoVMFMatchesHandComputation() {
        var config = DINOLossConfiguration()
        config.dimension = 16
        for exact in [false, true] {
            config.normalizerExact = exact
            // Uniform probability center: the targets are the plain vMF posteriors.
            let loss = DINOLoss(prototypes: 3, configuration: config, dtype: .float64)
            let n = Tensor(norms)
            let r = loss(studentDots: tensors(student), studentNorms: n, teacherDots: tensors(teacher), teacherNorms: n, epoch: 0)
            let p = 16
            let expected = { () -> Double in
                func logits(_ dots: [Double], _ tau: Double) -> [Double] {
                    dots.enumerated().map { k, d in
                        d / tau + vmfLogNormalizer(dimension: p, kappa: norms[k] / tau, approximation: exact ? .exact : .largeOrder)
                    }
                }
                var total = 0.0
                for q in 0..<2 {
                    let target = softmax(logits(teacher[q], 0.04))
                    for v in 0..<3 where v != q {
                        total += -zip(target, softmax(logits(student[v], 0.1))).map { $0 * Foundation.log($1) }.reduce(0, +)
                    }
                }
                return total / 4
            }()
            #expect(Swift.abs(r.loss.item() - expected) < 1e-10, "exact: \(exact)")
        }
    }

    @Test func vmfTermIsInertWhenNormsAreEqual() {
        // With all ‖w_k‖ equal, log C_p adds the same constant to every logit: DINO-vMF with
        // logit centering reproduces DINO exactly (normalized prototypes, vMF off).
        var vmf = DINOLossConfiguration()
        vmf.probabilityCentering = false
        vmf.dimension = 16
        var dino = DINOLossConfiguration.dino
        dino.dimension = 16
        let a = DINOLoss(prototypes: 3, configuration: vmf, dtype: .float64), b = DINOLoss(prototypes: 3, configuration: dino, dtype: .float64)
        let ones = Tensor([1.0, 1, 1])
        for epoch in 0..<3 {  // the centers evolve identically too
            let ra = a(studentDots: tensors(student), studentNorms: ones, teacherDots: tensors(teacher), teacherNorms: ones, epoch: epoch)
            let rb = b(studentDots: tensors(student), studentNorms: ones, teacherDots: tensors(teacher), teacherNorms: ones, epoch: epoch)
            #expect(Swift.abs(ra.loss.item() - rb.loss.item()) < 1e-12)
        }
    }

    @Test func gradientsReachDotsAndNorms() {
        for exact in [false, true] {
            var config = DINOLossConfiguration()
            config.dimension = 8
            config.normalizerExact = exact
            let dots = (0..<3).map { randn([2, 5], seed: UInt64($0)) * 0.3 }
            let norms = randn([5], seed: 9).abs() + 0.5
            let teacherDots = (0..<2).map { randn([2, 5], seed: UInt64(20 + $0)) * 0.3 }
            let teacherNorms = norms.copied()  // its own storage: gradcheck perturbs `norms` in place
            let report = gradcheck(dots + [norms]) { t in
                let loss = DINOLoss(prototypes: 5, configuration: config, dtype: .float64)  // fresh center each time
                return loss(studentDots: Array(t[0..<3]), studentNorms: t[3], teacherDots: teacherDots,
                            teacherNorms: teacherNorms, epoch: 0).loss
            }
            #expect(report.passed, "\(report)")
        }
    }

    @Test func teacherGetsNoGradient() {
        let loss = DINOLoss(prototypes: 3, configuration: { var c = DINOLossConfiguration(); c.dimension = 16; return c }(),
                            dtype: .float64)
        let s = tensors(student).map { $0.requiringGrad() }, t = tensors(teacher).map { $0.requiringGrad() }
        let sn = Tensor(norms).requiringGrad(), tn = Tensor(norms).requiringGrad()
        loss(studentDots: s, studentNorms: sn, teacherDots: t, teacherNorms: tn, epoch: 0).loss.backward()
        #expect(s.allSatisfy { $0.grad != nil } && sn.grad != nil)
        #expect(t.allSatisfy { $0.grad == nil } && tn.grad == nil)
    }

    @Test func centering() {
        let r = randn([4, 6], seed: 3)
        // A uniform probability center leaves the targets unchanged.
        let prob = Centering(.probability, prototypes: 6, momentum: 0.9, dtype: .float64)
        let plain = (r / 0.04).softmax(alongAxis: 1)
        #expect((prob.targets(teacherLogits: r, temperature: 0.04) - plain).abs().max().item() < 1e-12)
        prob.update(teacherLogits: r, temperature: 0.04)
        let expected = plain.mean(alongAxis: 0) * 0.1 + 0.9 / 6
        #expect((prob.center - expected).abs().max().item() < 1e-12)
        #expect(Swift.abs(prob.center.sum().item() - 1) < 1e-12)
        // Logit centering: c ← 0.9·0 + 0.1·mean(r).
        let logit = Centering(.logit, prototypes: 6, momentum: 0.9, dtype: .float64)
        logit.update(teacherLogits: r, temperature: 0.04)
        #expect((logit.center - r.mean(alongAxis: 0) * 0.1).abs().max().item() < 1e-12)
        // Sinkhorn–Knopp: rows are distributions and prototypes share the mass evenly.
        let big = randn([64, 8], seed: 4) * 3
        let q = Centering.sinkhornKnopp(big, iterations: 3)
        #expect(q.sum(alongAxis: 1).doubles.allSatisfy { Swift.abs($0 - 1) < 1e-9 })
        func spread(_ t: Tensor) -> Double { let c = t.sum(alongAxis: 0).doubles; return c.max()! - c.min()! }
        let before = (big / 1).softmax(alongAxis: 1)
        #expect(spread(q) < 0.5 * spread(before), "three iterations even out the prototypes' mass")
        let converged = Centering.sinkhornKnopp(big, iterations: 200)
        #expect(converged.sum(alongAxis: 0).doubles.allSatisfy { Swift.abs($0 - 8) < 1e-6 })
    }

    @Test func teacherTemperatureWarmup() {
        var c = DINOLossConfiguration()
        c.warmupTeacherTemperature = 0.04
        c.teacherTemperature = 0.07
        c.warmupTeacherEpochs = 4
        let loss = DINOLoss(prototypes: 2, configuration: c)
        #expect([0, 1, 2, 3, 4, 9].map { loss.teacherTemperature(epoch: $0) }.map { ($0 * 1e6).rounded() / 1e6 }
                == [0.04, 0.05, 0.06, 0.07, 0.07, 0.07])
    }

    @Test func monitorsAreConsistent() {
        var config = DINOLossConfiguration()
        config.dimension = 16
        let loss = DINOLoss(prototypes: 3, configuration: config, dtype: .float64)
        let n = Tensor(norms)
        let r = loss(studentDots: tensors(student), studentNorms: n, teacherDots: tensors(teacher), teacherNorms: n, epoch: 0)
        #expect(r.teacherEntropy > 0 && r.teacherEntropy < Foundation.log(3.0))
        #expect(r.klDivergence >= 0)
        #expect(Swift.abs(r.loss.item() - (r.teacherEntropy + r.klDivergence)) < 1e-12)
    }
}

extension Tensor {
    var doubles: [Double] { scalars(as: Double.self) }
}
