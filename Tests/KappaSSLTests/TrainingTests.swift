import Foundation
import Kappa
import KappaNN
import KappaSSL
import Testing

func tinyConfiguration() -> DINOConfiguration {
    var c = DINOConfiguration()
    c.backbone = .vit(ViTConfiguration(imageSize: 16, patchSize: 4, channels: 1, width: 16, depth: 1, heads: 2, mlpRatio: 2))
    c.prototypes = 32
    c.headHidden = 32
    c.bottleneck = 8
    c.batchSize = 16
    c.epochs = 3
    c.warmupEpochs = 1
    c.baseLearningRate = 0.02
    c.augmentation.globalSize = 16
    c.augmentation.localSize = 8
    c.augmentation.localCrops = 2
    return c
}

@Suite("DINO-vMF training end to end (tiny)")
struct TrainingTests {
    @Test func loaderIsDeterministic() {
        let data = ShapesDataset.make(count: 40, size: 16, seed: 1)
        var aug = MultiCropAugmentation()
        (aug.globalSize, aug.localSize, aug.localCrops) = (16, 8, 2)
        let a = MultiCropLoader(dataset: data, augmentation: aug, batchSize: 8, seed: 5, epoch: 2)
        let b = MultiCropLoader(dataset: data, augmentation: aug, batchSize: 8, seed: 5, epoch: 2, queueDepth: 1, workers: 3)
        let c = MultiCropLoader(dataset: data, augmentation: aug, batchSize: 8, seed: 5, epoch: 3)
        var batches = 0
        while let x = a.next(), let y = b.next(), let z = c.next() {
            #expect(x.views.map(\.shape) == [[8, 1, 16, 16], [8, 1, 16, 16], [8, 1, 8, 8], [8, 1, 8, 8]])
            #expect(x.indices == y.indices && x.labels == y.labels)
            for (u, v) in zip(x.views, y.views) { #expect(u.scalars(as: Float.self) == v.scalars(as: Float.self)) }
            #expect(x.views[0].scalars(as: Float.self) != z.views[0].scalars(as: Float.self))
            #expect(x.views.allSatisfy { $0.scalars(as: Float.self).allSatisfy(\.isFinite) })
            batches += 1
        }
        #expect(batches == 5)
    }

    @Test func trainsResumesAndEvaluates() throws {
        let data = ShapesDataset.make(count: 96, size: 16, seed: 2)
        let config = tinyConfiguration()
        let trainer = try TeacherStudentTrainer(configuration: config, train: data)
        var losses: [Double] = []
        trainer.trainEpoch { losses.append($0.loss) }
        let dir = NSTemporaryDirectory() + "kappa-train-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let url = URL(fileURLWithPath: dir + "/run.safetensors")
        try RunCheckpoint.save(trainer, to: url)
        while !trainer.isFinished { trainer.trainEpoch { losses.append($0.loss) } }
        #expect(losses.count == 18 && losses.allSatisfy(\.isFinite))
        let first = losses.prefix(3).reduce(0, +) / 3, last = losses.suffix(3).reduce(0, +) / 3
        #expect(last < first, "loss \(first) → \(last)")

        // A fresh trainer resumed from the checkpoint ends bit-identical.
        #expect(try RunCheckpoint.configuration(in: url) == config)
        let resumed = try TeacherStudentTrainer(configuration: config, train: data)
        try RunCheckpoint.restore(resumed, from: url)
        #expect(resumed.epoch == 1 && resumed.step == 6)
        while !resumed.isFinished { resumed.trainEpoch() }
        for (a, b) in zip(trainer.teacher.stateDict() + trainer.studentHead.stateDict(),
                          resumed.teacher.stateDict() + resumed.studentHead.stateDict()) {
            #expect(a.tensor.rawBytes() == b.tensor.rawBytes(), "\(a.name)")
        }
        #expect(trainer.objective.state[0].tensor.rawBytes() == resumed.objective.state[0].tensor.rawBytes())

        let report = try Evaluator(reference: data, test: ShapesDataset.make(count: 40, size: 16, seed: 3)).evaluate(trainer, linearProbe: true)
        #expect(report.knn >= 0 && report.knn <= 1 && report.knnRawPixels > 0 && report.utilization >= 1)
        #expect(report.quartileCounts.reduce(0, +) == 40)
    }

    @Test func ibotTrainsAndResumes() throws {
        let data = ShapesDataset.make(count: 64, size: 16, seed: 4)
        var config = tinyConfiguration()
        config.backbone = .vit(ViTConfiguration(imageSize: 16, patchSize: 4, channels: 1, width: 16, depth: 1, heads: 2, mlpRatio: 2,
                                                maskToken: true))
        var settings = IBOTSettings()
        settings.patchWeight = 0.5
        settings.patch.teacherTemperature = 0.05
        config.ibot = settings
        config.epochs = 2
        let trainer = try TeacherStudentTrainer(configuration: config, train: data)
        var losses: [Double] = []
        trainer.trainEpoch { losses.append($0.loss) }
        let url = URL(fileURLWithPath: NSTemporaryDirectory() + "kappa-ibot-\(UUID().uuidString).safetensors")
        try RunCheckpoint.save(trainer, to: url)
        trainer.trainEpoch { losses.append($0.loss) }
        #expect(losses.count == 8 && losses.allSatisfy(\.isFinite))
        let ibot = try #require(trainer.objective as? IBOTObjective)
        #expect(ibot.loss.patchLoss.centering.center.sum().item() > 0.99, "the patch center moved and stayed a distribution")
        let resumed = try TeacherStudentTrainer(configuration: config, train: data)
        try RunCheckpoint.restore(resumed, from: url)
        resumed.trainEpoch()
        for (a, b) in zip(trainer.student.stateDict() + trainer.teacherHead.stateDict(), resumed.student.stateDict() + resumed.teacherHead.stateDict()) {
            #expect(a.tensor.rawBytes() == b.tensor.rawBytes(), "\(a.name)")
        }
        #expect(trainer.objective.state.map(\.name) == ["center", "patchCenter"])
        for (a, b) in zip(trainer.objective.state, resumed.objective.state) { #expect(a.tensor.rawBytes() == b.tensor.rawBytes(), "\(a.name)") }
    }
}

@Suite("Backbone facts")
struct BackboneFactTests {
    @Test func featureCountMatchesTheBuiltBackbone() {
        for choice in [BackboneChoice.resnet(width: 8, channels: 1), .resnet(width: 3, channels: 3), .vit(.refMicro)] {
            var g = RandomGenerator(seed: 0)
            #expect(choice.featureCount == choice.make(using: &g).featureCount, "\(choice)")
        }
    }
}

/// An objective with parameters of its own (a linear classifier on the student's features):
/// the trainer optimizes them, and checkpoints save and restore them as `objective.*`.
final class ProbeObjective: SelfSupervisedObjective {
    let classifier: Linear
    init(features: Int) {
        var g = RandomGenerator(seed: 9)
        classifier = Linear(features, 10, using: &g)
    }
    var module: Module? { classifier }
    func callAsFunction(_ batch: ObjectiveBatch, networks: TeacherStudentNetworks, context: StepContext) -> ObjectiveOutput {
        ObjectiveOutput(loss: Tensor.crossEntropy(logits: classifier(networks.student.features(batch.views[0])), labels: batch.labels!))
    }
    var state: [(name: String, tensor: Tensor)] { [] }
    func loadState(_ tensors: [String: Tensor]) throws {}
}

@Suite("Objectives with parameters of their own")
struct ObjectiveModuleTests {
    @Test func objectiveParametersAreTrainedSavedAndRestored() throws {
        let data = ShapesDataset.make(count: 32, size: 16, seed: 5)
        var c = tinyConfiguration()
        c.epochs = 2
        let trainer = try TeacherStudentTrainer(configuration: c, objective: ProbeObjective(features: c.backbone.featureCount), train: data)
        let before = trainer.objective.module!.parameters.map { $0.rawBytes() }
        trainer.trainEpoch()
        let module = try #require(trainer.objective.module)
        #expect(zip(before, module.parameters).allSatisfy { $0 != $1.rawBytes() }, "the classifier moved")
        let url = URL(fileURLWithPath: NSTemporaryDirectory() + "kappa-probe-\(UUID().uuidString).safetensors")
        try RunCheckpoint.save(trainer, to: url)
        let names = try SafeTensors.read(url).tensors.map(\.name)
        #expect(names.contains("student.objective.weight") && names.contains("student.objective.bias"), "\(names.filter { $0.contains("objective") })")
        #expect(names.contains { $0.hasPrefix("optimizer.") && $0.hasSuffix("objective.weight") }, "AdamW's moments of the classifier")
        let resumed = try TeacherStudentTrainer(configuration: c, objective: ProbeObjective(features: c.backbone.featureCount), train: data)
        try RunCheckpoint.restore(resumed, from: url)
        trainer.trainEpoch()
        resumed.trainEpoch()
        for (a, b) in zip(module.parameters, resumed.objective.module!.parameters) { #expect(a.rawBytes() == b.rawBytes()) }
        // A DINO trainer refuses the checkpoint: another objective wrote it.
        let dino = try TeacherStudentTrainer(configuration: c, train: data)
        #expect(throws: FileError.self) { try RunCheckpoint.restore(dino, from: url) }
    }
}

@Suite("Sessions stopped and resumed")
struct SessionResumeTests {
    /// A run stopped mid-epoch (as Ctrl-C stops it) and resumed writes the same metrics.jsonl,
    /// byte for byte, as the run that was never stopped, and ends with the same weights.
    @Test(arguments: [2, 5, 6, 7])
    func stoppedRunLogsLikeAnUninterruptedOne(stopAfter: Int) throws {
        let data = ShapesDataset.make(count: 48, size: 16, seed: 6)
        let test = ShapesDataset.make(count: 24, size: 16, seed: 7)
        var c = tinyConfiguration()
        c.epochs = 3
        func session(_ folder: String) throws -> TrainingSession {
            let s = TrainingSession(trainer: try TeacherStudentTrainer(configuration: c, train: data),
                                    evaluator: try Evaluator(reference: data, test: test), output: folder)
            (s.evaluateEvery, s.linearProbe) = (1, false)
            return s
        }
        let root = NSTemporaryDirectory() + "kappa-session-\(UUID().uuidString)"
        defer { if ProcessInfo.processInfo.environment["KEEP"] == nil { try? FileManager.default.removeItem(atPath: root) } }
        let whole = try session(root + "/whole")
        _ = try whole.run()
        let stopped = try session(root + "/stopped")
        var steps = 0
        stopped.shouldStop = { steps += 1; return steps > stopAfter }
        let first = try stopped.run()
        #expect(first.interrupted)
        let resumed = try session(root + "/stopped")
        let second = try resumed.run(resume: true)
        #expect(!second.interrupted && second.report != nil)
        let a = try Data(contentsOf: URL(fileURLWithPath: root + "/whole/metrics.jsonl"))
        let b = try Data(contentsOf: URL(fileURLWithPath: root + "/stopped/metrics.jsonl"))
        #expect(a == b, "metrics.jsonl differs after a stop at step \(stopAfter)")
        for (x, y) in zip(whole.trainer.teacher.stateDict(), resumed.trainer.teacher.stateDict()) {
            #expect(x.tensor.rawBytes() == y.tensor.rawBytes(), "\(x.name)")
        }
        let plotA = try String(contentsOfFile: root + "/whole/loss.svg", encoding: .utf8)
        let plotB = try String(contentsOfFile: root + "/stopped/loss.svg", encoding: .utf8)
        #expect(plotA == plotB, "the loss plot covers the whole run")
    }
}
