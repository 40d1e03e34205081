import Kappa
import KappaNN

/// The reference training steps of BENCHMARKS.md (`ref-tiny`, `ref-micro`, `ref-resnet`,
/// `ref-ibot-micro`):
/// teacher forward on the two global crops without gradient, student forward and backward on
/// all crops, the DINO-vMF loss (vMF logits with the approximate normalizer, probability
/// centering), per-parameter clipping at 3.0, an AdamW step and the teacher's EMA update, on
/// fixed random crops (no augmentation). The benchmarks and the memory check run it; the
/// PyTorch peer in `Benchmarks/peers/` is the same step.
public final class ReferenceStep {
    /// One of BENCHMARKS.md's workloads: the networks, the crops and the head.
    public struct Workload: Sendable {
        /// The name `KappaBench` and the peer print.
        public let name: String
        /// The backbone.
        public let backbone: BackboneChoice
        /// Image channels.
        public let channels: Int
        /// Images per step, the crops' sides and the local crops per image.
        public let batch: Int, globalSize: Int, localSize: Int, localCrops: Int
        /// The head's sizes.
        public let headHidden: Int, bottleneck: Int, prototypes: Int
        /// BatchNorm after the head's hidden layers (the default `DINOvMF` run has it).
        public let headBatchNorm: Bool
        /// The teacher's constant EMA momentum.
        public let emaMomentum: Double
        /// iBOT-vMF: blockwise masks on the global views, the masked-patch term through the
        /// shared head with its own center (the ViT gets a mask token).
        public var ibot = false

        /// 32×32×3, patch 4, ViT 192×6 (3 heads), head 1024/256/4096, batch 64, 2 × 32² + 6 × 16².
        public static let refTiny = Workload(name: "ref-tiny", backbone: .vit(.refTiny), channels: 3, batch: 64, globalSize: 32,
                                             localSize: 16, localCrops: 6, headHidden: 1024, bottleneck: 256, prototypes: 4096,
                                             headBatchNorm: false, emaMomentum: 0.996)
        /// 28×28×1, patch 7, ViT 64×4 (4 heads), head 256/64/512, batch 32, 2 × 28² + 4 × 14².
        public static let refMicro = Workload(name: "ref-micro", backbone: .vit(.refMicro), channels: 1, batch: 32, globalSize: 28,
                                              localSize: 14, localCrops: 4, headHidden: 256, bottleneck: 64, prototypes: 512,
                                              headBatchNorm: false, emaMomentum: 0.996)
        /// The step of `swift run -c release DINOvMF` with its defaults (``DINOConfiguration``):
        /// ResNet-18 layout of width 8 on 28×28×1, head 256/64/256 with BatchNorm, batch 64,
        /// 2 × 28² + 4 × 14², EMA 0.99; 292,152 student parameters.
        public static let refResNet = Workload(name: "ref-resnet", backbone: DINOConfiguration().backbone, channels: 1, batch: 64,
                                               globalSize: 28, localSize: 14, localCrops: 4, headHidden: 256, bottleneck: 64,
                                               prototypes: 256, headBatchNorm: true, emaMomentum: 0.99)
        /// ref-micro with iBOT-vMF: masks on half of the global views (masked share 0.1–0.5,
        /// ``BlockMasking``'s defaults), the patch term on the masked tokens.
        public static let refIBOTMicro: Workload = {
            var v = ViTConfiguration.refMicro
            v.maskToken = true
            var w = Workload(name: "ref-ibot-micro", backbone: .vit(v), channels: 1, batch: 32, globalSize: 28, localSize: 14,
                             localCrops: 4, headHidden: 256, bottleneck: 64, prototypes: 512, headBatchNorm: false,
                             emaMomentum: 0.996)
            w.ibot = true
            return w
        }()
    }

    /// What the step trains.
    public let workload: Workload
    /// The trainer the step runs through: the same loop as `DINOvMF`'s, with constant
    /// schedules (learning rate 5e-4, weight decay 0.04, the workload's EMA momentum), clipping
    /// at 3 and no frozen last layer.
    public let trainer: TeacherStudentTrainer
    /// The fixed views: two global crops and the workload's local crops of `batch` images each.
    public let views: [Tensor]

    /// The step of `w`, its networks initialized from `seed`.
    public init(_ w: Workload, seed: UInt64 = 0) {
        var c = DINOConfiguration()
        c.backbone = w.backbone
        (c.prototypes, c.headHidden, c.bottleneck, c.headBatchNorm, c.normalizedPrototypes) = (w.prototypes, w.headHidden, w.bottleneck,
                                                                                               w.headBatchNorm, false)
        c.loss.dimension = w.bottleneck
        (c.batchSize, c.epochs, c.warmupEpochs, c.freezeLastLayerEpochs, c.seed) = (w.batch, 1, 0, 0, seed)
        c.baseLearningRate = 5e-4 * 256 / Double(w.batch)
        c.minLearningRate = c.baseLearningRate * Double(w.batch) / 256
        (c.weightDecay, c.weightDecayEnd) = (0.04, 0.04)
        (c.teacherMomentum, c.teacherMomentumEnd) = (w.emaMomentum, w.emaMomentum)
        if w.ibot { c.ibot = IBOTSettings(following: c.loss) }
        do {
            trainer = try TeacherStudentTrainer(configuration: c, iterationsPerEpoch: 1)
        } catch {
            preconditionFailure("ReferenceStep: \(error)")
        }
        workload = w
        var g = RandomGenerator(seed: seed &+ 1)
        let globals = Tensor.randomNormal([2 * w.batch, w.channels, w.globalSize, w.globalSize], using: &g)
        let locals = Tensor.randomNormal([w.localCrops * w.batch, w.channels, w.localSize, w.localSize], using: &g)
        views = globals.split(sizes: [w.batch, w.batch], alongAxis: 0).map { $0.contiguous() }
            + (w.localCrops > 0 ? locals.split(sizes: Array(repeating: w.batch, count: w.localCrops), alongAxis: 0).map { $0.contiguous() } : [])
    }

    /// The number of the student's parameters (backbone and head).
    public var parameterCount: Int { (trainer.student.parameters + trainer.studentHead.parameters).reduce(0) { $0 + $1.count } }

    /// One step; returns the loss.
    @discardableResult
    public func step() -> Double {
        trainer.step(ObjectiveBatch(views: views, globalCount: 2)).loss
    }
}
