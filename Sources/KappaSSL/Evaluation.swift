import Foundation
import Kappa
import KappaNN

/// Evaluation on frozen features, as in DINO's protocol.
public enum Evaluation {
    /// Features of every image of `dataset` from `encode` (run without gradients, in
    /// batches): [N, D].
    public static func features(of dataset: ImageDataset, batchSize: Int = 256, normalize: (mean: Double, std: Double) = (0.5, 0.25),
                                _ encode: (Tensor) -> Tensor) -> Tensor {
        withoutGradients {
            var parts: [Tensor] = []
            var start = 0
            while start < dataset.count {
                let end = Swift.min(start + batchSize, dataset.count)
                let x = (dataset.batch(Array(start..<end)) - normalize.mean) / normalize.std
                parts.append(encode(x).contiguous())
                start = end
            }
            return Tensor.concat(parts, alongAxis: 0)
        }
    }

    /// Raw pixels as features: [N, C·H·W].
    public static func pixels(of dataset: ImageDataset) -> Tensor {
        Tensor(dataset.images, shape: [dataset.count, dataset.imageSize])
    }

    /// DINO's weighted k-nearest-neighbour classifier: L2-normalized features, cosine
    /// similarity, the k most similar training samples vote with weight exp(sim/T).
    /// Returns the predicted label of each test sample.
    public static func knnPredict(train: Tensor, trainLabels: [Int], test: Tensor, k: Int = 20, temperature: Double = 0.07,
                                  classes: Int) -> [Int] {
        withoutGradients {
            let a = train.l2Normalized(alongAxis: 1), b = test.l2Normalized(alongAxis: 1)
            var predictions: [Int] = []
            let chunk = 500
            var start = 0
            while start < b.shape[0] {
                let end = Swift.min(start + chunk, b.shape[0])
                let sims = b[.range(start..<end)].matmul(a.transposed()).scalars(as: Float.self)
                let n = a.shape[0], kk = Swift.min(k, n)
                for row in 0..<(end - start) {
                    let s = sims[(row * n)..<((row + 1) * n)]
                    // Partial selection of the k largest similarities.
                    var best: [(Float, Int)] = []
                    for (j, v) in zip(s.indices, s) {
                        if best.count < kk { best.append((v, j - row * n)); if best.count == kk { best.sort { $0.0 > $1.0 } } }
                        else if v > best[kk - 1].0 {
                            var i = kk - 1
                            while i > 0 && best[i - 1].0 < v { i -= 1 }
                            best.insert((v, j - row * n), at: i)
                            best.removeLast()
                        }
                    }
                    var votes = [Double](repeating: 0, count: classes)
                    for (v, j) in best { votes[trainLabels[j]] += Foundation.exp(Double(v) / temperature) }
                    predictions.append(votes.indices.max { votes[$0] < votes[$1] }!)
                }
                start = end
            }
            return predictions
        }
    }

    /// The share of correct predictions.
    public static func accuracy(_ predictions: [Int], _ labels: [Int]) -> Double {
        Double(zip(predictions, labels).filter { $0 == $1 }.count) / Double(Swift.max(labels.count, 1))
    }

    /// A linear probe: a softmax classifier on standardized frozen features, trained with
    /// AdamW (full batch) for `epochs` steps; returns the test accuracy.
    public static func linearProbe(train: Tensor, trainLabels: [Int], test: Tensor, testLabels: [Int], classes: Int,
                                   steps: Int = 300, learningRate: Double = 0.01, weightDecay: Double = 1e-4, seed: UInt64 = 0) -> Double {
        let mean = train.mean(alongAxis: 0, keepingDims: true), std = train.standardDeviation(alongAxes: [0], keepingDims: true) + 1e-6
        let xs = ((train - mean) / std).detached(), xt = ((test - mean) / std).detached()
        var g = RandomGenerator(seed: seed)
        let layer = Linear(train.shape[1], classes, using: &g)
        let opt = AdamW(groups: ParameterGroup.dinoGroups(layer, learningRate: learningRate, weightDecay: weightDecay))
        for _ in 0..<steps {
            opt.zeroGrad()
            Tensor.crossEntropy(logits: layer(xs), labels: trainLabels).backward()
            opt.step()
        }
        let predictions = withoutGradients { layer(xt).argmax(alongAxis: 1).scalars(as: Double.self).map { Int($0) } }
        return accuracy(predictions, testLabels)
    }

    /// How many prototypes are the arg-max for at least one row of `logits` [N, K].
    public static func utilization(_ logits: Tensor) -> Int {
        Set(logits.argmax(alongAxis: 1).scalars(as: Double.self).map { Int($0) }).count
    }

    /// Summary statistics of a list of values.
    public struct Summary: Codable, Sendable {
        /// Quantiles (nearest rank) and the mean.
        public let min: Double, p10: Double, median: Double, p90: Double, max: Double, mean: Double
        /// The summary of `values` (NaN quantiles when empty).
        public init(_ values: [Double]) {
            let s = values.sorted()
            func q(_ f: Double) -> Double { s.isEmpty ? .nan : s[Swift.min(s.count - 1, Int(f * Double(s.count - 1)))] }
            (min, p10, median, p90, max) = (q(0), q(0.1), q(0.5), q(0.9), q(1))
            mean = s.reduce(0, +) / Double(Swift.max(s.count, 1))
        }
    }

    /// kNN accuracy of the test samples grouped by the norm quartile of their arg-max
    /// prototype (the paper's analysis): four accuracies (NaN for an empty group) with counts.
    public static func accuracyByPrototypeNorm(predictions: [Int], labels: [Int], argmax: [Int], norms: [Double]) -> [(accuracy: Double, count: Int)] {
        let sorted = norms.sorted()
        let cuts = [0.25, 0.5, 0.75].map { sorted[Swift.min(sorted.count - 1, Int($0 * Double(sorted.count)))] }
        var right = [Int](repeating: 0, count: 4), total = [Int](repeating: 0, count: 4)
        for i in predictions.indices {
            let n = norms[argmax[i]]
            let q = cuts.filter { n >= $0 }.count
            total[q] += 1
            if predictions[i] == labels[i] { right[q] += 1 }
        }
        return (0..<4).map { (total[$0] > 0 ? Double(right[$0]) / Double(total[$0]) : .nan, total[$0]) }
    }
}

/// The evaluation of a run: the trained teacher against the two baselines of the same split.
public struct EvaluationReport: Codable, Sendable {
    /// Epochs trained when it was made.
    public var epoch: Int
    /// Weighted kNN accuracy (k = 20, T = 0.07) of the teacher's backbone features.
    public var knn: Double
    /// Linear-probe accuracy, when it was run.
    public var linearProbe: Double?
    /// kNN on raw pixels and on the randomly initialized backbone (the student's initialization).
    public var knnRawPixels: Double
    /// (See ``knnRawPixels``.)
    public var knnRandomInit: Double
    /// Prototypes that are the arg-max for at least one evaluation image, of K.
    public var utilization: Int, prototypes: Int
    /// The teacher's prototype norms ‖w_k‖.
    public var prototypeNorms: Evaluation.Summary
    /// kNN accuracy of test samples by the norm quartile of their arg-max prototype (nil for
    /// a quartile no sample fell in).
    public var knnByNormQuartile: [Double?]
    /// Test samples in each of those quartiles.
    public var quartileCounts: [Int]
    /// The teacher's prototype norms ‖w_k‖, all K (for histograms).
    public var prototypeNormValues: [Double]?
    /// How many test samples each prototype is the arg-max for: the teacher's assignment, K counts.
    public var assignmentCounts: [Int]?
}

/// Evaluates a teacher on frozen features, from `reference` (the labeled training split) to
/// `test`: kNN (k = 20, T = 0.07) and a linear probe, the two baselines (raw pixels, the
/// randomly initialized network; computed once per evaluator, since they do not change during
/// a run), prototype utilization and norms on `test`.
public final class Evaluator {
    /// The labeled split the classifiers fit on, and the split they are measured on.
    public let reference: ImageDataset, test: ImageDataset
    let trainLabels: [Int], testLabels: [Int]
    let classes: Int
    private var baselineCache: (raw: Double, random: Double)?

    /// Throws ``TrainerError`` when a split has no labels or no images.
    public init(reference: ImageDataset, test: ImageDataset) throws {
        guard let trainLabels = reference.labels, let testLabels = test.labels else {
            throw TrainerError("evaluation needs labels on both splits (\(reference.source), \(test.source))")
        }
        guard reference.count >= 1, test.count >= 1 else {
            throw TrainerError("evaluation needs images in both splits: \(reference.count) reference, \(test.count) test")
        }
        // Labels become dense class indices, so that the classifiers' sizes follow the number
        // of classes, not the largest label.
        let classIDs = Array(Set(trainLabels).union(testLabels)).sorted()
        var index: [Int: Int] = [:]
        for (i, label) in classIDs.enumerated() { index[label] = i }
        (self.reference, self.test) = (reference, test)
        self.trainLabels = trainLabels.map { index[$0]! }
        self.testLabels = testLabels.map { index[$0]! }
        classes = classIDs.count
    }

    /// Evaluates the trainer's teacher (backbone features for kNN and the probe, the head for
    /// utilization and norms).
    public func evaluate(_ trainer: TeacherStudentTrainer, linearProbe: Bool = true) -> EvaluationReport {
        let c = trainer.configuration
        let (teacher, teacherHead) = (trainer.teacher, trainer.teacherHead)
        let norm = (c.augmentation.mean, c.augmentation.std)
        teacher.eval(); teacherHead.eval()
        defer { teacher.train(); teacherHead.train() }
        let fTrain = Self.features(of: reference, normalize: norm) { teacher.features($0) }
        let fTest = Self.features(of: test, normalize: norm) { teacher.features($0) }
        let predictions = Evaluation.knnPredict(train: fTrain, trainLabels: trainLabels, test: fTest, classes: classes)
        let knn = Evaluation.accuracy(predictions, testLabels)
        let probe = linearProbe ? Evaluation.linearProbe(train: fTrain, trainLabels: trainLabels, test: fTest,
                                                         testLabels: testLabels, classes: classes) : nil
        let (raw, randomKNN) = baselines(c)
        let logits = withoutGradients { teacherHead(fTest).logits }
        let argmax = logits.argmax(alongAxis: 1).scalars(as: Double.self).map { Int($0) }
        let norms = teacherHead.prototypeNorms.scalars(as: Double.self)
        let byNorm = Evaluation.accuracyByPrototypeNorm(predictions: predictions, labels: testLabels, argmax: argmax, norms: norms)
        return EvaluationReport(epoch: trainer.epoch, knn: knn, linearProbe: probe, knnRawPixels: raw, knnRandomInit: randomKNN,
                                utilization: Set(argmax).count, prototypes: c.prototypes,
                                prototypeNorms: Evaluation.Summary(norms), knnByNormQuartile: byNorm.map { $0.count > 0 ? $0.accuracy : nil },
                                quartileCounts: byNorm.map(\.count), prototypeNormValues: norms,
                                assignmentCounts: argmax.reduce(into: [Int](repeating: 0, count: c.prototypes)) { $0[$1] += 1 })
    }

    /// kNN accuracy of any encoder's features (the student of a supervised run, say), with
    /// images normalized by `normalization` (mean, std) as the views were.
    public func knn(_ encoder: FeatureEncoder, normalization: (mean: Double, std: Double)) -> Double {
        let wasTraining = encoder.isTraining
        encoder.eval()
        defer { if wasTraining { encoder.train() } }
        let fTrain = Self.features(of: reference, normalize: normalization) { encoder.features($0) }
        let fTest = Self.features(of: test, normalize: normalization) { encoder.features($0) }
        return Evaluation.accuracy(Evaluation.knnPredict(train: fTrain, trainLabels: trainLabels, test: fTest, classes: classes), testLabels)
    }

    /// ``Evaluation/features(of:batchSize:normalize:_:)`` computed in shards over the processes
    /// of `Distributed.world` (each embeds about 1/N of the images, then all gather them);
    /// every process gets all the features, so the classifiers after it give every process the
    /// same numbers. The same as unsharded with one process.
    static func features(of dataset: ImageDataset, normalize: (mean: Double, std: Double), _ encode: (Tensor) -> Tensor) -> Tensor {
        let (n, size) = (dataset.count, Distributed.size)
        let per = (n + size - 1) / size
        guard size > 1, (size - 1) * per < n else { return Evaluation.features(of: dataset, normalize: normalize, encode) }
        let start = Distributed.rank * per, end = Swift.min(n, start + per)
        var mine = Evaluation.features(of: dataset.subset(start..<end), normalize: normalize, encode)
        if end - start < per {   // the last shard is padded to the others' length
            mine = Tensor.concat([mine, Tensor.zeros([per - (end - start), mine.shape[1]], dtype: mine.dtype)], alongAxis: 0)
        }
        return Distributed.allGather(mine)[0..<n].contiguous()
    }

    /// kNN on raw pixels and on the randomly initialized backbone of `c` (the student's initialization).
    func baselines(_ c: DINOConfiguration) -> (raw: Double, random: Double) {
        if let b = baselineCache { return b }
        let raw = Evaluation.accuracy(Evaluation.knnPredict(train: Evaluation.pixels(of: reference), trainLabels: trainLabels,
                                                            test: Evaluation.pixels(of: test), classes: classes), testLabels)
        var g = RandomGenerator(seed: c.seed)
        let random = knn(c.backbone.make(using: &g), normalization: (c.augmentation.mean, c.augmentation.std))
        baselineCache = (raw, random)
        return (raw, random)
    }
}
