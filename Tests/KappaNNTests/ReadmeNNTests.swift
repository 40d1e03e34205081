import Foundation
import Kappa
import KappaNN
import Testing

/// The README's KappaNN example, verbatim between the markers (checked by
/// `ReadmeTests.readmeBlocksAreTheTestedCode` in KappaTests).
@Suite("README (KappaNN)")
struct ReadmeNNTests {
    @Test func tourRuns() throws {
        // BEGIN README
        var g = RandomGenerator(seed: 0)
        let student = VisionTransformer(.refMicro, using: &g)      // 28×28×1 images, patch 7, 64 wide
        let teacher = VisionTransformer(.refMicro, using: &g)
        teacher.copyParameters(from: student)                       // the teacher starts as a copy
        let head = DINOHead(inFeatures: 64, prototypes: 512, hidden: 256, bottleneck: 64,
                            normLastLayer: false, using: &g)        // learned prototype norms
        let optimizer = AdamW(groups: ParameterGroup.dinoGroups(student, learningRate: 5e-4, weightDecay: 0.04, prefix: "backbone.")
                                      + ParameterGroup.dinoGroups(head, learningRate: 5e-4, weightDecay: 0.04, prefix: "head."))
        let lr = Schedule.cosine(base: 5e-4, final: 1e-6, epochs: 10, iterationsPerEpoch: 100, warmupEpochs: 1)

        let crops = Tensor.randomNormal([8, 1, 28, 28], using: &g)
        let out = head(student(crops).cls)        // out.logits [8, 512], out.prototypeNorms [512]
        let loss = -out.logits.logSoftmax(alongAxis: 1).mean()
        optimizer.zeroGrad()
        loss.backward()
        Gradients.clipPerParameter(student, maxNorm: 3)
        optimizer.setSchedule(learningRate: lr[0], weightDecay: 0.04)
        optimizer.step()
        emaUpdate(teacher: teacher, student: student, momentum: 0.996)

        let file = FileManager.default.temporaryDirectory.appendingPathComponent("student.safetensors")
        try student.save(to: file)                // safetensors: PyTorch reads it with load_file
        try teacher.load(from: file)
        // END README

        #expect(out.logits.shape == [8, 512] && out.prototypeNorms.shape == [512])
        #expect(optimizer.stepCount == 1 && lr.count == 1000)
        #expect(teacher.patchWeight.rawBytes() == student.patchWeight.rawBytes())
    }
}
