import Foundation
import Kappa
import KappaSSL
import Testing

/// Numerical stress: the softmax family and the DINO-vMF loss stay finite in Float32 at the
/// extremes users reach (logits ±1e4, prototype norms 1e-4 … 1e3, τ down to 0.01), and where
/// a value must overflow, anomaly mode names the op.
@Suite("Numerical stress (Float32)")
struct StressTests {
    static func finite(_ t: Tensor) -> Bool { t.scalars(as: Double.self).allSatisfy(\.isFinite) }

    @Test("softmax, logSoftmax, logSumExp: finite values and gradients for logits up to ±1e4",
          arguments: [1.0, 1e2, 1e3, 1e4])
    func softmaxFamily(scale: Double) throws {
        var g = RandomGenerator(seed: 3)
        let x64 = Tensor.randomUniform([8, 33], low: -scale, high: scale, dtype: .float64, using: &g)
        let x = x64.to(.float32)
        x.requiresGrad = true
        let w = Tensor.randomNormal([8, 33], using: &g)
        try withAnomalyDetection {
            let s = x.softmax(alongAxis: 1), l = x.logSoftmax(alongAxis: 1), e = x.logSumExp(alongAxes: [1])
            ((s * w).sum() + (l * w).sum() * 1e-4 + e.sum() * 1e-4).backward()
            #expect(Self.finite(s) && Self.finite(l) && Self.finite(e) && Self.finite(x.grad!))
            // Against Float64 on the same (rounded) logits: the Float32 rounding of x − max is up
            // to an ulp of the scale, so the tolerances grow with it.
            let x64 = x.detached().to(.float64)
            let s64 = x64.softmax(alongAxis: 1).scalars(as: Double.self), l64 = x64.logSoftmax(alongAxis: 1).scalars(as: Double.self)
            let e64 = x64.logSumExp(alongAxes: [1]).scalars(as: Double.self)
            #expect(zip(s.scalars(as: Double.self), s64).allSatisfy { abs($0 - $1) <= 1e-6 * scale })
            #expect(zip(l.scalars(as: Double.self), l64).allSatisfy { abs($0 - $1) <= 1e-6 * scale + 1e-5 })
            #expect(zip(e.scalars(as: Double.self), e64).allSatisfy { abs($0 - $1) <= 1e-6 * scale + 1e-5 })
        }
    }

    @Test("DINO-vMF loss: finite loss and gradients for norms 1e-4 … 1e3 and τ down to 0.01",
          arguments: [(1e-4, 0.1), (1e-2, 0.04), (1.0, 0.01), (1e2, 0.01), (1e3, 0.01), (1e3, 0.1)])
    func dinoVMFExtremes(norm: Double, tau: Double) throws {
        var g = RandomGenerator(seed: 11)
        let (b, k, p) = (16, 64, 64)
        var config = DINOLossConfiguration()
        config.dimension = p
        config.studentTemperature = tau
        config.teacherTemperature = tau / 2
        config.warmupTeacherTemperature = tau / 2
        for exact in [false, true] {
            config.normalizerExact = exact
            let loss = DINOLoss(prototypes: k, configuration: config)
            // Prototype norms spread around `norm` by up to 10×; dot products ⟨w_k, y⟩ within ±‖w_k‖.
            let norms = (Tensor.randomUniform([k], low: -1, high: 1, using: &g) * log(10.0)).exp() * norm
            norms.requiresGrad = true
            func dots() -> Tensor { Tensor.randomUniform([b, k], low: -1, high: 1, using: &g) * norms.detached() }
            let student = (0..<4).map { _ in let d = dots(); d.requiresGrad = true; return d }
            let teacher = (0..<2).map { _ in dots() }
            try withAnomalyDetection {
                let r = loss(studentDots: student, studentNorms: norms, teacherDots: teacher, teacherNorms: norms.detached(), epoch: 0)
                r.loss.backward()
                #expect(r.loss.item().isFinite && r.teacherEntropy.isFinite && r.klDivergence.isFinite,
                        "norm \(norm), τ \(tau), exact \(exact): loss \(r.loss.item())")
                #expect(Self.finite(norms.grad!) && student.allSatisfy { Self.finite($0.grad!) })
                #expect(Self.finite(loss.centering.center))
            }
        }
    }

    @Test("anomaly mode names the op whose result must overflow")
    func overflowNamed() {
        let x = Tensor([10, 100], shape: [2]).to(.float32)   // exp(100) overflows Float32
        x.requiresGrad = true
        #expect(throws: AnomalyError.self) { try withAnomalyDetection { (x.exp() * 2).sum() } }
        do {
            _ = try withAnomalyDetection { (x.exp() * 2).sum() }
        } catch let e as AnomalyError {
            #expect(e.op == "exp" && e.phase == "forward", "\(e)")
            #expect("\(e)".contains("exp"))
        } catch { Issue.record("unexpected \(error)") }
        // The loss of a student whose logits overflow: the op is named, not a NaN loss later.
        let huge = Tensor([3e38, -3e38, 1], shape: [1, 3]).to(.float32)
        do {
            _ = try withAnomalyDetection { (huge * 10).logSoftmax(alongAxis: 1).sum() }
            Issue.record("no anomaly for an overflowing product")
        } catch let e as AnomalyError {
            #expect(e.op == "mul", "\(e)")
        } catch { Issue.record("unexpected \(error)") }
    }
}
