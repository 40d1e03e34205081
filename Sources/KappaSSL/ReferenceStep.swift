import Kappa
import KappaNN

/// The reference training step of BENCHMARKS.md (`ref-tiny`, `ref-micro`): teacher forward on
/// the two global crops without gradient, student forward and backward on all crops, the
/// DINO-vMF loss (vMF logits with the approximate normalizer, probability centering),
/// per-parameter clipping at 3.0, an AdamW step and the teacher's EMA update, on fixed random
/// crops (no augmentation). The benchmarks and the memory check run it; the PyTorch peer in
/// `Benchmarks/peers/` is the same step.
public final class ReferenceStep {
    public struct Workload: Sendable {
        public let name: String
        public let vit: ViTConfiguration
        public let batch: Int, globalSize: Int, localSize: Int, localCrops: Int
        public let headHidden: Int, bottleneck: Int, prototypes: Int

        /// 32×32×3, patch 4, ViT 192×6 (3 heads), head 1024/256/4096, batch 64, 2 × 32² + 6 × 16².
        public static let refTiny = Workload(name: "ref-tiny", vit: .refTiny, batch: 64, globalSize: 32, localSize: 16, localCrops: 6,
                                             headHidden: 1024, bottleneck: 256, prototypes: 4096)
        /// 28×28×1, patch 7, ViT 64×4 (4 heads), head 256/64/512, batch 32, 2 × 28² + 4 × 14².
        public static let refMicro = Workload(name: "ref-micro", vit: .refMicro, batch: 32, globalSize: 28, localSize: 14, localCrops: 4,
                                              headHidden: 256, bottleneck: 64, prototypes: 512)
    }

    public let workload: Workload
    public let student: VisionTransformer, teacher: VisionTransformer
    public let studentHead: DINOHead, teacherHead: DINOHead
    public let loss: DINOLoss
    public let optimizer: AdamW
    public let globals: Tensor, locals: Tensor

    public init(_ w: Workload, seed: UInt64 = 0) {
        workload = w
        var g = RandomGenerator(seed: seed)
        student = VisionTransformer(w.vit, using: &g)
        teacher = VisionTransformer(w.vit, using: &g)
        studentHead = DINOHead(inFeatures: w.vit.width, prototypes: w.prototypes, hidden: w.headHidden, bottleneck: w.bottleneck,
                               normLastLayer: false, using: &g)
        teacherHead = DINOHead(inFeatures: w.vit.width, prototypes: w.prototypes, hidden: w.headHidden, bottleneck: w.bottleneck,
                               normLastLayer: false, using: &g)
        teacher.copyParameters(from: student)
        teacherHead.copyParameters(from: studentHead)
        for p in teacher.parameters + teacherHead.parameters { p.requiresGrad = false }
        var c = DINOLossConfiguration()
        c.dimension = w.bottleneck
        (c.studentTemperature, c.teacherTemperature, c.warmupTeacherTemperature, c.centerMomentum) = (0.1, 0.04, 0.04, 0.9)
        loss = DINOLoss(prototypes: w.prototypes, configuration: c)
        optimizer = AdamW(groups: ParameterGroup.dinoGroups(student, learningRate: 5e-4, weightDecay: 0.04, prefix: "backbone.")
                          + ParameterGroup.dinoGroups(studentHead, learningRate: 5e-4, weightDecay: 0.04, prefix: "head."))
        let ch = w.vit.channels
        globals = Tensor.randomNormal([2 * w.batch, ch, w.globalSize, w.globalSize], using: &g)
        locals = Tensor.randomNormal([w.localCrops * w.batch, ch, w.localSize, w.localSize], using: &g)
    }

    /// One step; returns the loss.
    @discardableResult
    public func step() -> Double {
        let b = workload.batch
        let teacherOut = withoutGradients {
            teacherHead(teacher(globals).cls).logits.split(sizes: [b, b], alongAxis: 0)
        }
        let studentGlobal = studentHead(student(globals).cls).logits.split(sizes: [b, b], alongAxis: 0)
        let studentLocal = studentHead(student(locals).cls).logits.split(sizes: Array(repeating: b, count: workload.localCrops), alongAxis: 0)
        let r = loss(studentDots: studentGlobal + studentLocal, studentNorms: studentHead.prototypeNorms,
                     teacherDots: teacherOut, teacherNorms: teacherHead.prototypeNorms, epoch: 0)
        optimizer.zeroGrad()
        r.loss.backward()
        Gradients.clipPerParameter(student, maxNorm: 3)
        Gradients.clipPerParameter(studentHead, maxNorm: 3)
        optimizer.step()
        emaUpdate(teacher: teacher, student: student, momentum: 0.996)
        emaUpdate(teacher: teacherHead, student: studentHead, momentum: 0.996)
        return r.loss.item()
    }
}
