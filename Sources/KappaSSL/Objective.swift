import Kappa
import KappaNN

/// A self-supervised training objective: what ``TeacherStudentTrainer`` asks of a method.
///
/// The trainer owns everything methods share (the networks, the views, the optimizer and its
/// schedules, clipping, the frozen last layer, the teacher's EMA, the NaN stop, checkpoints and
/// exact resume); an objective only says how a batch of views becomes a loss. DINO, DINO-vMF,
/// iBOT and iBOT-vMF are objectives (``DINOObjective``, ``IBOTObjective``); a new method is one
/// more conforming class, with no change to the trainer:
///
/// ```swift
/// final class MyObjective: SelfSupervisedObjective {
///     let dino: DINOLoss
///     init(prototypes: Int, configuration: DINOLossConfiguration) {
///         dino = DINOLoss(prototypes: prototypes, configuration: configuration)
///     }
///     func callAsFunction(_ batch: ObjectiveBatch, networks: TeacherStudentNetworks,
///                         context: StepContext) -> ObjectiveOutput {
///         let teacher = networks.teacherLogits(batch.globalViews)   // no gradient
///         let student = networks.studentLogits(batch.views)
///         let r = dino(studentDots: student, studentNorms: networks.studentHead.prototypeNorms,
///                      teacherDots: teacher, teacherNorms: networks.teacherHead.prototypeNorms,
///                      epoch: context.epoch)
///         return ObjectiveOutput(loss: r.loss, monitors: r.monitors)
///     }
///     var state: [(name: String, tensor: Tensor)] { dino.state() }
///     func loadState(_ tensors: [String: Tensor]) throws { try dino.loadState(tensors) }
/// }
/// ```
///
/// `Examples/KoLeo` trains such an objective from its own command line.
public protocol SelfSupervisedObjective: AnyObject {
    /// The loss of one batch: its differentiable total, its named terms and the monitors to log.
    /// Called once per step with gradients on; an objective with running state (a center, a
    /// queue) updates it here.
    func callAsFunction(_ batch: ObjectiveBatch, networks: TeacherStudentNetworks, context: StepContext) -> ObjectiveOutput

    // An objective with settings of its own (a weight) should conform to
    // CustomStringConvertible and name them: checkpoints record the description and refuse to
    // resume under another.

    /// The state the objective keeps across steps (centers, queues, running statistics), by
    /// name: saved in checkpoints and given back to ``loadState(_:)`` on resume, without the
    /// trainer knowing what it is. Empty for a stateless objective.
    var state: [(name: String, tensor: Tensor)] { get }

    /// Restores the tensors ``state`` returned; throws ``ObjectiveStateError`` naming what is
    /// missing or of the wrong shape.
    func loadState(_ tensors: [String: Tensor]) throws

    /// Trainable parameters of the objective itself (a classifier, a predictor, prototypes of
    /// its own), or nil. The trainer optimizes them with the student (DINO's weight-decay
    /// groups, named `objective.*`), clips them and saves them in checkpoints. Default: nil.
    var module: Module? { get }

    /// Throws when the networks cannot serve this objective (iBOT needs a ViT with a mask
    /// token); the trainer calls it once, before the first step. The default accepts any.
    func check(_ networks: TeacherStudentNetworks) throws
}

extension SelfSupervisedObjective {
    public func check(_ networks: TeacherStudentNetworks) throws {}
    /// None by default.
    public var module: Module? { nil }
}

/// Why an objective's saved state or its networks do not fit it.
public struct ObjectiveStateError: Error, CustomStringConvertible, Equatable {
    /// What does not fit.
    public let problem: String
    /// An error saying `problem`.
    public init(_ problem: String) { self.problem = problem }
    public var description: String { problem }
}

/// One named number of a step: a term of the loss or a monitor.
public struct LoggedScalar: Sendable, Equatable {
    /// The key in `metrics.jsonl` (`"teacherEntropy"`).
    public let key: String
    /// The label on the progress line (`"H(t)"`).
    public let label: String
    /// The number.
    public let value: Double
    /// The `printf` format of the progress line (`"%.3f"`).
    public let format: String

    /// A named number.
    public init(_ key: String, label: String, _ value: Double, format: String = "%.4f") {
        (self.key, self.label, self.value, self.format) = (key, label, value, format)
    }
}

/// What an objective returns for a batch.
public struct ObjectiveOutput {
    /// The differentiable loss the trainer back-propagates.
    public var loss: Tensor
    /// Named terms of the loss (iBOT: `clsLoss`, `patchLoss`), logged beside the total.
    public var terms: [LoggedScalar]
    /// Monitors that are not part of the loss (teacher entropy, KL, τ_t).
    public var monitors: [LoggedScalar]

    /// An output; terms and monitors may be empty.
    public init(loss: Tensor, terms: [LoggedScalar] = [], monitors: [LoggedScalar] = []) {
        (self.loss, self.terms, self.monitors) = (loss, terms, monitors)
    }
}

/// The views of a batch as the trainer hands them to an objective.
public struct ObjectiveBatch {
    /// Every view [B, C, H, W]: the global crops first, then the local crops.
    public let views: [Tensor]
    /// How many of ``views`` are global crops (the teacher's inputs in DINO).
    public let globalCount: Int
    /// The images' labels when the dataset has them (for supervised references and probes;
    /// a self-supervised loss must not read them).
    public let labels: [Int]?

    /// A batch whose first `globalCount` views are global crops.
    public init(views: [Tensor], globalCount: Int = 2, labels: [Int]? = nil) {
        precondition(globalCount >= 1 && globalCount <= views.count,
                     "ObjectiveBatch: \(globalCount) global views of \(views.count)")
        (self.views, self.globalCount, self.labels) = (views, globalCount, labels)
    }

    /// The global crops.
    public var globalViews: [Tensor] { Array(views.prefix(globalCount)) }
    /// The local crops.
    public var localViews: [Tensor] { Array(views.dropFirst(globalCount)) }
}

/// Where the run is when the objective is called.
public struct StepContext: Sendable {
    /// The epoch, from 0.
    public let epoch: Int
    /// The step over the whole run, from 0.
    public let step: Int
    /// The run's epochs and steps per epoch (for an objective's own schedules).
    public let epochs: Int, iterationsPerEpoch: Int
    /// The run's seed: an objective that draws random numbers (iBOT's masks) derives them
    /// from it and ``step``, so that a resumed run draws the same ones.
    public let seed: UInt64
    /// Where this process's images start in the step's whole batch (rank × batch size when
    /// `Distributed.world` has several processes, else 0): random numbers drawn per image
    /// should be keyed by `firstSample + i`, so that a run split over processes draws the
    /// same ones as a single process.
    public let firstSample: Int

    /// A position in a run.
    public init(epoch: Int, step: Int, epochs: Int, iterationsPerEpoch: Int, seed: UInt64, firstSample: Int = 0) {
        (self.epoch, self.step, self.epochs, self.iterationsPerEpoch, self.seed, self.firstSample) =
            (epoch, step, epochs, iterationsPerEpoch, seed, firstSample)
    }
}

/// A backbone that maps images [B, C, H, W] to features [B, D].
public protocol FeatureEncoder: Module {
    var featureCount: Int { get }
    func features(_ images: Tensor) -> Tensor
}

extension VisionTransformer: FeatureEncoder {
    /// The [CLS] token's width.
    public var featureCount: Int { configuration.width }
    /// The normalized [CLS] output.
    public func features(_ images: Tensor) -> Tensor { self(images).cls }
}

extension ResNet: FeatureEncoder {
    /// The pooled features.
    public func features(_ images: Tensor) -> Tensor { self(images) }
}

/// The student and its EMA teacher, each a backbone with a DINO head (projection MLP and
/// prototypes). The teacher's parameters never require gradients.
public final class TeacherStudentNetworks {
    /// The two backbones.
    public let student: FeatureEncoder, teacher: FeatureEncoder
    /// Their heads.
    public let studentHead: DINOHead, teacherHead: DINOHead

    /// The pair; the teacher's parameters stop requiring gradients.
    public init(student: FeatureEncoder, studentHead: DINOHead, teacher: FeatureEncoder, teacherHead: DINOHead) {
        (self.student, self.studentHead, self.teacher, self.teacherHead) = (student, studentHead, teacher, teacherHead)
        for p in teacher.parameters + teacherHead.parameters { p.requiresGrad = false }
    }

    /// The student's head logits ⟨w_k, y⟩ [B, K] for each view, with gradients. Views of one
    /// shape go through the networks as one batch (BatchNorm sees them together, as in DINO).
    public func studentLogits(_ views: [Tensor]) -> [Tensor] {
        Self.forward(student, studentHead, views, keepingFeatures: false).logits
    }

    /// The student's backbone features [B, D] and head logits [B, K] for each view, from one
    /// forward pass (for a loss that also acts on the features, as DINOv2's KoLeo term does).
    public func studentForward(_ views: [Tensor]) -> (features: [Tensor], logits: [Tensor]) {
        Self.forward(student, studentHead, views, keepingFeatures: true)
    }

    /// The teacher's head logits for each view, without gradients.
    public func teacherLogits(_ views: [Tensor]) -> [Tensor] {
        withoutGradients { Self.forward(teacher, teacherHead, views, keepingFeatures: false).logits }
    }

    /// Splits the features per view (views on the tape) only when a caller reads them.
    static func forward(_ encoder: FeatureEncoder, _ head: DINOHead, _ views: [Tensor],
                        keepingFeatures: Bool) -> (features: [Tensor], logits: [Tensor]) {
        var features: [Tensor] = [], logits: [Tensor] = []
        var i = 0
        while i < views.count {
            var j = i
            while j < views.count && views[j].shape == views[i].shape { j += 1 }
            let group = Array(views[i..<j])
            let sizes = group.map { $0.shape[0] }
            let f = encoder.features(Tensor.concat(group, alongAxis: 0))
            if keepingFeatures { features += f.split(sizes: sizes, alongAxis: 0) }
            logits += head(f).logits.split(sizes: sizes, alongAxis: 0)
            i = j
        }
        return (features, logits)
    }
}
