// The supervised reference for the built-in shapes: the backbones of DINOvMF trained with the
// labels (cross-entropy on a linear classifier, the views of the small-image preset), with
// the same kNN evaluation on the same split as DINOvMF's reports. It shows what these
// features can reach when the signal is the label instead of a self-supervised target:
//
//     swift run -c release Supervised                      # ResNet-8, 2 epochs
//     swift run -c release Supervised --backbone vit-micro --epochs 3
import ArgumentParser
import Foundation
import Kappa
import KappaNN
import KappaCommands
import KappaSSL

struct Supervised: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Train DINOvMF's backbone with labels on the built-in shapes and report kNN accuracy each epoch.")

    enum Backbone: String, ExpressibleByArgument, CaseIterable { case resnet, vitMicro = "vit-micro" }
    @Option(help: "resnet (width 8, DINOvMF's default) or vit-micro (64 wide, 4 deep, patch 7).")
    var backbone: Backbone = .resnet
    @Option(help: "Epochs over the 8,000 training images.")
    var epochs = 2
    @Option(help: "AdamW learning rate.")
    var lr = 1e-3
    @Option(help: "Threads for kernels and BLAS (default: all cores).")
    var threads: Int?

    func validate() throws {
        guard epochs >= 1, lr > 0, (threads ?? 1) >= 1 else { throw ValidationError("--epochs and --threads must be at least 1, --lr positive") }
    }

    func run() throws {
        if let threads { Threads.count = threads }
        // The split of DINOvMF's default run.
        let (train, test) = ShapesDataset.splits(train: 8000, evaluation: 2000, seed: 0)
        var g = RandomGenerator(seed: 0)
        let encoder = (backbone == .resnet ? DINOConfiguration().backbone : .vit(.refMicro)).make(using: &g)
        let classifier = Linear(encoder.featureCount, ShapesDataset.classNames.count, using: &g)
        let optimizer = AdamW(groups: [ParameterGroup(name: "all", parameters: encoder.namedParameters() + classifier.namedParameters(),
                                                      learningRate: lr, weightDecay: 0.01)])
        var views = MultiCropAugmentation.smallImages
        views.localCrops = 0
        func knn() -> Double {
            encoder.eval()
            defer { encoder.train() }
            let a = Evaluation.features(of: train) { encoder.features($0) }, b = Evaluation.features(of: test) { encoder.features($0) }
            return Evaluation.accuracy(Evaluation.knnPredict(train: a, trainLabels: train.labels!, test: b, classes: 10), test.labels!)
        }
        print(String(format: "supervised %@ on %@: kNN (k=20, T=0.07) at initialization %.2f%%", backbone.rawValue, train.source, 100 * knn()))
        let start = Date()
        for epoch in 0..<epochs {
            let loader = MultiCropLoader(dataset: train, augmentation: views, batchSize: 64, seed: 1, epoch: epoch)
            var (correct, seen) = (0, 0)
            while let batch = loader.next() {
                let logits = classifier(encoder.features(batch.views[0]))
                let loss = Tensor.crossEntropy(logits: logits, labels: batch.labels!)
                optimizer.zeroGrad()
                loss.backward()
                optimizer.step()
                let predicted = logits.argmax(alongAxis: 1).scalars(as: Double.self)
                correct += zip(predicted, batch.labels!).filter { Int($0) == $1 }.count
                seen += predicted.count
            }
            print(String(format: "epoch %d: training accuracy %.2f%%, kNN %.2f%% (%.1f min)", epoch + 1,
                         100 * Double(correct) / Double(seen), 100 * knn(), Date().timeIntervalSince(start) / 60))
        }
    }
}

HostSetup.useFastestBLASKernels()
Supervised.main()
