// The supervised reference for the built-in shapes (or any --data DINOvMF reads): the backbones of DINOvMF trained with the
// labels (cross-entropy on a linear classifier, the views of the small-image preset), through
// the same training loop as every self-supervised method, with the same kNN evaluation on the
// same split as DINOvMF's reports. It shows what these features can reach when the signal is
// the label instead of a self-supervised target:
//
//     swift run -c release Supervised                      # ResNet-8, 2 epochs
//     swift run -c release Supervised --backbone vit-micro --epochs 3
//     swift run -c release Supervised --data ../shared/data/mnist --backbone vit-conv
import ArgumentParser
import Foundation
import Kappa
import KappaNN
import KappaCommands
import KappaSSL

/// Cross-entropy of a linear classifier on the student's features of the first global view.
/// The classifier is the objective's own module: the trainer optimizes and saves it with the
/// student. The teacher and the head are carried along unused.
final class LabelObjective: SelfSupervisedObjective {
    let classifier: Linear
    init(features: Int, classes: Int, seed: UInt64) {
        var g = RandomGenerator(seed: seed ^ 0xC1A5)
        classifier = Linear(features, classes, using: &g)
    }
    var module: Module? { classifier }

    func callAsFunction(_ batch: ObjectiveBatch, networks: TeacherStudentNetworks, context: StepContext) -> ObjectiveOutput {
        guard let labels = batch.labels else { preconditionFailure("LabelObjective: the dataset has no labels") }
        let logits = classifier(networks.student.features(batch.views[0]))
        let predicted = withoutGradients { logits.argmax(alongAxis: 1).scalars(as: Double.self) }
        let accuracy = Double(zip(predicted, labels).filter { Int($0) == $1 }.count) / Double(labels.count)
        return ObjectiveOutput(loss: Tensor.crossEntropy(logits: logits, labels: labels),
                               monitors: [LoggedScalar("trainingAccuracy", label: "accuracy", accuracy, format: "%.3f")])
    }

    var state: [(name: String, tensor: Tensor)] { [] }
    func loadState(_ tensors: [String: Tensor]) throws {}
}

struct Supervised: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Train DINOvMF's backbone with labels on the built-in shapes (or --data) and report kNN accuracy each epoch.")

    @OptionGroup var data: DataOptions
    @Option(help: "resnet (width 8, DINOvMF's default), vit-micro (64 wide, 4 deep, patch 7), vit-conv (vit-micro's transformer on 4-pixel tokens from a convolutional stem) or vit-stem (vit-micro with its patches cut from a 3×3 convolution's 16 feature maps).")
    var backbone: BackbonePreset = .resnet
    @Option(help: "Epochs over the training images.")
    var epochs = 2
    @Option(help: "AdamW learning rate (constant).")
    var lr = 1e-3
    @Option(help: "Threads for kernels and BLAS (default: all cores).")
    var threads: Int?

    func validate() throws {
        guard epochs >= 1, lr > 0, lr.isFinite, (threads ?? 1) >= 1 else { throw ValidationError("--epochs and --threads must be at least 1, --lr positive") }
        guard [.resnet, .vitMicro, .vitConv, .vitStem].contains(backbone) else { throw ValidationError("--backbone must be resnet, vit-micro, vit-conv or vit-stem") }
    }

    func run() throws {
        if let threads { Threads.count = threads }
        // The split of DINOvMF's default run (seed 0), or of --data as DINOvMF splits it.
        let (train, test) = try data.load(seed: 0)
        try DINOConfiguration.checkShape(of: train)
        // The preset's small-image views for this size (no inversion), global crops only.
        var c = try DINOConfiguration.preset(method: .dinoVMF, backbone: backbone, imageSize: train.height, channels: train.channels)
        c.augmentation.localCrops = 0
        (c.epochs, c.warmupEpochs, c.freezeLastLayerEpochs, c.clipGradient) = (epochs, 0, 0, 0)
        (c.baseLearningRate, c.minLearningRate) = (lr * 256 / Double(c.batchSize), lr)
        (c.weightDecay, c.weightDecayEnd) = (0.01, 0.01)
        let objective = LabelObjective(features: c.backbone.featureCount,
                                       classes: Swift.max(train.classCount, test.classCount), seed: c.seed)
        let trainer = try TeacherStudentTrainer(configuration: c, objective: objective, train: train)
        let evaluator = try Evaluator(reference: train, test: test)
        let normalization = (c.augmentation.mean, c.augmentation.std)
        print(String(format: "supervised %@ on %@: kNN (k=20, T=0.07) at initialization %.2f%%", backbone.rawValue, train.source,
                     100 * evaluator.knn(trainer.student, normalization: normalization)))
        let start = Date()
        while !trainer.isFinished {
            var (correct, seen) = (0.0, 0.0)
            trainer.trainEpoch { s in correct += s["trainingAccuracy"]!; seen += 1 }
            print(String(format: "epoch %d: training accuracy %.2f%%, kNN %.2f%% (%.1f min)", trainer.epoch, 100 * correct / seen,
                         100 * evaluator.knn(trainer.student, normalization: normalization), Date().timeIntervalSince(start) / 60))
        }
    }
}

HostSetup.useFastestBLASKernels()
Supervised.main()
