import Foundation
import Kappa
import KappaSSL
import Testing

@Suite("iBOT loss and blockwise masking")
struct IBOTTests {
    func config(vmf: Bool) -> DINOLossConfiguration {
        var c = vmf ? DINOLossConfiguration() : .dino
        c.dimension = 8
        return c
    }

    @Test func patchTermByHand() {
        // One image, two global views, 2 patches, K = 2; only patch 1 of view 0 is masked and
        // view 1 has no mask: the patch term is H(target(view 0, patch 1), student) / 2 views.
        let loss = IBOTLoss(prototypes: 2, patchPrototypes: 2, cls: config(vmf: false), patch: config(vmf: false),
                            clsWeight: 0, patchWeight: 1, dtype: .float64)
        let ones = Tensor([1.0, 1])
        let sp = [Tensor([0.1, 0.2, 0.3, -0.1], shape: [1, 2, 2]), Tensor([0.0, 0.0, 0.5, 0.5], shape: [1, 2, 2])]
        let tp = [Tensor([0.2, 0.0, -0.1, 0.1], shape: [1, 2, 2]), Tensor([0.3, 0.3, 0.0, 0.2], shape: [1, 2, 2])]
        let masks = [Tensor([0.0, 1], shape: [1, 2]), Tensor([0.0, 0], shape: [1, 2])]
        let cls = [Tensor([0.1, 0.2], shape: [1, 2]), Tensor([0.2, 0.1], shape: [1, 2])]
        let r = loss(studentCLS: cls, studentNorms: ones, studentPatches: sp, studentPatchNorms: ones, masks: masks,
                     teacherCLS: cls, teacherNorms: ones, teacherPatches: tp, teacherPatchNorms: ones, epoch: 0)
        let target = softmax([-0.1 / 0.04, 0.1 / 0.04]), student = softmax([0.3 / 0.1, -0.1 / 0.1])
        let h = -zip(target, student).map { $0 * Foundation.log($1) }.reduce(0, +)
        #expect(Swift.abs(r.patchTerm - h / 2) < 1e-12)
        #expect(Swift.abs(r.loss.item() - h / 2) < 1e-12)
    }

    @Test func gradients() {
        let masks = [Tensor([1.0, 0, 1, 1, 0, 0], shape: [2, 3]), Tensor([0.0, 1, 0, 1, 1, 0], shape: [2, 3])]
        let tCLS = (0..<2).map { randn([2, 4], seed: UInt64(30 + $0)) * 0.3 }
        let tPatch = (0..<2).map { randn([2, 3, 4], seed: UInt64(40 + $0)) * 0.3 }
        let tNorms = randn([4], seed: 50).abs() + 0.5
        let inputs = (0..<3).map { randn([2, 4], seed: UInt64($0)) * 0.3 } + (0..<2).map { randn([2, 3, 4], seed: UInt64(10 + $0)) * 0.3 }
            + [randn([4], seed: 60).abs() + 0.5]
        let report = gradcheck(inputs, mode: .fast) { t in
            let loss = IBOTLoss(prototypes: 4, patchPrototypes: 4, cls: config(vmf: true), patch: config(vmf: true),
                                clsWeight: 1, patchWeight: 0.5, dtype: .float64)
            return loss(studentCLS: Array(t[0..<3]), studentNorms: t[5], studentPatches: Array(t[3..<5]), studentPatchNorms: t[5],
                        masks: masks, teacherCLS: tCLS, teacherNorms: tNorms, teacherPatches: tPatch, teacherPatchNorms: tNorms,
                        epoch: 0).loss
        }
        #expect(report.passed, "\(report)")
    }

    @Test func blockMasking() {
        var g = RandomGenerator(seed: 1)
        let masking = BlockMasking(ratio: 0.2...0.4, probability: 0.5, minimumBlock: 4)
        let m = masking.masks(count: 400, height: 8, width: 8, using: &g)
        let perImage = m.sum(alongAxis: 1).doubles
        let maskedImages = perImage.filter { $0 > 0 }
        #expect(Swift.abs(Double(maskedImages.count) / 400 - 0.5) < 0.1)
        #expect(maskedImages.allSatisfy { $0 >= 0.2 * 64 - 1 && $0 <= 0.4 * 64 + 1 }, "\(maskedImages.sorted().prefix(5))")
        var again = RandomGenerator(seed: 1)
        #expect(masking.masks(count: 400, height: 8, width: 8, using: &again).doubles == m.doubles)
    }
}
