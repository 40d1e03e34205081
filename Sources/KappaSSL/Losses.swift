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
    /// Epochs of the linear warmup of τ_t (0: none).
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
/// Teacher targets carry no gradient.
///
/// Its steps are public, so that a loss grown from DINO's (iBOT's patch term, a regularizer)
/// reuses them: ``teacherTargets(teacherDots:teacherNorms:epoch:)`` (the centered, sharpened
/// targets), ``studentLogProbabilities(_:norms:)``, ``updateCenter(with:)`` and
/// ``entropy(_:)``.
public final class DINOLoss {
    /// The temperatures, the switches and p.
    public let configuration: DINOLossConfiguration
    /// The teacher's centering and its state.
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

        /// A result.
        public init(loss: Tensor, teacherEntropy: Double, klDivergence: Double, teacherTemperature: Double) {
            (self.loss, self.teacherEntropy, self.klDivergence, self.teacherTemperature) = (loss, teacherEntropy, klDivergence, teacherTemperature)
        }

        /// τ_t, the teacher entropy and the KL divergence, as the progress line and
        /// `metrics.jsonl` show them.
        public var monitors: [LoggedScalar] {
            [LoggedScalar("teacherTemperature", label: "τt", teacherTemperature, format: "%.3f"),
             LoggedScalar("teacherEntropy", label: "H(t)", teacherEntropy, format: "%.2f"),
             LoggedScalar("klDivergence", label: "KL", klDivergence, format: "%.3f")]
        }
    }

    /// The teacher's side of a step: the targets of each teacher view and the raw logits the
    /// center moves towards.
    public struct TeacherTargets {
        /// P_t per teacher view, [B, K] each (rows sum to 1, no gradient).
        public let targets: [Tensor]
        /// The raw logits r of all teacher views, concatenated [ΣB, K].
        public let raw: Tensor
        /// τ_t used.
        public let temperature: Double

        /// Targets of a step (for a loss that makes its own).
        public init(targets: [Tensor], raw: Tensor, temperature: Double) {
            (self.targets, self.raw, self.temperature) = (targets, raw, temperature)
        }
    }

    /// The loss over `prototypes` prototypes, its center at the start value.
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

    var approximation: VMFNormalizerApproximation { configuration.normalizerExact ? .exact : .largeOrder }

    /// The teacher targets for the teacher's dot products ⟨w_k, y⟩ of each view ([B, K] each)
    /// and its prototype norms [K] at `epoch`: the raw logits r = ⟨w, y⟩ (+ τ_t log C_p(‖w‖/τ_t)
    /// with vMF) centered and sharpened by ``centering`` over all views together. Does not move
    /// the center: call ``updateCenter(with:)`` once the step's targets are made.
    public func teacherTargets(teacherDots: [Tensor], teacherNorms: Tensor, epoch: Int) -> TeacherTargets {
        let c = configuration
        let tt = teacherTemperature(epoch: epoch)
        return withoutGradients {
            let raw = Tensor.concat(teacherDots.map { dots in
                vmfLogits(dotProducts: dots.detached(), prototypeNorms: teacherNorms.detached(), temperature: tt, dimension: c.dimension,
                          vmf: c.vmfNormalization, approximation: approximation) * tt
            }, alongAxis: 0)
            let all = centering.targets(teacherLogits: raw, temperature: tt)
            return TeacherTargets(targets: all.split(sizes: teacherDots.map { $0.shape[0] }, alongAxis: 0), raw: raw, temperature: tt)
        }
    }

    /// log P_s = log-softmax of the student's vMF (or plain) logits at τ_s, for dot products
    /// [..., K] and prototype norms [K]; differentiable in both.
    public func studentLogProbabilities(_ dots: Tensor, norms: Tensor) -> Tensor {
        let c = configuration
        return vmfLogits(dotProducts: dots, prototypeNorms: norms, temperature: c.studentTemperature, dimension: c.dimension,
                         vmf: c.vmfNormalization, approximation: approximation).logSoftmax(alongAxis: -1)
    }

    /// Moves the center towards the batch statistic of these targets' raw logits.
    public func updateCenter(with t: TeacherTargets) {
        centering.update(teacherLogits: t.raw, temperature: t.temperature)
    }

    /// The mean entropy −Σ_k p log p of the rows of `targets` [..., K] (no gradient).
    public static func entropy(_ targets: Tensor) -> Double {
        withoutGradients { -(targets * targets.clamped(min: 1e-30).log()).sum(alongAxis: -1).mean().item() }
    }

    /// The loss for student outputs of every view (`studentDots[v]` is [B, K]; the first
    /// views are the global crops, in the teacher's order) and teacher outputs of the global
    /// views, with the prototype norms of each network ([K]). Updates the center.
    public func callAsFunction(studentDots: [Tensor], studentNorms: Tensor, teacherDots: [Tensor], teacherNorms: Tensor,
                               epoch: Int) -> Result {
        precondition(!teacherDots.isEmpty && studentDots.count >= teacherDots.count && studentDots.count >= 2,
                     "DINOLoss: \(studentDots.count) student views for \(teacherDots.count) teacher views (at least two views, as many student views as teacher views)")
        let teacher = teacherTargets(teacherDots: teacherDots, teacherNorms: teacherNorms, epoch: epoch)
        let logProbabilities = studentDots.map { studentLogProbabilities($0, norms: studentNorms) }
        var total: Tensor?
        var pairs = 0
        var kl = 0.0
        for (q, target) in teacher.targets.enumerated() {
            for (v, logP) in logProbabilities.enumerated() where v != q {
                let ce = -(target * logP).sum(alongAxis: -1).mean()
                total = total.map { $0 + ce } ?? ce
                pairs += 1
                kl += ce.item()
            }
        }
        let meanEntropy = teacher.targets.map(Self.entropy).reduce(0, +) / Double(teacher.targets.count)
        updateCenter(with: teacher)
        guard let total else { preconditionFailure("DINOLoss: no cross-view pairs") }
        return Result(loss: total / Double(pairs), teacherEntropy: meanEntropy,
                      klDivergence: kl / Double(pairs) - meanEntropy, teacherTemperature: teacher.temperature)
    }

    /// The loss from head outputs (logits and prototype norms of each view).
    public func callAsFunction(student: [DINOHead.Output], teacher: [DINOHead.Output], epoch: Int) -> Result {
        self(studentDots: student.map(\.logits), studentNorms: student[0].prototypeNorms,
             teacherDots: teacher.map(\.logits), teacherNorms: teacher[0].prototypeNorms, epoch: epoch)
    }

    /// The center, for checkpoints (``SelfSupervisedObjective/state``), named `name`.
    public func state(named name: String = "center") -> [(name: String, tensor: Tensor)] { [(name, centering.center)] }

    /// Restores the center saved by ``state(named:)``.
    public func loadState(_ tensors: [String: Tensor], named name: String = "center") throws {
        guard let center = tensors[name], center.shape == centering.center.shape, center.dtype == centering.center.dtype else {
            throw ObjectiveStateError("no \(name) of shape \(centering.center.shape) (\(centering.center.dtype))")
        }
        centering.center = center
    }
}

/// DINO and DINO-vMF as a ``SelfSupervisedObjective``: the teacher sees the global views,
/// the student every view, and ``DINOLoss`` compares them across views.
public final class DINOObjective: SelfSupervisedObjective {
    /// The loss and its center.
    public let loss: DINOLoss

    /// The objective of a loss configuration.
    public init(prototypes: Int, configuration: DINOLossConfiguration, dtype: DType = .float32) {
        loss = DINOLoss(prototypes: prototypes, configuration: configuration, dtype: dtype)
    }

    /// The DINO loss of a batch; updates the center.
    public func callAsFunction(_ batch: ObjectiveBatch, networks: TeacherStudentNetworks, context: StepContext) -> ObjectiveOutput {
        let teacher = networks.teacherLogits(batch.globalViews)
        let student = networks.studentLogits(batch.views)
        let r = loss(studentDots: student, studentNorms: networks.studentHead.prototypeNorms, teacherDots: teacher,
                     teacherNorms: networks.teacherHead.prototypeNorms, epoch: context.epoch)
        return ObjectiveOutput(loss: r.loss, monitors: r.monitors)
    }

    public var state: [(name: String, tensor: Tensor)] { loss.state() }
    public func loadState(_ tensors: [String: Tensor]) throws { try loss.loadState(tensors) }
}
