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
    public struct Workload: Sendable {
        public let name: String
        public let backbone: BackboneChoice
        public let channels: Int
        public let batch: Int, globalSize: Int, localSize: Int, localCrops: Int
        public let headHidden: Int, bottleneck: Int, prototypes: Int
        /// BatchNorm after the head's hidden layers (the default `DINOvMF` run has it).
        public let headBatchNorm: Bool
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

    public let workload: Workload
    public let student: FeatureEncoder, teacher: FeatureEncoder
    public let studentHead: DINOHead, teacherHead: DINOHead
    public let loss: DINOLoss
    /// The iBOT loss of an iBOT workload (its [CLS] term is ``loss``).
    public let ibotLoss: IBOTLoss?
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
        if w.ibot {
            let ibot = IBOTLoss(prototypes: w.prototypes, patchPrototypes: w.prototypes, cls: c, patch: c)
            ibotLoss = ibot
            loss = ibot.clsLoss
        } else {
            ibotLoss = nil
            loss = DINOLoss(prototypes: w.prototypes, configuration: c)
        }
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
        let studentLocal = { self.studentHead(self.student.features(self.locals)).logits
                                 .split(sizes: Array(repeating: b, count: self.workload.localCrops), alongAxis: 0) }
        let total: Tensor
        if let ibotLoss, let studentViT = student as? VisionTransformer, let teacherViT = teacher as? VisionTransformer {
            // As DINOTrainer's iBOT step: fresh masks every step, the unmasked teacher.
            let grid = workload.globalSize / studentViT.configuration.patchSize
            var g = RandomGenerator(seed: UInt64(steps) &* 0x9E37_79B9_7F4A_7C15 ^ 0x1B07)
            let masks = BlockMasking().masks(count: 2 * b, height: grid, width: grid, using: &g)
            let t = withoutGradients { ibotHeads(teacherHead, teacherViT(globals), batch: b) }
            let s = ibotHeads(studentHead, studentViT(globals, mask: masks), batch: b)
            total = ibotLoss(studentCLS: s.cls + studentLocal(), studentNorms: studentHead.prototypeNorms, studentPatches: s.patches,
                             studentPatchNorms: studentHead.prototypeNorms, masks: masks.split(sizes: [b, b], alongAxis: 0),
                             teacherCLS: t.cls, teacherNorms: teacherHead.prototypeNorms, teacherPatches: t.patches,
                             teacherPatchNorms: teacherHead.prototypeNorms, epoch: 0).loss
        } else {
            let teacherOut = withoutGradients {
                teacherHead(teacher.features(globals)).logits.split(sizes: [b, b], alongAxis: 0)
            }
            let studentGlobal = studentHead(student.features(globals)).logits.split(sizes: [b, b], alongAxis: 0)
            total = loss(studentDots: studentGlobal + studentLocal(), studentNorms: studentHead.prototypeNorms,
                         teacherDots: teacherOut, teacherNorms: teacherHead.prototypeNorms, epoch: 0).loss
        }
        steps += 1
        optimizer.zeroGrad()
        total.backward()
        Gradients.clipPerParameter(student, maxNorm: 3)
        Gradients.clipPerParameter(studentHead, maxNorm: 3)
        optimizer.step()
        emaUpdate(teacher: teacher, student: student, momentum: workload.emaMomentum)
        emaUpdate(teacher: teacherHead, student: studentHead, momentum: workload.emaMomentum)
        return total.item()
    }

    /// Steps taken (seeds each step's iBOT masks).
    private var steps = 0
}
