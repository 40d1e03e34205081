import Foundation
import Kappa
import KappaNN

/// The iBOT loss (Zhou et al., 2022) grown from DINO by composition:
/// λ₁ · (DINO loss on the [CLS] outputs over cross-view pairs) + λ₂ · (for each global view,
/// the mean over its masked patches of H(teacher patch targets of the same view, student
/// patch probabilities)), the patch term with its own centering and teacher temperature. The
/// patch term is built from ``DINOLoss``'s public steps. iBOT-vMF sets the vMF normalization
/// and probability centering on both configurations.
public final class IBOTLoss {
    /// The [CLS] term over cross-view pairs, with its center.
    public let clsLoss: DINOLoss
    /// The patch term's settings and center.
    public let patchLoss: DINOLoss
    /// λ₁ and λ₂.
    public let clsWeight: Double, patchWeight: Double

    /// The loss and its named terms.
    public struct Result {
        /// λ₁ · cls + λ₂ · patch, differentiable.
        public let loss: Tensor
        /// The [CLS] term (before λ₁) and the patch term (before λ₂).
        public let clsTerm: Double, patchTerm: Double
        /// The [CLS] term's monitors (teacher entropy, KL, τ_t).
        public let cls: DINOLoss.Result
        /// The patch targets' mean entropy and τ_t.
        public let patchTeacherEntropy: Double, patchTeacherTemperature: Double

        /// The terms as log entries: `clsLoss`, `patchLoss`.
        public var terms: [LoggedScalar] {
            [LoggedScalar("clsLoss", label: "cls", clsTerm), LoggedScalar("patchLoss", label: "patch", patchTerm)]
        }

        /// The [CLS] monitors and the patch targets' entropy.
        public var monitors: [LoggedScalar] {
            cls.monitors + [LoggedScalar("patchTeacherEntropy", label: "H(t) patch", patchTeacherEntropy, format: "%.2f")]
        }
    }

    /// The two terms with their settings and weights.
    public init(prototypes: Int, patchPrototypes: Int, cls: DINOLossConfiguration, patch: DINOLossConfiguration,
                clsWeight: Double = 1, patchWeight: Double = 1, dtype: DType = .float32) {
        clsLoss = DINOLoss(prototypes: prototypes, configuration: cls, dtype: dtype)
        patchLoss = DINOLoss(prototypes: patchPrototypes, configuration: patch, dtype: dtype)
        (self.clsWeight, self.patchWeight) = (clsWeight, patchWeight)
    }

    /// `studentCLS[v]` [B, K] for every view (globals first); `studentPatches[i]` [B, N, K′]
    /// and `masks[i]` [B, N] (1 = masked) for the global views as the student saw them
    /// (masked); the teacher's outputs for the same global views, unmasked. Updates both centers.
    public func callAsFunction(studentCLS: [Tensor], studentNorms: Tensor, studentPatches: [Tensor], studentPatchNorms: Tensor,
                               masks: [Tensor], teacherCLS: [Tensor], teacherNorms: Tensor, teacherPatches: [Tensor],
                               teacherPatchNorms: Tensor, epoch: Int) -> Result {
        precondition(!teacherPatches.isEmpty && studentPatches.count == teacherPatches.count && masks.count == teacherPatches.count,
                     "IBOTLoss: \(studentPatches.count) student patch views, \(teacherPatches.count) teacher, \(masks.count) masks")
        let cls = clsLoss(studentDots: studentCLS, studentNorms: studentNorms, teacherDots: teacherCLS,
                          teacherNorms: teacherNorms, epoch: epoch)
        var terms: [Tensor] = []
        var entropy = 0.0
        var raws: [Tensor] = []
        var temperature = 0.0
        for i in 0..<teacherPatches.count {
            let (b, n, k) = (teacherPatches[i].shape[0], teacherPatches[i].shape[1], teacherPatches[i].shape[2])
            precondition(masks[i].shape == [b, n] && studentPatches[i].shape == teacherPatches[i].shape,
                         "IBOTLoss: mask \(masks[i].shape) and student patches \(studentPatches[i].shape) do not match teacher patches \(teacherPatches[i].shape)")
            // Each view's patches are centered on their own (Sinkhorn-Knopp balances within a view).
            let teacher = patchLoss.teacherTargets(teacherDots: [teacherPatches[i].reshape([b * n, k])],
                                                   teacherNorms: teacherPatchNorms, epoch: epoch)
            let target = teacher.targets[0].reshape([b, n, k])
            raws.append(teacher.raw)
            temperature = teacher.temperature
            entropy += DINOLoss.entropy(target)
            let logP = patchLoss.studentLogProbabilities(studentPatches[i], norms: studentPatchNorms)
            let perPatch = -(target * logP).sum(alongAxis: -1)                                // [B, N]
            let m = masks[i].to(perPatch.dtype)
            let perImage = (perPatch * m).sum(alongAxis: 1) / m.sum(alongAxis: 1).clamped(min: 1)
            terms.append(perImage.mean())
        }
        patchLoss.updateCenter(with: DINOLoss.TeacherTargets(targets: [], raw: Tensor.concat(raws, alongAxis: 0), temperature: temperature))
        let patchTerm = terms.dropFirst().reduce(terms[0], +) / Double(terms.count)
        let loss = cls.loss * clsWeight + patchTerm * patchWeight
        return Result(loss: loss, clsTerm: cls.loss.item(), patchTerm: patchTerm.item(), cls: cls,
                      patchTeacherEntropy: entropy / Double(teacherPatches.count), patchTeacherTemperature: temperature)
    }

    /// Both centers, named `center` and `patchCenter` in checkpoints.
    public var state: [(name: String, tensor: Tensor)] { clsLoss.state() + patchLoss.state(named: "patchCenter") }

    /// Restores the centers saved by ``state``.
    public func loadState(_ tensors: [String: Tensor]) throws {
        try clsLoss.loadState(tensors)
        try patchLoss.loadState(tensors, named: "patchCenter")
    }
}

/// iBOT and iBOT-vMF as a ``SelfSupervisedObjective``: masks for the global views (from the
/// run's seed and the step, so a resumed run draws the same), the masked student and the
/// unmasked teacher on the global views, the student alone on the local views, the shared head
/// on [CLS] and patch tokens. The [CLS] and patch terms are logged separately.
public final class IBOTObjective: SelfSupervisedObjective {
    /// The loss and its two centers.
    public let loss: IBOTLoss
    /// How the student's global views are masked.
    public let masking: BlockMasking

    /// The objective of a configuration's [CLS] loss and iBOT settings.
    public init(prototypes: Int, cls: DINOLossConfiguration, settings: IBOTSettings, dtype: DType = .float32) {
        loss = IBOTLoss(prototypes: prototypes, patchPrototypes: prototypes, cls: cls, patch: settings.patch,
                        clsWeight: 1, patchWeight: settings.patchWeight, dtype: dtype)
        masking = settings.masking
    }

    public func check(_ networks: TeacherStudentNetworks) throws {
        guard let s = networks.student as? VisionTransformer, s.configuration.maskToken, networks.teacher is VisionTransformer else {
            throw ObjectiveStateError("iBOT needs a ViT backbone with a mask token (ViTConfiguration.maskToken)")
        }
    }

    /// The iBOT loss of a batch; updates both centers.
    public func callAsFunction(_ batch: ObjectiveBatch, networks: TeacherStudentNetworks, context: StepContext) -> ObjectiveOutput {
        guard let studentViT = networks.student as? VisionTransformer, let teacherViT = networks.teacher as? VisionTransformer else {
            preconditionFailure("IBOTObjective: iBOT needs ViT backbones")
        }
        let views = batch.globalViews
        let b = views[0].shape[0]
        precondition(views.allSatisfy { $0.shape == views[0].shape }, "IBOTObjective: global views of shapes \(views.map(\.shape))")
        let globals = Tensor.concat(views, alongAxis: 0)
        let grid = views[0].shape[2] / studentViT.configuration.patchSize
        // Each image's mask in each view from (seed, step, view, its place in the whole batch):
        // the same masks however the batch is split over processes, and on resume.
        let stepSeed = context.seed ^ (UInt64(context.step) &* 0x9E37_79B9_7F4A_7C15) ^ 0x1B07
        let masks = masking.masks(seeds: (0..<views.count).flatMap { v in
            (0..<b).map { j in stepSeed ^ (UInt64(v) &* 0xC2B2_AE3D_27D4_EB4F) ^ (UInt64(context.firstSample + j) &* 0x1656_67B1_9E37_79F9) }
        }, height: grid, width: grid)
        let t = withoutGradients { ibotHeads(networks.teacherHead, teacherViT(globals), views: views.count) }
        let s = ibotHeads(networks.studentHead, studentViT(globals, mask: masks), views: views.count)
        let locals = batch.localViews.isEmpty ? [] : networks.studentLogits(batch.localViews)
        let r = loss(studentCLS: s.cls + locals, studentNorms: networks.studentHead.prototypeNorms, studentPatches: s.patches,
                     studentPatchNorms: networks.studentHead.prototypeNorms,
                     masks: masks.split(sizes: Array(repeating: b, count: views.count), alongAxis: 0), teacherCLS: t.cls,
                     teacherNorms: networks.teacherHead.prototypeNorms, teacherPatches: t.patches,
                     teacherPatchNorms: networks.teacherHead.prototypeNorms, epoch: context.epoch)
        return ObjectiveOutput(loss: r.loss, terms: r.terms, monitors: r.monitors)
    }

    public var state: [(name: String, tensor: Tensor)] { loss.state }
    public func loadState(_ tensors: [String: Tensor]) throws { try loss.loadState(tensors) }
}

/// iBOT's blockwise masking of a patch grid: with probability `probability` an image gets
/// a prediction ratio drawn uniformly from `ratio`, and rectangles of at least
/// `minimumBlock` patches with aspect ratios in [0.3, 1/0.3] are masked until that share of
/// the patches is covered; other images get no mask.
public struct BlockMasking: Sendable, Codable, Equatable {
    /// The share of a masked image's patches to mask, drawn uniformly from this range.
    public var ratio: ClosedRange<Double> = 0.1...0.5
    /// The probability that an image is masked at all.
    public var probability: Double = 0.5
    /// The smallest rectangle, in patches.
    public var minimumBlock: Int = 4

    /// iBOT's masking (the defaults above).
    public init() {}

    /// Masking with these settings.
    public init(ratio: ClosedRange<Double>, probability: Double, minimumBlock: Int) {
        (self.ratio, self.probability, self.minimumBlock) = (ratio, probability, minimumBlock)
    }

    /// Masks [count, height·width] (1 = masked), deterministic given the generator.
    public func masks(count: Int, height: Int, width: Int, dtype: DType = .float32,
                      using g: inout RandomGenerator) -> Tensor {
        var values = [Double](repeating: 0, count: count * height * width)
        for i in 0..<count { mask(i, into: &values, height: height, width: width, using: &g) }
        return Tensor(values, shape: [count, height * width], dtype: dtype)
    }

    /// Masks [seeds.count, height·width], image i drawn from a generator of its own seed
    /// (iBOT keys them by the image's place in the whole batch, so that a batch split over
    /// processes draws the same masks).
    public func masks(seeds: [UInt64], height: Int, width: Int, dtype: DType = .float32) -> Tensor {
        var values = [Double](repeating: 0, count: seeds.count * height * width)
        for (i, seed) in seeds.enumerated() {
            var g = RandomGenerator(seed: seed)
            mask(i, into: &values, height: height, width: width, using: &g)
        }
        return Tensor(values, shape: [seeds.count, height * width], dtype: dtype)
    }

    /// Draws image i's mask into its row of `values`.
    func mask(_ i: Int, into values: inout [Double], height: Int, width: Int, using g: inout RandomGenerator) {
        guard g.nextUniform() < probability else { return }
        let r = ratio.lowerBound + (ratio.upperBound - ratio.lowerBound) * g.nextUniform()
        let target = Int((r * Double(height * width)).rounded())
        var grid = [Bool](repeating: false, count: height * width)
        var masked = 0, attempts = 0
        while masked < target && attempts < 100 {
            attempts += 1
            let maxArea = target - masked
            guard maxArea >= 1 else { break }
            let area = Double(Swift.min(minimumBlock, maxArea)) + g.nextUniform() * Double(Swift.max(0, maxArea - minimumBlock))
            let aspect = Foundation.exp(Foundation.log(0.3) + g.nextUniform() * (Foundation.log(1 / 0.3) - Foundation.log(0.3)))
            let h = Int((area * aspect).squareRoot().rounded()), w = Int((area / aspect).squareRoot().rounded())
            guard h >= 1, w >= 1, h < height || height == 1, w < width || width == 1 else { continue }
            let top = g.nextInt(below: height - Swift.min(h, height) + 1), left = g.nextInt(below: width - Swift.min(w, width) + 1)
            for y in top..<Swift.min(top + h, height) {
                for x in left..<Swift.min(left + w, width) where !grid[y * width + x] && masked < target {
                    grid[y * width + x] = true
                    masked += 1
                }
            }
        }
        for (k, m) in grid.enumerated() where m { values[i * height * width + k] = 1 }
    }
}

/// The shared head on a ViT's outputs for `views` global views of equal batch: the [CLS]
/// logits per view and the patch logits [B, N, K] per view (iBOT's forward).
func ibotHeads(_ head: DINOHead, _ out: (cls: Tensor, patches: Tensor), views: Int) -> (cls: [Tensor], patches: [Tensor]) {
    let (total, n, d) = (out.patches.shape[0], out.patches.shape[1], out.patches.shape[2])
    let sizes = Array(repeating: total / views, count: views)
    let cls = head(out.cls).logits.split(sizes: sizes, alongAxis: 0)
    let patches = head(out.patches.reshape([total * n, d])).logits.reshape([total, n, -1]).split(sizes: sizes, alongAxis: 0)
    return (cls, patches)
}
