import Kappa
import KappaNN

/// The reference training steps of BENCHMARKS.md (`ref-tiny`, `ref-micro`, `ref-resnet`):
/// teacher forward on the two global crops without gradient, student forward and backward on
/// all crops, the DINO-vMF loss (vMF logits with the approximate normalizer, probability
/// centering), per-parameter clipping at 3.0, an AdamW step and the teacher's EMA update, on
/// fixed random crops (no augmentation). The benchmarks and the memory check run it; the
/// PyTorch peer in `Benchmarks/peers/` is the same step.
public final class ReferenceStep {
    public struct Workload: Sendable {
        public let name: String
        public let backbone: BackboneChoice
        public let channels: Int
        public let batch: Int, globalSize: Int, localSize: Int, localCrops: Int
        public let headHidden: Int, bottleneck: Int, prototypes: Int
        /// BatchNorm after the head's hidden layers (the default `DINOvMF` run has it).
        public let headBatchNorm: Bool
        public let emaMomentum: Double

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
    }

    public let workload: Workload
    public let student: FeatureEncoder, teacher: FeatureEncoder
    public let studentHead: DINOHead, teacherHead: DINOHead
    public let loss: DINOLoss
    public let optimizer: AdamW
    public let globals: Tensor, locals: Tensor

    public init(_ w: Workload, seed: UInt64 = 0) {
        workload = w
        var g = RandomGenerator(seed: seed)
        let student = w.backbone.make(using: &g)
        self.student = student
        teacher = w.backbone.make(using: &g)
        func head(_ g: inout RandomGenerator) -> DINOHead {
            DINOHead(inFeatures: student.featureCount, prototypes: w.prototypes, hidden: w.headHidden, bottleneck: w.bottleneck,
                     batchNorm: w.headBatchNorm, normLastLayer: false, using: &g)
        }
        studentHead = head(&g)
        teacherHead = head(&g)
        teacher.copyParameters(from: student)
        teacherHead.copyParameters(from: studentHead)
        for p in teacher.parameters + teacherHead.parameters { p.requiresGrad = false }
        var c = DINOLossConfiguration()
        c.dimension = w.bottleneck
        (c.studentTemperature, c.teacherTemperature, c.warmupTeacherTemperature, c.centerMomentum) = (0.1, 0.04, 0.04, 0.9)
        loss = DINOLoss(prototypes: w.prototypes, configuration: c)
        optimizer = AdamW(groups: ParameterGroup.dinoGroups(student, learningRate: 5e-4, weightDecay: 0.04, prefix: "backbone.")
                          + ParameterGroup.dinoGroups(studentHead, learningRate: 5e-4, weightDecay: 0.04, prefix: "head."))
        let ch = w.channels
        globals = Tensor.randomNormal([2 * w.batch, ch, w.globalSize, w.globalSize], using: &g)
        locals = Tensor.randomNormal([w.localCrops * w.batch, ch, w.localSize, w.localSize], using: &g)
    }

    /// The number of the student's parameters (backbone and head).
    public var parameterCount: Int { (student.parameters + studentHead.parameters).reduce(0) { $0 + $1.count } }

    /// One step; returns the loss.
    @discardableResult
    public func step() -> Double {
        let b = workload.batch
        let teacherOut = withoutGradients {
            teacherHead(teacher.features(globals)).logits.split(sizes: [b, b], alongAxis: 0)
        }
        let studentGlobal = studentHead(student.features(globals)).logits.split(sizes: [b, b], alongAxis: 0)
        let studentLocal = studentHead(student.features(locals)).logits.split(sizes: Array(repeating: b, count: workload.localCrops),
                                                                              alongAxis: 0)
        let r = loss(studentDots: studentGlobal + studentLocal, studentNorms: studentHead.prototypeNorms,
                     teacherDots: teacherOut, teacherNorms: teacherHead.prototypeNorms, epoch: 0)
        optimizer.zeroGrad()
        r.loss.backward()
        Gradients.clipPerParameter(student, maxNorm: 3)
        Gradients.clipPerParameter(studentHead, maxNorm: 3)
        optimizer.step()
        emaUpdate(teacher: teacher, student: student, momentum: workload.emaMomentum)
        emaUpdate(teacher: teacherHead, student: studentHead, momentum: workload.emaMomentum)
        return r.loss.item()
    }
}
