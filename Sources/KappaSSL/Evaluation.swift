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
        public let min: Double, p10: Double, median: Double, p90: Double, max: Double, mean: Double
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
