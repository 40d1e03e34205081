import Kappa
import KappaNN

/// The logits of the vMF mixture reading of the DINO head, at temperature τ:
/// ℓ_k = ⟨w_k, y⟩/τ + log C_p(‖w_k‖/τ) when `vmf`, else ⟨w_k, y⟩/τ (DINO). `dotProducts` is
/// [N, K], `prototypeNorms` [K]; the gradient reaches the norms through both terms
/// (d/dκ log C_p = −A_p(κ)).
public func vmfLogits(dotProducts: Tensor, prototypeNorms: Tensor, temperature τ: Double, dimension p: Int,
                      vmf: Bool, approximation: VMFNormalizerApproximation = .largeOrder) -> Tensor {
    let scaled = dotProducts / τ
    guard vmf else { return scaled }
    return scaled + (prototypeNorms / τ).vmfLogNormalizer(dimension: p, approximation: approximation)
}

/// The settings of ``DINOLoss``; the defaults are DINO-vMF's.
public struct DINOLossConfiguration: Codable, Equatable, Sendable {
    /// τ_s.
    public var studentTemperature = 0.1
    /// τ_t after warmup (DINO: 0.04 … 0.07).
    public var teacherTemperature = 0.04
    /// τ_t at epoch 0, rising linearly to ``teacherTemperature`` over ``warmupTeacherEpochs``.
    public var warmupTeacherTemperature = 0.04
    public var warmupTeacherEpochs = 0
    /// m of the center update.
    public var centerMomentum = 0.9
    /// Add log C_p(‖w_k‖/τ) to the logits (DINO-vMF); off is DINO.
    public var vmfNormalization = true
    /// Exact or large-order normalizer.
    public var normalizerExact = false
    /// Probability centering (DINO-vMF) instead of logit centering (DINO).
    public var probabilityCentering = true
    /// Sinkhorn–Knopp iterations instead of centering, when positive.
    public var sinkhornIterations = 0
    /// p, the bottleneck dimension (the sphere is S^{p−1}).
    public var dimension = 256

    public init() {}

    /// DINO as published: no vMF term, logit centering.
    public static var dino: Self {
        var c = Self()
        c.vmfNormalization = false
        c.probabilityCentering = false
        return c
    }

    var centeringKind: Centering.Kind {
        sinkhornIterations > 0 ? .sinkhornKnopp(iterations: sinkhornIterations) : (probabilityCentering ? .probability : .logit)
    }
}

/// The DINO multi-crop cross-entropy, with the vMF normalization and the centering of
/// METHOD.md as switches: for each teacher view q (the global crops) and each student view
/// v ≠ q, the batch mean of H(P_t(x_q), P_s(x_v)) = −Σ_k P_t log P_s, averaged over pairs.
/// Teacher targets carry no gradient. Read it as the template for a new loss.
public final class DINOLoss {
    public let configuration: DINOLossConfiguration
    public let centering: Centering

    /// The loss and the monitors of one step.
    public struct Result {
        /// The differentiable loss.
        public let loss: Tensor
        /// Mean entropy of the teacher targets (collapse: near 0 = one prototype wins,
        /// near log K = uniform).
        public let teacherEntropy: Double
        /// Mean KL(P_t ‖ P_s) over the pairs.
        public let klDivergence: Double
        /// τ_t used.
        public let teacherTemperature: Double

        public init(loss: Tensor, teacherEntropy: Double, klDivergence: Double, teacherTemperature: Double) {
            (self.loss, self.teacherEntropy, self.klDivergence, self.teacherTemperature) = (loss, teacherEntropy, klDivergence, teacherTemperature)
        }
    }

    public init(prototypes: Int, configuration: DINOLossConfiguration = .init(), dtype: DType = .float32) {
        self.configuration = configuration
        centering = Centering(configuration.centeringKind, prototypes: prototypes, momentum: configuration.centerMomentum,
                              dtype: dtype)
    }

    /// τ_t at `epoch`: linear warmup, then constant (DINO's `teacher_temp_schedule`).
    public func teacherTemperature(epoch: Int) -> Double {
        let c = configuration
        guard epoch < c.warmupTeacherEpochs else { return c.teacherTemperature }
        if c.warmupTeacherEpochs == 1 { return c.warmupTeacherTemperature }
        return c.warmupTeacherTemperature
            + (c.teacherTemperature - c.warmupTeacherTemperature) * Double(epoch) / Double(c.warmupTeacherEpochs - 1)
    }

    /// The raw teacher logits r = ⟨w, y⟩ (+ τ_t log C_p(‖w‖/τ_t) with vMF) that centering acts on.
    func teacherRawLogits(_ dots: Tensor, _ norms: Tensor, _ tt: Double) -> Tensor {
        let c = configuration
        return vmfLogits(dotProducts: dots, prototypeNorms: norms, temperature: tt, dimension: c.dimension,
                         vmf: c.vmfNormalization, approximation: c.normalizerExact ? .exact : .largeOrder) * tt
    }

    /// The loss for student outputs of every view (`studentDots[v]` is [B, K]; the first
    /// views are the global crops, in the teacher's order) and teacher outputs of the global
    /// views, with the prototype norms of each network ([K]). Updates the center.
    public func callAsFunction(studentDots: [Tensor], studentNorms: Tensor, teacherDots: [Tensor], teacherNorms: Tensor,
                               epoch: Int) -> Result {
        precondition(!teacherDots.isEmpty && studentDots.count >= teacherDots.count,
                     "DINOLoss: \(studentDots.count) student views for \(teacherDots.count) teacher views")
        let c = configuration
        let tt = teacherTemperature(epoch: epoch)
        let (raw, targets) = withoutGradients { () -> (Tensor, [Tensor]) in
            let raw = Tensor.concat(teacherDots.map { teacherRawLogits($0.detached(), teacherNorms.detached(), tt) }, alongAxis: 0)
            let all = centering.targets(teacherLogits: raw, temperature: tt)
            return (raw, all.split(sizes: teacherDots.map { $0.shape[0] }, alongAxis: 0))
        }
        let logProbabilities = studentDots.map { dots in
            vmfLogits(dotProducts: dots, prototypeNorms: studentNorms, temperature: c.studentTemperature, dimension: c.dimension,
                      vmf: c.vmfNormalization, approximation: c.normalizerExact ? .exact : .largeOrder).logSoftmax(alongAxis: -1)
        }
        var total: Tensor?
        var pairs = 0
        var kl = 0.0
        for (q, target) in targets.enumerated() {
            for (v, logP) in logProbabilities.enumerated() where v != q {
                let ce = -(target * logP).sum(alongAxis: -1).mean()
                total = total.map { $0 + ce } ?? ce
                pairs += 1
                kl += ce.item()
            }
        }
        let entropy = withoutGradients { targets.map { t in -(t * t.clamped(min: 1e-30).log()).sum(alongAxis: -1).mean().item() } }
        let meanEntropy = entropy.reduce(0, +) / Double(entropy.count)
        centering.update(teacherLogits: raw, temperature: tt)
        guard let total else { preconditionFailure("DINOLoss: no cross-view pairs (one view only)") }
        return Result(loss: total / Double(pairs), teacherEntropy: meanEntropy,
                      klDivergence: kl / Double(pairs) - meanEntropy, teacherTemperature: tt)
    }

    /// The loss from head outputs (logits and prototype norms of each view).
    public func callAsFunction(student: [DINOHead.Output], teacher: [DINOHead.Output], epoch: Int) -> Result {
        self(studentDots: student.map(\.logits), studentNorms: student[0].prototypeNorms,
             teacherDots: teacher.map(\.logits), teacherNorms: teacher[0].prototypeNorms, epoch: epoch)
    }
}
