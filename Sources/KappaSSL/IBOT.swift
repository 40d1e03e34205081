import Foundation
import Kappa
import KappaNN

/// The iBOT objective (Zhou et al., 2022) grown from DINO by composition:
/// λ₁ · (DINO loss on the [CLS] outputs over cross-view pairs) + λ₂ · (for each global view,
/// the mean over its masked patches of H(teacher patch targets of the same view, student
/// patch probabilities)), the patch term with its own centering and teacher temperature.
/// iBOT-vMF sets the vMF normalization and probability centering on both configurations.
public final class IBOTLoss {
    public let clsLoss: DINOLoss
    public let patchLoss: DINOLoss
    public let clsWeight: Double, patchWeight: Double

    /// The loss and its named terms.
    public struct Result {
        public let loss: Tensor
        public let clsTerm: Double
        public let patchTerm: Double
        /// The [CLS] term's monitors (teacher entropy, KL, τ_t).
        public let cls: DINOLoss.Result
        public let patchTeacherEntropy: Double
    }

    public init(prototypes: Int, patchPrototypes: Int, cls: DINOLossConfiguration, patch: DINOLossConfiguration,
                clsWeight: Double = 1, patchWeight: Double = 1, dtype: DType = .float32) {
        clsLoss = DINOLoss(prototypes: prototypes, configuration: cls, dtype: dtype)
        patchLoss = DINOLoss(prototypes: patchPrototypes, configuration: patch, dtype: dtype)
        (self.clsWeight, self.patchWeight) = (clsWeight, patchWeight)
    }

    /// `studentCLS[v]` [B, K] for every view (globals first); `studentPatches[i]` [B, N, K′]
    /// and `masks[i]` [B, N] (1 = masked) for the global views as the student saw them
    /// (masked); the teacher's outputs for the same global views, unmasked.
    public func callAsFunction(studentCLS: [Tensor], studentNorms: Tensor, studentPatches: [Tensor], studentPatchNorms: Tensor,
                               masks: [Tensor], teacherCLS: [Tensor], teacherNorms: Tensor, teacherPatches: [Tensor],
                               teacherPatchNorms: Tensor, epoch: Int) -> Result {
        precondition(studentPatches.count == teacherPatches.count && masks.count == teacherPatches.count,
                     "IBOTLoss: \(studentPatches.count) student patch views, \(teacherPatches.count) teacher, \(masks.count) masks")
        let cls = clsLoss(studentDots: studentCLS, studentNorms: studentNorms, teacherDots: teacherCLS,
                          teacherNorms: teacherNorms, epoch: epoch)
        let c = patchLoss.configuration
        let tt = patchLoss.teacherTemperature(epoch: epoch)
        let approximation: VMFNormalizerApproximation = c.normalizerExact ? .exact : .largeOrder
        var total: Tensor?
        var entropy = 0.0
        var raws: [Tensor] = []
        for i in 0..<teacherPatches.count {
            let (b, n, k) = (teacherPatches[i].shape[0], teacherPatches[i].shape[1], teacherPatches[i].shape[2])
            precondition(masks[i].shape == [b, n], "IBOTLoss: mask \(masks[i].shape) does not match patches \(teacherPatches[i].shape)")
            let (raw, target) = withoutGradients { () -> (Tensor, Tensor) in
                let raw = patchLoss.teacherRawLogits(teacherPatches[i].detached(), teacherPatchNorms.detached(), tt).reshape([b * n, k])
                return (raw, patchLoss.centering.targets(teacherLogits: raw, temperature: tt).reshape([b, n, k]))
            }
            raws.append(raw)
            entropy += withoutGradients { -(target * target.clamped(min: 1e-30).log()).sum(alongAxis: -1).mean().item() }
            let logP = vmfLogits(dotProducts: studentPatches[i], prototypeNorms: studentPatchNorms, temperature: c.studentTemperature,
                                 dimension: c.dimension, vmf: c.vmfNormalization, approximation: approximation).logSoftmax(alongAxis: -1)
            let perPatch = -(target * logP).sum(alongAxis: -1)                                // [B, N]
            let m = masks[i].to(perPatch.dtype)
            let perImage = (perPatch * m).sum(alongAxis: 1) / m.sum(alongAxis: 1).clamped(min: 1)
            let term = perImage.mean()
            total = total.map { $0 + term } ?? term
        }
        patchLoss.centering.update(teacherLogits: Tensor.concat(raws, alongAxis: 0), temperature: tt)
        let patchTerm = total! / Double(teacherPatches.count)
        let loss = cls.loss * clsWeight + patchTerm * patchWeight
        return Result(loss: loss, clsTerm: cls.loss.item(), patchTerm: patchTerm.item(), cls: cls,
                      patchTeacherEntropy: entropy / Double(teacherPatches.count))
    }
}

/// iBOT's blockwise masking of a patch grid: with probability `probability` an image gets
/// a prediction ratio drawn uniformly from `ratio`, and rectangles of at least
/// `minimumBlock` patches with aspect ratios in [0.3, 1/0.3] are masked until that share of
/// the patches is covered; other images get no mask.
public struct BlockMasking: Sendable, Codable, Equatable {
    public var ratio: ClosedRange<Double> = 0.1...0.5
    public var probability: Double = 0.5
    public var minimumBlock: Int = 4

    public init(ratio: ClosedRange<Double> = 0.1...0.5, probability: Double = 0.5, minimumBlock: Int = 4) {
        (self.ratio, self.probability, self.minimumBlock) = (ratio, probability, minimumBlock)
    }

    /// Masks [count, height·width] (1 = masked), deterministic given the generator.
    public func masks(count: Int, height: Int, width: Int, dtype: DType = .float32,
                      using g: inout RandomGenerator) -> Tensor {
        var values = [Double](repeating: 0, count: count * height * width)
        for i in 0..<count {
            guard g.nextUniform() < probability else { continue }
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
        return Tensor(values, shape: [count, height * width], dtype: dtype)
    }
}

/// The shared head on a ViT's outputs for the two global views of `b` images each: the
/// [CLS] logits per view and the patch logits [B, N, K] per view (iBOT's forward, used by the
/// trainer and the benchmark step).
func ibotHeads(_ head: DINOHead, _ out: (cls: Tensor, patches: Tensor), batch b: Int) -> (cls: [Tensor], patches: [Tensor]) {
    let (n, d) = (out.patches.shape[1], out.patches.shape[2])
    let cls = head(out.cls).logits.split(sizes: [b, b], alongAxis: 0)
    let patches = head(out.patches.reshape([2 * b * n, d])).logits.reshape([2 * b, n, -1]).split(sizes: [b, b], alongAxis: 0)
    return (cls, patches)
}
