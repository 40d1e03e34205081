import Foundation
import Kappa

/// DINO's multi-crop augmentation (METHOD.md) on Float32 images [C, H, W] in [0, 1]:
/// random resized crops (global and local scale ranges, aspect ratio 3/4…4/3, bilinear
/// resampling), horizontal flip, color jitter (brightness, contrast, saturation, hue in a
/// random order; on grayscale only brightness and contrast), random grayscale, Gaussian blur,
/// solarization, and per-channel normalization; optionally (not in DINO) turns, shifts,
/// inversion and Gaussian pixel noise. Each sample's crops depend only on
/// (seed, epoch, sample index), never on thread timing.
public struct MultiCropAugmentation: Codable, Sendable, Equatable {
    /// Side of the global and local crops in pixels, and local crops per image (two global crops always).
    public var globalSize = 28, localSize = 14, localCrops = 4
    /// Area shares of the image a global and a local crop cover (DINO: 0.4–1 and 0.05–0.4).
    public var globalScale = 0.4...1.0, localScale = 0.05...0.4
    /// Probability of a horizontal flip.
    public var flipProbability = 0.5
    /// Probability of color jitter.
    public var jitterProbability = 0.8
    /// Color jitter strengths (torchvision's `ColorJitter`; grayscale images get brightness and contrast only).
    public var brightness = 0.4, contrast = 0.4, saturation = 0.2, hue = 0.1
    /// Probability of turning a color view gray.
    public var grayscaleProbability = 0.2
    /// Blur probabilities: first global crop, second global crop, local crops.
    public var blurProbabilities = [1.0, 0.1, 0.5]
    /// The Gaussian blur's σ range, in pixels.
    public var blurSigma = 0.1...2.0
    /// Solarization probability of the second global crop.
    public var solarizeProbability = 0.2
    /// Normalization of every view: (x − mean)/std.
    public var mean = 0.5, std = 0.25
    /// Probability of inverting a view (x → 1 − x): not in DINO; for data whose foreground
    /// polarity is a nuisance shared by both views of an image (the built-in shapes).
    public var invertProbability = 0.0
    /// Largest rotation of a crop, in degrees (each crop turns by a uniform angle in
    /// ±this); 0 in DINO. Pixels rotated in from outside repeat the image's edge.
    public var rotationDegrees = 0.0
    /// Largest shift of a crop's center, as a share of the image side (uniform in ±this on
    /// each axis, edges repeated); 0 in DINO, whose crops move only within the image.
    public var translation = 0.0
    /// Largest standard deviation of Gaussian pixel noise added to a view (each view draws
    /// its own in [0, this]); 0 in DINO.
    public var noiseStd = 0.0

    /// DINO's augmentations (METHOD.md), the memberwise defaults.
    public init() {}

    /// DINO's augmentations as published (METHOD.md).
    public static var dino: Self { Self() }

    /// Milder views for small images (28–32 pixels) trained from scratch on two cores, the
    /// default of ``DINOConfiguration``: global crops of 90–100% of the image, local crops of
    /// 70–90%, brightness and contrast jitter of 0.2, no flip, blur or solarization. With
    /// DINO's views a randomly initialized ViT's teacher assigns the two global crops of an
    /// image to the same prototype for 3.9% of MNIST images (1.2% for two different images),
    /// and training collapses to a uniform teacher. Crops that cut a shape can change its
    /// class (a cut ring is an arc, a cut plus a T or an L), so these keep most of the image.
    /// On data whose polarity varies from image to image (``ShapesDataset``) also set
    /// ``invertProbability`` to 0.5; on MNIST that costs 5 points of kNN (README).
    public static var smallImages: Self {
        var a = Self()
        a.globalScale = 0.9...1
        a.localScale = 0.7...0.9
        a.flipProbability = 0
        a.blurProbabilities = [0, 0, 0]
        a.solarizeProbability = 0
        (a.brightness, a.contrast) = (0.2, 0.2)
        return a
    }

    /// The 2 global crops then the local crops of one image, each [C, size, size], normalized.
    public func crops(of image: UnsafeBufferPointer<Float>, channels c: Int, height h: Int, width w: Int,
                      using g: inout RandomGenerator) -> [[Float]] {
        var out: [[Float]] = []
        for k in 0..<(2 + localCrops) {
            let global = k < 2
            let size = global ? globalSize : localSize
            var x = resizedCrop(image, c, h, w, size: size, scale: global ? globalScale : localScale, using: &g)
            if g.nextUniform() < flipProbability { flip(&x, c, size) }
            if g.nextUniform() < jitterProbability { jitter(&x, c, size, using: &g) }
            if c == 3 && g.nextUniform() < grayscaleProbability { grayscale(&x, size) }
            let blur = global ? blurProbabilities[k] : blurProbabilities[2]
            if g.nextUniform() < blur { gaussianBlur(&x, c, size, sigma: blurSigma.lowerBound + (blurSigma.upperBound - blurSigma.lowerBound) * g.nextUniform()) }
            if k == 1 && g.nextUniform() < solarizeProbability { for i in x.indices where x[i] >= 0.5 { x[i] = 1 - x[i] } }
            if invertProbability > 0 && g.nextUniform() < invertProbability { for i in x.indices { x[i] = 1 - x[i] } }
            if noiseStd > 0 {
                let sigma = noiseStd * g.nextUniform()
                for i in x.indices { x[i] += Float(sigma * g.nextNormal()) }
            }
            let (m, s) = (Float(mean), Float(1 / std))
            for i in x.indices { x[i] = (x[i] - m) * s }
            out.append(x)
        }
        return out
    }

    /// torchvision's RandomResizedCrop: up to 10 tries of a box with area in `scale` of the
    /// image and log-uniform aspect ratio in [3/4, 4/3], else the central crop; then, when
    /// enabled, turned by up to ±``rotationDegrees`` about its center and shifted by up to
    /// ±``translation``; resampled bilinearly to size × size, edges repeated.
    func resizedCrop(_ img: UnsafeBufferPointer<Float>, _ c: Int, _ h: Int, _ w: Int, size: Int, scale: ClosedRange<Double>,
                     using g: inout RandomGenerator) -> [Float] {
        var box = (top: 0.0, left: 0.0, height: Double(h), width: Double(w))
        var found = false
        for _ in 0..<10 {
            let area = Double(h * w) * (scale.lowerBound + (scale.upperBound - scale.lowerBound) * g.nextUniform())
            let ratio = Foundation.exp(Foundation.log(3.0 / 4) + (Foundation.log(4.0 / 3) - Foundation.log(3.0 / 4)) * g.nextUniform())
            let cw = (area * ratio).squareRoot().rounded(), ch = (area / ratio).squareRoot().rounded()
            if cw >= 1 && ch >= 1 && cw <= Double(w) && ch <= Double(h) {
                box = (Double(g.nextInt(below: h - Int(ch) + 1)), Double(g.nextInt(below: w - Int(cw) + 1)), ch, cw)
                found = true
                break
            }
        }
        if !found {
            let side = Double(Swift.min(h, w))
            box = ((Double(h) - side) / 2, (Double(w) - side) / 2, side, side)
        }
        // Rotation about the crop's center and a shift, drawn only when enabled so that views
        // without them consume the same random numbers as before.
        let angle = rotationDegrees > 0 ? (2 * g.nextUniform() - 1) * rotationDegrees * Double.pi / 180 : 0
        let (shiftX, shiftY) = translation > 0
            ? ((2 * g.nextUniform() - 1) * translation * Double(w), (2 * g.nextUniform() - 1) * translation * Double(h)) : (0, 0)
        let (ca, sa) = (Foundation.cos(angle), Foundation.sin(angle))
        var out = [Float](repeating: 0, count: c * size * size)
        for y in 0..<size {
            let py = (Double(y) + 0.5) * box.height / Double(size)
            for x in 0..<size {
                // (px, py): the output pixel's place in the box; turned about the box's center.
                let px = (Double(x) + 0.5) * box.width / Double(size)
                let (dx, dy) = (px - box.width / 2, py - box.height / 2)
                let (rx, ry) = angle == 0 ? (px, py) : (box.width / 2 + ca * dx - sa * dy, box.height / 2 + sa * dx + ca * dy)
                let sx = Swift.min(Swift.max(box.left + shiftX + rx - 0.5, 0), Double(w - 1))
                let sy = Swift.min(Swift.max(box.top + shiftY + ry - 0.5, 0), Double(h - 1))
                let y0 = Int(sy), y1 = Swift.min(y0 + 1, h - 1), fy = Float(sy - Double(y0))
                let x0 = Int(sx), x1 = Swift.min(x0 + 1, w - 1), fx = Float(sx - Double(x0))
                for k in 0..<c {
                    let p = k * h * w
                    let top = img[p + y0 * w + x0] * (1 - fx) + img[p + y0 * w + x1] * fx
                    let bottom = img[p + y1 * w + x0] * (1 - fx) + img[p + y1 * w + x1] * fx
                    out[(k * size + y) * size + x] = top * (1 - fy) + bottom * fy
                }
            }
        }
        return out
    }

    func flip(_ x: inout [Float], _ c: Int, _ n: Int) {
        for k in 0..<c { for y in 0..<n { for i in 0..<(n / 2) { x.swapAt((k * n + y) * n + i, (k * n + y) * n + n - 1 - i) } } }
    }

    func luminance(_ x: [Float], _ n: Int, _ i: Int) -> Float {
        0.299 * x[i] + 0.587 * x[n * n + i] + 0.114 * x[2 * n * n + i]
    }

    func grayscale(_ x: inout [Float], _ n: Int) {
        for i in 0..<(n * n) {
            let l = luminance(x, n, i)
            x[i] = l; x[n * n + i] = l; x[2 * n * n + i] = l
        }
    }

    /// torchvision's ColorJitter: the four adjustments in a random order, each with a factor
    /// drawn uniformly (hue as a rotation in the YIQ plane); values clamped to [0, 1].
    func jitter(_ x: inout [Float], _ c: Int, _ n: Int, using g: inout RandomGenerator) {
        var order = [0, 1, 2, 3]
        order.shuffle(using: &g)
        for op in order {
            switch op {
            case 0:
                let f = Float(1 + brightness * (2 * g.nextUniform() - 1))
                for i in x.indices { x[i] = Swift.min(Swift.max(x[i] * f, 0), 1) }
            case 1:
                let f = Float(1 + contrast * (2 * g.nextUniform() - 1))
                let mean = c == 3 ? (0..<(n * n)).reduce(Float(0)) { $0 + luminance(x, n, $1) } / Float(n * n)
                                  : x.reduce(0, +) / Float(x.count)
                for i in x.indices { x[i] = Swift.min(Swift.max((x[i] - mean) * f + mean, 0), 1) }
            case 2 where c == 3:
                let f = Float(1 + saturation * (2 * g.nextUniform() - 1))
                for i in 0..<(n * n) {
                    let l = luminance(x, n, i)
                    for k in 0..<3 { x[k * n * n + i] = Swift.min(Swift.max(l + (x[k * n * n + i] - l) * f, 0), 1) }
                }
            case 3 where c == 3:
                let angle = Float(hue * (2 * g.nextUniform() - 1) * 2 * Double.pi)
                let (ca, sa) = (Foundation.cos(angle), Foundation.sin(angle))
                for i in 0..<(n * n) {
                    let (r, gg, b) = (x[i], x[n * n + i], x[2 * n * n + i])
                    let y = 0.299 * r + 0.587 * gg + 0.114 * b
                    let iq = 0.596 * r - 0.274 * gg - 0.322 * b, q = 0.211 * r - 0.523 * gg + 0.312 * b
                    let (i2, q2) = (iq * ca - q * sa, iq * sa + q * ca)
                    x[i] = Swift.min(Swift.max(y + 0.956 * i2 + 0.621 * q2, 0), 1)
                    x[n * n + i] = Swift.min(Swift.max(y - 0.272 * i2 - 0.647 * q2, 0), 1)
                    x[2 * n * n + i] = Swift.min(Swift.max(y - 1.106 * i2 + 1.703 * q2, 0), 1)
                }
            default:
                break
            }
        }
    }

    /// Separable Gaussian blur with radius ⌈3σ⌉, edges clamped.
    func gaussianBlur(_ x: inout [Float], _ c: Int, _ n: Int, sigma: Double) {
        let r = Swift.max(1, Int((3 * sigma).rounded(.up)))
        var kernel = (-r...r).map { Float(Foundation.exp(-Double($0 * $0) / (2 * sigma * sigma))) }
        let s = kernel.reduce(0, +)
        kernel = kernel.map { $0 / s }
        var tmp = x
        for k in 0..<c {
            let p = k * n * n
            for y in 0..<n { for xx in 0..<n {
                var v: Float = 0
                for j in -r...r { v += kernel[j + r] * x[p + y * n + Swift.min(Swift.max(xx + j, 0), n - 1)] }
                tmp[p + y * n + xx] = v
            } }
            for y in 0..<n { for xx in 0..<n {
                var v: Float = 0
                for j in -r...r { v += kernel[j + r] * tmp[p + Swift.min(Swift.max(y + j, 0), n - 1) * n + xx] }
                x[p + y * n + xx] = v
            } }
        }
    }
}

/// One training batch: the crops of every view as tensors (the 2 global views first, then
/// the local views), and the images' labels and indices.
public struct MultiCropBatch: @unchecked Sendable {
    /// The views [B, C, H, W]: the two global crops, then the local crops.
    public let views: [Tensor]
    /// The dataset indices of the batch's images.
    public let indices: [Int]
    /// Their labels, when the dataset has them.
    public let labels: [Int]?
}

/// Produces the batches of one epoch on a background thread, a bounded queue ahead of the
/// training step: the sample order is a permutation drawn from (seed, epoch), and each
/// sample's crops from (seed, epoch, index), so batches are identical however threads run.
public final class MultiCropLoader: @unchecked Sendable {
    /// The images.
    public let dataset: ImageDataset
    /// The views made of each image.
    public let augmentation: MultiCropAugmentation
    /// Images per batch of this process (a last partial batch is dropped).
    public let batchSize: Int
    /// This process's shard: with `count` processes, each global batch of
    /// `count`·``batchSize`` images is split into `count` consecutive parts and this
    /// process takes part `index`. One process: (0, 1).
    public let shard: (index: Int, count: Int)
    /// With the epoch, what the permutation and every crop depend on.
    public let seed: UInt64
    private let condition = NSCondition()
    private var ready: [Int: MultiCropBatch] = [:]
    private var nextToDeliver = 0, produced = 0, stopped = false
    private let order: [Int]
    private let depth: Int
    private let workers: Int

    /// The number of full batches per epoch (the last partial global batch is dropped, as DINO).
    public var batchCount: Int { dataset.count / (batchSize * shard.count) }

    /// A loader of one epoch: a permutation of the images from (seed, epoch), views made on
    /// background threads through a queue of `queueDepth` batches. With `shard`, this
    /// process's part of each global batch (the permutation and every image's crops are
    /// the same in every process, so N processes see what one process with batch
    /// N·`batchSize` sees).
    public init(dataset: ImageDataset, augmentation: MultiCropAugmentation, batchSize: Int, seed: UInt64, epoch: Int,
                shard: (index: Int, count: Int) = (0, 1), queueDepth: Int = 2, workers: Int = 1) {
        precondition(shard.count >= 1 && (0..<shard.count).contains(shard.index),
                     "MultiCropLoader: shard \(shard.index) of \(shard.count)")
        precondition(batchSize > 0 && batchSize * shard.count <= dataset.count,
                     "MultiCropLoader: batch \(batchSize) × \(shard.count) processes for \(dataset.count) images")
        (self.dataset, self.augmentation, self.batchSize, self.seed, depth, self.workers) =
            (dataset, augmentation, batchSize, seed, Swift.max(1, queueDepth), Swift.max(1, workers))
        self.shard = shard
        var g = RandomGenerator(seed: MultiCropLoader.mix(seed, UInt64(epoch), 0xE90C))
        var order = Array(0..<dataset.count)
        order.shuffle(using: &g)
        self.order = order
        let epochSeed = MultiCropLoader.mix(seed, UInt64(epoch), 0xA06)
        Thread.detachNewThread { [self] in produce(epochSeed: epochSeed) }
    }

    deinit { stop() }

    static func mix(_ a: UInt64, _ b: UInt64, _ c: UInt64) -> UInt64 {
        var g = RandomGenerator(seed: a ^ (b &* 0x9E37_79B9_7F4A_7C15) ^ (c &* 0xC2B2_AE3D_27D4_EB4F))
        return g.next()
    }

    /// The crops of sample `index` in the epoch with this seed (what the loader computes).
    static func crops(_ dataset: ImageDataset, _ augmentation: MultiCropAugmentation, epochSeed: UInt64, index: Int) -> [[Float]] {
        var g = RandomGenerator(seed: mix(epochSeed, UInt64(index), 1))
        return dataset.images.withUnsafeBufferPointer { all in
            let one = UnsafeBufferPointer(rebasing: all[(index * dataset.imageSize)..<((index + 1) * dataset.imageSize)])
            return augmentation.crops(of: one, channels: dataset.channels, height: dataset.height, width: dataset.width, using: &g)
        }
    }

    private func produce(epochSeed: UInt64) {
        for b in 0..<batchCount {
            condition.lock()
            while !stopped && produced - nextToDeliver >= depth { condition.wait() }
            let stop = stopped
            condition.unlock()
            if stop { return }
            let first = (b * shard.count + shard.index) * batchSize
            let indices = Array(order[first..<(first + batchSize)])
            var perSample = [[[Float]]](repeating: [], count: indices.count)
            perSample.withUnsafeMutableBufferPointer { out in
                DispatchQueue.concurrentPerform(iterations: workers) { w in
                    for j in stride(from: w, to: indices.count, by: workers) {
                        out[j] = MultiCropLoader.crops(dataset, augmentation, epochSeed: epochSeed, index: indices[j])
                    }
                }
            }
            let views = (0..<(2 + augmentation.localCrops)).map { v -> Tensor in
                let size = v < 2 ? augmentation.globalSize : augmentation.localSize
                return Tensor(perSample.flatMap { $0[v] }, shape: [indices.count, dataset.channels, size, size])
            }
            let batch = MultiCropBatch(views: views, indices: indices, labels: dataset.labels.map { l in indices.map { l[$0] } })
            condition.lock()
            ready[b] = batch
            produced += 1
            condition.broadcast()
            condition.unlock()
        }
    }

    /// The next batch in order, waiting for the producer if needed; `nil` after the last.
    public func next() -> MultiCropBatch? {
        condition.lock()
        defer { condition.unlock() }
        guard nextToDeliver < batchCount else { return nil }
        while ready[nextToDeliver] == nil { condition.wait() }
        let batch = ready.removeValue(forKey: nextToDeliver)!
        nextToDeliver += 1
        condition.broadcast()
        return batch
    }

    /// Stops the producer (the loader is done or abandoned).
    public func stop() {
        condition.lock()
        stopped = true
        condition.broadcast()
        condition.unlock()
    }
}
