import Foundation
import Kappa
import KappaNN

/// A backbone that maps images [B, C, H, W] to features [B, D].
public protocol FeatureEncoder: Module {
    var featureCount: Int { get }
    func features(_ images: Tensor) -> Tensor
}

extension VisionTransformer: FeatureEncoder {
    public var featureCount: Int { configuration.width }
    public func features(_ images: Tensor) -> Tensor { self(images).cls }
}

extension ResNet: FeatureEncoder {
    public func features(_ images: Tensor) -> Tensor { self(images) }
}

/// Which backbone to train.
public enum BackboneChoice: Codable, Sendable, Equatable {
    case vit(ViTConfiguration)
    case resnet(width: Int, channels: Int)

    /// A freshly initialized backbone of this kind.
    public func make(using g: inout RandomGenerator) -> FeatureEncoder {
        switch self {
        case .vit(let c): return VisionTransformer(c, using: &g)
        case .resnet(let w, let c): return ResNet(channels: c, width: w, using: &g)
        }
    }
}

/// Everything a DINO / DINO-vMF run is made of; the defaults are tuned for small images on
/// two cores (see README.md for what was tried).
public struct DINOConfiguration: Codable, Sendable, Equatable {
    /// A ResNet-18 layout of width 8: on the built-in shapes and on MNIST it learns faster
    /// than ViT-micro in the same time (README); iBOT needs a ViT.
    public var backbone = BackboneChoice.resnet(width: 8, channels: 1)
    public var prototypes = 256
    public var headHidden = 256
    public var bottleneck = 64
    public var headLayers = 3
    /// BatchNorm after the head's hidden layers (DINO's `use_bn_in_head`). At initialization a
    /// small ViT maps all images to nearly the same [CLS] output; standardizing over the batch
    /// makes the head see their differences, which small data needs (see README).
    public var headBatchNorm = true
    /// L2-normalized prototypes (g fixed at 1), DINO's default; DINO-vMF learns the norms.
    public var normalizedPrototypes = false
    /// Decay the prototype scale g as DINO's parameter groups do.
    public var decayPrototypeScale = true
    public var loss = DINOLossConfiguration()
    /// Small-image views by default (``MultiCropAugmentation/smallImages``); DINO's are
    /// ``MultiCropAugmentation/dino``.
    public var augmentation = MultiCropAugmentation.smallImages
    public var epochs = 10
    public var batchSize = 64
    /// lr = baseLearningRate · batch/256 after warmup, cosine to ``minLearningRate``. 1e-2
    /// suits the ResNet (BatchNorm throughout); 2e-3 suits the ViTs.
    public var baseLearningRate = 1e-2
    public var minLearningRate = 1e-5
    public var warmupEpochs = 2
    public var weightDecay = 0.04, weightDecayEnd = 0.4
    public var teacherMomentum = 0.99
    public var clipGradient = 3.0
    public var freezeLastLayerEpochs = 1
    public var seed: UInt64 = 0
    /// iBOT: masked patch prediction added to the [CLS] loss (needs a ViT backbone).
    public var ibot: IBOTSettings?

    public init() {
        loss.dimension = bottleneck
        loss.teacherTemperature = 0.04
        loss.warmupTeacherTemperature = 0.04
    }

    /// DINO as published: normalized prototypes, no vMF term, logit centering.
    public mutating func useDINO() {
        normalizedPrototypes = true
        loss.vmfNormalization = false
        loss.probabilityCentering = false
    }
}

/// The iBOT part of a run: the masked student's patch outputs predict the teacher's for the
/// same global view; the shared head maps patch tokens too.
public struct IBOTSettings: Codable, Sendable, Equatable {
    /// λ₂, the weight of the patch term (λ₁ = 1 for the [CLS] term).
    public var patchWeight = 1.0
    /// The patch term's loss settings: its own teacher temperature and centering; the vMF
    /// switches follow the [CLS] term's unless set here.
    public var patch = DINOLossConfiguration()
    public var masking = BlockMasking()

    public init() {}
}

/// What one training step reports.
public struct StepLog: Codable, Sendable {
    public let epoch: Int, step: Int
    public let loss: Double, learningRate: Double, weightDecay: Double, teacherTemperature: Double, teacherMomentum: Double
    public let teacherEntropy: Double, klDivergence: Double
}

/// The evaluation of a run: the trained teacher against the two baselines of the same split.
public struct EvaluationReport: Codable, Sendable {
    public var epoch: Int
    public var knn: Double
    public var linearProbe: Double?
    public var knnRawPixels: Double
    public var knnRandomInit: Double
    /// Prototypes that are the arg-max for at least one evaluation image, of K.
    public var utilization: Int, prototypes: Int
    public var prototypeNorms: Evaluation.Summary
    /// kNN accuracy of test samples by the norm quartile of their arg-max prototype.
    public var knnByNormQuartile: [Double]
    public var quartileCounts: [Int]
}

/// Trains a student and an EMA teacher with the DINO / DINO-vMF loss: AdamW with cosine
/// learning-rate and weight-decay schedules, a cosine teacher-momentum schedule, per-parameter
/// clipping, the frozen last layer in the first epochs, multi-crop views.
public final class DINOTrainer {
    public let configuration: DINOConfiguration
    public let student: FeatureEncoder, teacher: FeatureEncoder
    public let studentHead: DINOHead, teacherHead: DINOHead
    /// The [CLS] loss (for iBOT, the [CLS] term of ``ibotLoss``).
    public let loss: DINOLoss
    /// The iBOT loss when the configuration has ``DINOConfiguration/ibot``.
    public let ibotLoss: IBOTLoss?
    public let optimizer: AdamW
    public let train: ImageDataset
    public private(set) var epoch = 0, step = 0
    /// The generator that seeds data loading; saved in checkpoints.
    public private(set) var generator: RandomGenerator
    let iterationsPerEpoch: Int
    let lrSchedule: [Double], wdSchedule: [Double], momentumSchedule: [Double]

    public init(configuration c: DINOConfiguration, train: ImageDataset) {
        precondition(train.count >= c.batchSize, "DINOTrainer: \(train.count) images for batch \(c.batchSize)")
        configuration = c
        self.train = train
        var g = RandomGenerator(seed: c.seed)
        student = c.backbone.make(using: &g)
        studentHead = DINOHead(inFeatures: student.featureCount, prototypes: c.prototypes, layers: c.headLayers,
                               hidden: c.headHidden, bottleneck: c.bottleneck, batchNorm: c.headBatchNorm, normLastLayer: c.normalizedPrototypes,
                               using: &g)
        var tg = RandomGenerator(seed: c.seed ^ 0x7EAC)
        teacher = c.backbone.make(using: &tg)
        teacherHead = DINOHead(inFeatures: teacher.featureCount, prototypes: c.prototypes, layers: c.headLayers,
                               hidden: c.headHidden, bottleneck: c.bottleneck, batchNorm: c.headBatchNorm, normLastLayer: c.normalizedPrototypes,
                               using: &tg)
        teacher.copyParameters(from: student)
        teacherHead.copyParameters(from: studentHead)
        for p in teacher.parameters + teacherHead.parameters { p.requiresGrad = false }
        var lossConfig = c.loss
        lossConfig.dimension = c.bottleneck
        if var settings = c.ibot {
            guard case .vit(let v) = c.backbone, v.maskToken else {
                preconditionFailure("DINOTrainer: iBOT needs a ViT backbone with a mask token")
            }
            settings.patch.dimension = c.bottleneck
            ibotLoss = IBOTLoss(prototypes: c.prototypes, patchPrototypes: c.prototypes, cls: lossConfig, patch: settings.patch,
                                clsWeight: 1, patchWeight: settings.patchWeight)
            loss = ibotLoss!.clsLoss
        } else {
            ibotLoss = nil
            loss = DINOLoss(prototypes: c.prototypes, configuration: lossConfig)
        }
        let lr = c.baseLearningRate * Double(c.batchSize) / 256
        optimizer = AdamW(groups: ParameterGroup.dinoGroups(student, learningRate: lr, weightDecay: c.weightDecay, prefix: "backbone.")
                          + ParameterGroup.dinoGroups(studentHead, learningRate: lr, weightDecay: c.weightDecay,
                                                      decayPrototypeScale: c.decayPrototypeScale, prefix: "head."))
        iterationsPerEpoch = train.count / c.batchSize
        lrSchedule = Schedule.cosine(base: lr, final: c.minLearningRate, epochs: c.epochs, iterationsPerEpoch: iterationsPerEpoch,
                                     warmupEpochs: c.warmupEpochs)
        wdSchedule = Schedule.cosine(base: c.weightDecay, final: c.weightDecayEnd, epochs: c.epochs, iterationsPerEpoch: iterationsPerEpoch)
        momentumSchedule = Schedule.cosine(base: c.teacherMomentum, final: 1, epochs: c.epochs, iterationsPerEpoch: iterationsPerEpoch)
        generator = g
    }

    /// Whether all epochs are done.
    public var isFinished: Bool { epoch >= configuration.epochs }

    /// Student and teacher head outputs for the views, globals batched together and locals batched together.
    func forward(_ encoder: FeatureEncoder, _ head: DINOHead, _ views: [Tensor]) -> [Tensor] {
        var outputs: [Tensor] = []
        var i = 0
        while i < views.count {
            var j = i
            while j < views.count && views[j].shape == views[i].shape { j += 1 }
            let group = Array(views[i..<j])
            let logits = head(encoder.features(Tensor.concat(group, alongAxis: 0))).logits
            outputs += logits.split(sizes: group.map { $0.shape[0] }, alongAxis: 0)
            i = j
        }
        return outputs
    }

    /// Runs the rest of the current epoch; `onStep` sees every step, `shouldStop` is asked
    /// before each (Ctrl-C). Returns false when stopped early or when the loss became NaN.
    @discardableResult
    public func trainEpoch(onStep: (StepLog) -> Void = { _ in }, shouldStop: () -> Bool = { false }) -> Bool {
        let c = configuration
        let loader = MultiCropLoader(dataset: train, augmentation: c.augmentation, batchSize: c.batchSize, seed: c.seed, epoch: epoch)
        defer { loader.stop() }
        // A resumed run skips the batches this epoch already trained on.
        let done = step - epoch * iterationsPerEpoch
        for _ in 0..<done { _ = loader.next() }
        student.train(); studentHead.train()
        while let batch = loader.next() {
            if shouldStop() { return false }
            let it = Swift.min(step, lrSchedule.count - 1)
            optimizer.setSchedule(learningRate: lrSchedule[it], weightDecay: wdSchedule[it])
            let result: DINOLoss.Result
            if let ibotLoss, let settings = c.ibot {
                result = ibotStep(ibotLoss, settings, batch.views)
            } else {
                let teacherOut = withoutGradients { forward(teacher, teacherHead, Array(batch.views.prefix(2))) }
                let studentOut = forward(student, studentHead, batch.views)
                result = loss(studentDots: studentOut, studentNorms: studentHead.prototypeNorms,
                              teacherDots: teacherOut, teacherNorms: teacherHead.prototypeNorms, epoch: epoch)
            }
            let value = result.loss.item()
            guard value.isFinite else {
                onStep(StepLog(epoch: epoch, step: step, loss: value, learningRate: lrSchedule[it], weightDecay: wdSchedule[it],
                               teacherTemperature: result.teacherTemperature, teacherMomentum: momentumSchedule[it],
                               teacherEntropy: result.teacherEntropy, klDivergence: result.klDivergence))
                return false
            }
            optimizer.zeroGrad()
            result.loss.backward()
            Gradients.clipPerParameter(student, maxNorm: c.clipGradient)
            Gradients.clipPerParameter(studentHead, maxNorm: c.clipGradient)
            Gradients.cancelLastLayer(studentHead, epoch: epoch, freezeEpochs: c.freezeLastLayerEpochs)
            optimizer.step()
            emaUpdate(teacher: teacher, student: student, momentum: momentumSchedule[it])
            emaUpdate(teacher: teacherHead, student: studentHead, momentum: momentumSchedule[it])
            onStep(StepLog(epoch: epoch, step: step, loss: value, learningRate: lrSchedule[it], weightDecay: wdSchedule[it],
                           teacherTemperature: result.teacherTemperature, teacherMomentum: momentumSchedule[it],
                           teacherEntropy: result.teacherEntropy, klDivergence: result.klDivergence))
            step += 1
        }
        epoch += 1
        return true
    }

    /// One iBOT forward: masks for the global views (from the run's seed and the step), the
    /// masked student and the unmasked teacher on the global views, the student alone on the
    /// local views, the shared head on [CLS] and patch tokens. Returns the [CLS] term's
    /// monitors with the total loss.
    func ibotStep(_ ibotLoss: IBOTLoss, _ settings: IBOTSettings, _ views: [Tensor]) -> DINOLoss.Result {
        guard let studentViT = student as? VisionTransformer, let teacherViT = teacher as? VisionTransformer else {
            preconditionFailure("iBOT needs ViT backbones")
        }
        let globals = Tensor.concat(Array(views.prefix(2)), alongAxis: 0)
        let b = views[0].shape[0]
        let grid = views[0].shape[2] / studentViT.configuration.patchSize
        var g = RandomGenerator(seed: configuration.seed ^ (UInt64(step) &* 0x9E37_79B9_7F4A_7C15) ^ 0x1B07)
        let masks = settings.masking.masks(count: 2 * b, height: grid, width: grid, using: &g)
        let t = withoutGradients { ibotHeads(teacherHead, teacherViT(globals), batch: b) }
        let s = ibotHeads(studentHead, studentViT(globals, mask: masks), batch: b)
        let locals = views.count > 2 ? forward(student, studentHead, Array(views.dropFirst(2))) : []
        let m = masks.split(sizes: [b, b], alongAxis: 0)
        let r = ibotLoss(studentCLS: s.cls + locals, studentNorms: studentHead.prototypeNorms, studentPatches: s.patches,
                         studentPatchNorms: studentHead.prototypeNorms, masks: m, teacherCLS: t.cls,
                         teacherNorms: teacherHead.prototypeNorms, teacherPatches: t.patches,
                         teacherPatchNorms: teacherHead.prototypeNorms, epoch: epoch)
        return DINOLoss.Result(loss: r.loss, teacherEntropy: r.cls.teacherEntropy, klDivergence: r.cls.klDivergence,
                               teacherTemperature: r.cls.teacherTemperature)
    }

    /// Evaluates the teacher on frozen features: kNN (k = 20, T = 0.07) and a linear probe
    /// from `reference` (the labeled training split) to `test`, the two baselines (raw pixels,
    /// the randomly initialized network), prototype utilization and norms on `test`.
    public func evaluate(reference: ImageDataset, test: ImageDataset, linearProbe: Bool = true) -> EvaluationReport {
        guard let trainLabels = reference.labels, let testLabels = test.labels else {
            preconditionFailure("evaluate: both splits need labels")
        }
        let classes = Swift.max(reference.classCount, test.classCount)
        let norm = (configuration.augmentation.mean, configuration.augmentation.std)
        teacher.eval(); teacherHead.eval()
        defer { teacher.train(); teacherHead.train() }
        let fTrain = Evaluation.features(of: reference, normalize: norm) { teacher.features($0) }
        let fTest = Evaluation.features(of: test, normalize: norm) { teacher.features($0) }
        let predictions = Evaluation.knnPredict(train: fTrain, trainLabels: trainLabels, test: fTest, classes: classes)
        let knn = Evaluation.accuracy(predictions, testLabels)
        let probe = linearProbe ? Evaluation.linearProbe(train: fTrain, trainLabels: trainLabels, test: fTest,
                                                         testLabels: testLabels, classes: classes) : nil
        let (raw, randomKNN) = baselines(reference: reference, test: test, classes: classes)
        let logits = withoutGradients { teacherHead(fTest).logits }
        let argmax = logits.argmax(alongAxis: 1).scalars(as: Double.self).map { Int($0) }
        let norms = teacherHead.prototypeNorms.scalars(as: Double.self)
        let byNorm = Evaluation.accuracyByPrototypeNorm(predictions: predictions, labels: testLabels, argmax: argmax, norms: norms)
        return EvaluationReport(epoch: epoch, knn: knn, linearProbe: probe, knnRawPixels: raw, knnRandomInit: randomKNN,
                                utilization: Set(argmax).count, prototypes: configuration.prototypes,
                                prototypeNorms: Evaluation.Summary(norms), knnByNormQuartile: byNorm.map(\.accuracy),
                                quartileCounts: byNorm.map(\.count))
    }

    /// kNN on raw pixels and on the randomly initialized backbone for a pair of splits: they
    /// do not change during a run, so they are computed once per pair.
    private var baselineCache: (key: String, raw: Double, random: Double)?

    func baselines(reference: ImageDataset, test: ImageDataset, classes: Int) -> (raw: Double, random: Double) {
        let key = reference.source + "|" + test.source
        if let c = baselineCache, c.key == key { return (c.raw, c.random) }
        let trainLabels = reference.labels!, testLabels = test.labels!
        let norm = (configuration.augmentation.mean, configuration.augmentation.std)
        let raw = Evaluation.accuracy(Evaluation.knnPredict(train: Evaluation.pixels(of: reference), trainLabels: trainLabels,
                                                            test: Evaluation.pixels(of: test), classes: classes), testLabels)
        var g = RandomGenerator(seed: configuration.seed)
        let initial = configuration.backbone.make(using: &g)  // the student's initialization
        initial.eval()
        let rTrain = Evaluation.features(of: reference, normalize: norm) { initial.features($0) }
        let rTest = Evaluation.features(of: test, normalize: norm) { initial.features($0) }
        let random = Evaluation.accuracy(Evaluation.knnPredict(train: rTrain, trainLabels: trainLabels, test: rTest, classes: classes),
                                         testLabels)
        baselineCache = (key, raw, random)
        return (raw, random)
    }

    /// Saves the whole run (student, teacher, optimizer, center, position, configuration) atomically.
    public func save(to url: URL) throws {
        let config = String(decoding: try JSONEncoder().encode(configuration), as: UTF8.self)
        try TrainingCheckpoint.save(to: url, student: StudentTeacherPair(student, studentHead), teacher: StudentTeacherPair(teacher, teacherHead),
                                    optimizer: optimizer,
                                    extra: [("center", loss.centering.center)] + (ibotLoss.map { [("patchCenter", $0.patchLoss.centering.center)] } ?? []),
                                    state: TrainingState(step: step, epoch: epoch, generator: generator,
                                                         configuration: ["dino": config]))
    }

    /// Restores a run saved by ``save(to:)``; the trainer must have the same configuration.
    public func resume(from url: URL) throws {
        let (state, extra) = try TrainingCheckpoint.load(from: url, student: StudentTeacherPair(student, studentHead),
                                                         teacher: StudentTeacherPair(teacher, teacherHead), optimizer: optimizer)
        guard let center = extra["center"], center.shape == loss.centering.center.shape else {
            throw CheckpointError(path: url.path, problem: "no center of shape \(loss.centering.center.shape)")
        }
        loss.centering.center = center
        if let ibotLoss {
            guard let patch = extra["patchCenter"], patch.shape == ibotLoss.patchLoss.centering.center.shape else {
                throw CheckpointError(path: url.path, problem: "no patch center of shape \(ibotLoss.patchLoss.centering.center.shape)")
            }
            ibotLoss.patchLoss.centering.center = patch
        }
        (step, epoch, generator) = (state.step, state.epoch, state.generator)
    }

    /// Reads the configuration stored in a checkpoint written by ``save(to:)``.
    public static func configuration(in url: URL) throws -> DINOConfiguration {
        let (_, meta) = try SafeTensors.read(url)
        guard let json = meta["kappa.training_state"],
              let state = try? JSONDecoder().decode(TrainingState.self, from: Data(json.utf8)),
              let config = state.configuration["dino"] else {
            throw CheckpointError(path: url.path, problem: "not a DINOvMF checkpoint (no configuration in the metadata)")
        }
        do {
            return try JSONDecoder().decode(DINOConfiguration.self, from: Data(config.utf8))
        } catch {
            throw CheckpointError(path: url.path, problem: "its configuration cannot be read by this version of Kappa (\(error))")
        }
    }
}

/// A backbone and its head as one module, named `backbone.*` and `head.*` in checkpoints.
final class StudentTeacherPair: Module {
    let backbone: Module, head: DINOHead
    init(_ backbone: Module, _ head: DINOHead) {
        self.backbone = backbone
        self.head = head
        super.init()
    }
}
