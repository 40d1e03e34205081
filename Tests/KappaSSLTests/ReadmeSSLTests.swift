import Foundation
import Kappa
import KappaNN
import KappaSSL
import Testing

// The README's new-objective example, verbatim between the markers (checked by
// `ReadmeTests.readmeBlocksAreTheTestedCode` in KappaTests).
// BEGIN README
final class NormPenaltyDINO: SelfSupervisedObjective {
    let dino: DINOLoss
    init(_ c: DINOConfiguration) { dino = DINOLoss(prototypes: c.prototypes, configuration: c.loss) }

    func callAsFunction(_ batch: ObjectiveBatch, networks: TeacherStudentNetworks,
                        context: StepContext) -> ObjectiveOutput {
        let teacher = networks.teacherLogits(batch.globalViews)      // no gradient
        let student = networks.studentLogits(batch.views)
        let norms = networks.studentHead.prototypeNorms
        let r = dino(studentDots: student, studentNorms: norms, teacherDots: teacher,
                     teacherNorms: networks.teacherHead.prototypeNorms, epoch: context.epoch)
        let penalty = (norms - 1).pow(2).mean()
        return ObjectiveOutput(loss: r.loss + penalty * 0.1,
                               terms: [LoggedScalar("normPenalty", label: "norms", penalty.item())],
                               monitors: r.monitors)
    }
    var state: [(name: String, tensor: Tensor)] { dino.state() }     // the center
    func loadState(_ tensors: [String: Tensor]) throws { try dino.loadState(tensors) }
}
// END README

@Suite("README (KappaSSL)")
struct ReadmeSSLTests {
    @Test func newObjectiveTrains() throws {
        var losses: [Double] = []
        // BEGIN README
        var config = DINOConfiguration()            // every default, documented field by field
        (config.epochs, config.warmupEpochs, config.batchSize) = (1, 0, 16)
        let data = ShapesDataset.make(count: 32, seed: 0)
        let trainer = try TeacherStudentTrainer(configuration: config, objective: NormPenaltyDINO(config), train: data)
        trainer.trainEpoch { print($0.loss, $0["normPenalty"]!) }
        try RunCheckpoint.save(trainer, to: FileManager.default.temporaryDirectory.appendingPathComponent("run.safetensors"))
        // END README
        trainer.trainEpoch { losses.append($0.loss) }   // finished: nothing more
        #expect(trainer.step == 2 && trainer.isFinished && losses.isEmpty)
        #expect(trainer.objective.state.map(\.name) == ["center"])
    }
}
