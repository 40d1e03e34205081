import Foundation
import Kappa
import KappaNN

/// Images as Float32 values in [0, 1], laid out [N, C, H, W], with optional integer labels.
public struct ImageDataset: Sendable {
    /// Pixels in [0, 1], [count, channels, height, width] row-major.
    public let images: [Float]
    /// One class per image, when known.
    public let labels: [Int]?
    /// The images' number and shape.
    public let count: Int, channels: Int, height: Int, width: Int
    /// Where the data came from, for reports.
    public let source: String

    /// A dataset; `source` names it in reports.
    public init(images: [Float], labels: [Int]?, count: Int, channels: Int, height: Int, width: Int, source: String) {
        precondition(images.count == count * channels * height * width,
                     "ImageDataset: \(images.count) values for \(count)×\(channels)×\(height)×\(width)")
        precondition(labels == nil || labels!.count == count, "ImageDataset: \(labels!.count) labels for \(count) images")
        (self.images, self.labels, self.count, self.channels, self.height, self.width, self.source) =
            (images, labels, count, channels, height, width, source)
    }

    /// Values per image.
    public var imageSize: Int { channels * height * width }

    /// The images at `indices` as a tensor [B, C, H, W].
    public func batch(_ indices: [Int], dtype: DType = .float32) -> Tensor {
        var values = [Float]()
        values.reserveCapacity(indices.count * imageSize)
        for i in indices { values += images[(i * imageSize)..<((i + 1) * imageSize)] }
        return Tensor(values, shape: [indices.count, channels, height, width], dtype: dtype)
    }

    /// The images in `range`, as a dataset.
    public func subset(_ range: Range<Int>) -> ImageDataset {
        precondition(range.lowerBound >= 0 && range.upperBound <= count, "subset: \(range) is outside 0..<\(count)")
        return ImageDataset(images: Array(images[(range.lowerBound * imageSize)..<(range.upperBound * imageSize)]),
                            labels: labels.map { Array($0[range]) }, count: range.count, channels: channels,
                            height: height, width: width, source: "\(source)[\(range.lowerBound)..<\(range.upperBound)]")
    }

    /// The number of distinct labels (0 without labels).
    public var classCount: Int { (labels?.max() ?? -1) + 1 }
}

/// A dataset file that is malformed, truncated or of an unknown kind.
/// The errors of dataset files (KappaNN's `FileError`, the type every reader throws).
public typealias DatasetError = FileError

// MARK: The built-in procedural dataset

/// A labeled image dataset drawn procedurally, needing no files: ten classes of outline
/// shapes (circle, square, triangle, plus, bar, two bars, T, L, arc, ring with a dot) whose
/// position, scale, rotation (±30°), stroke width, intensity or color, background texture
/// (a random low-frequency wave) and pixel noise vary from image to image, so that nearest
/// neighbours on raw pixels are weak and invariant features are needed. Half of the images
/// are light on dark, half dark on light: self-supervised views should invert
/// (``MultiCropAugmentation/invertProbability`` 0.5, what `DINOvMF` does on this data), or
/// the polarity both views share becomes a feature. Deterministic by seed: image i depends
/// only on (seed, i).
public enum ShapesDataset {
    /// The ten classes, in label order.
    public static let classNames = ["circle", "square", "triangle", "plus", "bar", "two bars", "T", "L", "arc", "ring and dot"]

    /// `count` images of `size`² pixels drawn from `seed`, the labels cycling through the classes.
    public static func make(count: Int, size: Int = 28, channels: Int = 1, seed: UInt64 = 0) -> ImageDataset {
        precondition(count >= 0 && size >= 8 && (channels == 1 || channels == 3),
                     "ShapesDataset: \(count) images of \(size)×\(size)×\(channels)")
        let per = channels * size * size
        var images = [Float](repeating: 0, count: count * per)
        var labels = [Int](repeating: 0, count: count)
        images.withUnsafeMutableBufferPointer { buf in
            let base = buf.baseAddress!
            labels.withUnsafeMutableBufferPointer { lab in
                DispatchQueue.concurrentPerform(iterations: Swift.max(1, Swift.min(count, 8))) { chunk in
                    let chunks = Swift.max(1, Swift.min(count, 8))
                    for i in (count * chunk / chunks)..<(count * (chunk + 1) / chunks) {
                        var g = RandomGenerator(seed: seed &* 0x9E37_79B9_7F4A_7C15 &+ UInt64(i))
                        let label = g.nextInt(below: 10)
                        lab[i] = label
                        draw(label, into: base + i * per, size: size, channels: channels, using: &g)
                    }
                }
            }
        }
        return ImageDataset(images: images, labels: labels, count: count, channels: channels, height: size, width: size,
                            source: "shapes(count: \(count), size: \(size), channels: \(channels), seed: \(seed))")
    }

    /// The training and evaluation splits of the built-in data that the programs use:
    /// training images from `seed`, evaluation images from another seed, so none is in both.
    public static func splits(train: Int, evaluation: Int, size: Int = 28, seed: UInt64) -> (train: ImageDataset, test: ImageDataset) {
        (make(count: train, size: size, seed: seed), make(count: evaluation, size: size, seed: seed &+ 1_000_003))
    }

    static func box(_ x: Double, _ y: Double, _ hx: Double, _ hy: Double) -> Double {
        let dx = Swift.abs(x) - hx, dy = Swift.abs(y) - hy
        let outside = (Swift.max(dx, 0) * Swift.max(dx, 0) + Swift.max(dy, 0) * Swift.max(dy, 0)).squareRoot()
        return outside + Swift.min(Swift.max(dx, dy), 0)
    }

    /// Signed distance (in units of the shape's radius r = 1) to class `label`'s outline, for stroke s.
    static func distance(_ label: Int, _ x: Double, _ y: Double, _ s: Double) -> Double {
        let ring = { (r: Double) in Swift.abs((x * x + y * y).squareRoot() - r) - s / 2 }
        switch label {
        case 0: return ring(1)
        case 1: return Swift.abs(box(x, y, 0.85, 0.85)) - s / 2
        case 2:
            // Equilateral triangle (inradius 0.5): the largest of the three edge distances.
            let d = (0..<3).map { k -> Double in
                let t = -Double.pi / 2 + 2 * Double.pi * Double(k) / 3
                return Foundation.cos(t) * x + Foundation.sin(t) * y
            }.max()! - 0.5
            return Swift.abs(d) - s / 2
        case 3: return Swift.min(box(x, y, 1, s / 2), box(x, y, s / 2, 1))
        case 4: return box(x, y, 1, s / 2)
        case 5: return Swift.min(box(x, y - 0.45, 1, s / 2), box(x, y + 0.45, 1, s / 2))
        case 6: return Swift.min(box(x, y + 0.8, 0.9, s / 2), box(x, y - 0.1, s / 2, 0.9))
        case 7: return Swift.min(box(x + 0.7, y, s / 2, 1), box(x, y - 0.9, 0.8, s / 2))
        case 8: return Swift.max(ring(0.9), y)
        default: return Swift.min(ring(1), (x * x + y * y).squareRoot() - 0.25)
        }
    }

    static func draw(_ label: Int, into p: UnsafeMutablePointer<Float>, size: Int, channels: Int, using g: inout RandomGenerator) {
        let n = Double(size)
        let radius = n * (0.22 + 0.16 * g.nextUniform())
        let cx = n / 2 + (g.nextUniform() - 0.5) * (n - 2 * radius) * 0.8
        let cy = n / 2 + (g.nextUniform() - 0.5) * (n - 2 * radius) * 0.8
        let angle = (g.nextUniform() - 0.5) * Double.pi / 3
        let stroke = 0.12 + 0.2 * g.nextUniform()
        let (ca, sa) = (Foundation.cos(angle), Foundation.sin(angle))
        // Foreground and background: color or intensity, a wave texture, noise.
        var fg = [Double](repeating: 0, count: channels), bg = [Double](repeating: 0, count: channels)
        let bright = g.nextUniform() < 0.5
        for c in 0..<channels {
            let level = channels == 1 ? 1.0 : 0.6 + 0.4 * g.nextUniform()
            fg[c] = bright ? (0.65 + 0.35 * g.nextUniform()) * level : 0.05 + 0.25 * g.nextUniform()
            bg[c] = bright ? 0.05 + 0.3 * g.nextUniform() : 0.6 + 0.35 * g.nextUniform()
        }
        let (fx, fy) = (g.nextUniform() * 0.6, g.nextUniform() * 0.6), phase = g.nextUniform() * 2 * Double.pi
        let texture = 0.05 + 0.1 * g.nextUniform(), noise = 0.02 + 0.06 * g.nextUniform()
        let plane = size * size
        for yy in 0..<size {
            for xx in 0..<size {
                let dx = (Double(xx) + 0.5 - cx) / radius, dy = (Double(yy) + 0.5 - cy) / radius
                let (x, y) = (ca * dx + sa * dy, -sa * dx + ca * dy)
                let d = distance(label, x, y, stroke) * radius  // in pixels
                let coverage = Swift.min(Swift.max(0.5 - d, 0), 1)
                let wave = texture * Foundation.sin(fx * Double(xx) + fy * Double(yy) + phase)
                for c in 0..<channels {
                    var v = bg[c] + wave + coverage * (fg[c] - bg[c] - wave)
                    v += noise * g.nextNormal()
                    p[c * plane + yy * size + xx] = Float(Swift.min(Swift.max(v, 0), 1))
                }
            }
        }
    }
}
