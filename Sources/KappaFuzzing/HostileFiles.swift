import CZlib
import Foundation
import Kappa
import KappaNN
import KappaSSL

/// Hostile-file testing of every reader Kappa has: valid seed files are mutated (truncated,
/// bit-flipped, given huge, negative or absurd sizes and shapes, spliced, replaced by random
/// bytes) and each mutant is read. A reader passes when every mutant is either read or
/// rejected with a thrown error that names the file, within a time limit, without a crash
/// and without allocating what a corrupt header declares.
///
/// Written by hand: no package on this machine's list mutates structured files (libFuzzer
/// needs a separate sanitizer build and does not run inside `swift test`).
public enum HostileFiles {
    /// One reader under test: its seed files and how to read a file.
    public struct Reader {
        public let name: String
        /// File name used for the mutants (the extension matters to format detection).
        public let fileName: String
        public let seeds: [[UInt8]]
        public let read: (String) throws -> Void
    }

    /// What a campaign saw.
    public struct Outcome: CustomStringConvertible {
        public var reader: String
        public var cases = 0, read = 0, rejected = 0
        /// Mutants that produced an error not naming the file, or took too long.
        public var failures: [String] = []
        public var slowest = 0.0
        public var peakResidentBytes = 0

        public var description: String {
            let mb = Double(peakResidentBytes) / 1_048_576
            return "\(reader): \(cases) mutants, \(read) read, \(rejected) rejected with the file named, \(failures.count) failures; "
                + String(format: "slowest %.1f ms, peak resident %.0f MB", slowest * 1000, mb)
        }
    }

    /// Peak resident memory of this process so far, in bytes.
    public static var peakResidentBytes: Int { ProcessMemory.peakResidentBytes }

    /// A mutant of `bytes`: one to three of the mutations below.
    public static func mutate(_ bytes: [UInt8], using g: inout RandomGenerator) -> [UInt8] {
        var b = bytes
        for _ in 0...g.nextInt(below: 3) {
            let n = b.count
            switch g.nextInt(below: 10) {
            case 0 where n > 0:  // truncate
                b.removeLast(n - g.nextInt(below: n))
            case 1 where n > 0:  // flip bits
                for _ in 0...g.nextInt(below: 8) { b[g.nextInt(below: n)] ^= UInt8(1 << g.nextInt(below: 8)) }
            case 2 where n > 0:  // extreme bytes
                for _ in 0...g.nextInt(below: 4) { b[g.nextInt(below: n)] = [0, 0xFF, 0x7F, 0x80][g.nextInt(below: 4)] }
            case 3 where n >= 8:  // a huge, negative or zero integer, big- or little-endian, 4 or 8 bytes
                let values: [UInt64] = [0, 1, 0xFFFF_FFFF, 0x7FFF_FFFF, 0x8000_0000, UInt64.max, UInt64(Int64.max), 1 << 40, 0xFFFF_FFFF_FFFF_FFFE]
                let v = values[g.nextInt(below: values.count)]
                let width = g.nextUniform() < 0.5 ? 4 : 8
                let at = g.nextInt(below: n - width + 1)
                let big = g.nextUniform() < 0.5
                for i in 0..<width { b[at + i] = UInt8(truncatingIfNeeded: v >> UInt64(8 * (big ? width - 1 - i : i))) }
            case 4 where n > 0:  // digits in a text header become huge or negative numbers
                if let i = b.indices.filter({ b[$0] >= 0x30 && b[$0] <= 0x39 }).randomElement(using: &g) {
                    let text = ["99999999999999999999", "-1", "-9223372036854775808", "4294967296", "0", "1e9", "2147483647"][g.nextInt(below: 7)]
                    b.replaceSubrange(i...i, with: Array(text.utf8))
                }
            case 5:  // insert random bytes
                let at = g.nextInt(below: n + 1)
                b.insert(contentsOf: (0..<(1 + g.nextInt(below: 16))).map { _ in UInt8(g.nextInt(below: 256)) }, at: at)
            case 6 where n > 1:  // delete a range
                let a = g.nextInt(below: n), len = 1 + g.nextInt(below: Swift.min(64, n - a))
                b.removeSubrange(a..<(a + len))
            case 7 where n > 1:  // duplicate a range
                let a = g.nextInt(below: n), len = 1 + g.nextInt(below: Swift.min(256, n - a))
                b.insert(contentsOf: b[a..<(a + len)], at: g.nextInt(below: n))
            case 8:  // random bytes of random length
                b = (0..<g.nextInt(below: 512)).map { _ in UInt8(g.nextInt(below: 256)) }
            default:  // structural characters of a JSON or Python-dict header
                if n > 0 {
                    let marks: [UInt8] = Array("{}[]():,'\"".utf8)
                    b[g.nextInt(below: n)] = marks[g.nextInt(below: marks.count)]
                }
            }
        }
        return b
    }

    /// Reads `iterations` mutants of the reader's seeds (cycling through them) from
    /// `directory`, deterministically per `seed`.
    public static func run(_ reader: Reader, iterations: Int, seed: UInt64, directory: URL,
                           timeLimit: Double = 5) -> Outcome {
        var g = RandomGenerator(seed: seed)
        var outcome = Outcome(reader: reader.name)
        let path = directory.appendingPathComponent(reader.fileName).path
        for i in 0..<iterations {
            let mutant = mutate(reader.seeds[i % reader.seeds.count], using: &g)
            do { try Data(mutant).write(to: URL(fileURLWithPath: path)) } catch {
                outcome.failures.append("mutant \(i): could not be written: \(error)")
                continue
            }
            let start = Date()
            do {
                try reader.read(path)
                outcome.read += 1
            } catch {
                if "\(error)".contains(path) { outcome.rejected += 1 }
                else { outcome.failures.append("mutant \(i): error without the file name: \(error)") }
            }
            let elapsed = Date().timeIntervalSince(start)
            outcome.slowest = Swift.max(outcome.slowest, elapsed)
            if elapsed > timeLimit { outcome.failures.append("mutant \(i): took \(elapsed) s") }
            outcome.cases += 1
        }
        outcome.peakResidentBytes = peakResidentBytes
        return outcome
    }

    /// gzip-compresses `bytes` (for the compressed IDX seeds).
    public static func gzip(_ bytes: [UInt8]) -> [UInt8] {
        var stream = z_stream()
        deflateInit2_(&stream, Z_DEFAULT_COMPRESSION, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY, ZLIB_VERSION,
                      Int32(MemoryLayout<z_stream>.size))
        defer { deflateEnd(&stream) }
        var input = bytes
        var output = [UInt8](repeating: 0, count: Int(deflateBound(&stream, UInt(bytes.count))) + 64)
        let written = input.withUnsafeMutableBufferPointer { inBuf in
            output.withUnsafeMutableBufferPointer { outBuf -> Int in
                stream.next_in = inBuf.baseAddress
                stream.avail_in = UInt32(inBuf.count)
                stream.next_out = outBuf.baseAddress
                stream.avail_out = UInt32(outBuf.count)
                deflate(&stream, Z_FINISH)
                return outBuf.count - Int(stream.avail_out)
            }
        }
        return Array(output[0..<written])
    }

    static func be32(_ v: Int) -> [UInt8] { [UInt8(v >> 24 & 0xFF), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }

    /// A well-formed version-1 `.npy` file of `shape` holding `payload`.
    public static func npy(descr: String, shape: [Int], payload: [UInt8]) -> [UInt8] {
        let dims = shape.count == 1 ? "(\(shape[0]),)" : "(" + shape.map(String.init).joined(separator: ", ") + ")"
        var header = "{'descr': '\(descr)', 'fortran_order': False, 'shape': \(dims), }"
        while (10 + header.utf8.count + 1) % 64 != 0 { header += " " }
        return npyFile(header: header + "\n", payload: payload)
    }

    /// A version-1 `.npy` file around a header text, as written (no checks: tests feed it
    /// malformed headers).
    public static func npyFile(header: String, payload: [UInt8] = []) -> [UInt8] {
        let len = header.utf8.count
        return [0x93] + Array("NUMPY".utf8) + [1, 0, UInt8(len & 0xFF), UInt8(len >> 8)] + Array(header.utf8) + payload
    }

    /// Every reader, with seed files built from the built-in dataset; `directory` holds the
    /// fixed companion files some readers need (the images beside a labels file, a
    /// checkpoint's trainer).
    public static func readers(directory: URL) throws -> [Reader] {
        let shapes = ShapesDataset.make(count: 6, size: 12, channels: 1, seed: 5)
        let pixels = shapes.images.map { UInt8(Swift.max(0, Swift.min(255, $0 * 255))) }
        let labels = shapes.labels!.map(UInt8.init)
        var idxImages: [UInt8] = [0, 0, 8, 3]
        for d in [6, 12, 12] { idxImages += be32(d) }
        idxImages += pixels
        var idxLabels: [UInt8] = [0, 0, 8, 1]
        idxLabels += be32(6)
        idxLabels += labels
        let imagesPath = directory.appendingPathComponent("fixed-images-idx3-ubyte").path
        try Data(idxImages).write(to: URL(fileURLWithPath: imagesPath))

        var cifar: [UInt8] = []
        for r in 0..<3 {
            cifar.append(UInt8(r))
            for i in 0..<3072 { cifar.append(UInt8(truncatingIfNeeded: i * 7 + r)) }
        }
        let rgb: [Float] = (0..<(4 * 8 * 8 * 3)).map { (i: Int) -> Float in Float(i % 17) / 16 }
        let rgbBytes = rgb.flatMap { withUnsafeBytes(of: $0.bitPattern.littleEndian, Array.init) }
        let npyImagesPath = directory.appendingPathComponent("fixed-images.npy").path
        try Data(npy(descr: "|u1", shape: [6, 12, 12], payload: pixels)).write(to: URL(fileURLWithPath: npyImagesPath))
        let labelBytes = shapes.labels!.flatMap { withUnsafeBytes(of: Int64($0).littleEndian, Array.init) }

        var g = RandomGenerator(seed: 9)
        let safetensorsURL = directory.appendingPathComponent("seed.safetensors")
        try SafeTensors.write([("a", Tensor.randomNormal([3, 4], using: &g)), ("b.weight", Tensor.randomNormal([5], dtype: .float64, using: &g))],
                              metadata: ["note": "seed"], to: safetensorsURL)
        let safetensorsSeed = [UInt8](try Data(contentsOf: safetensorsURL))

        var c = DINOConfiguration()
        c.backbone = .vit(ViTConfiguration(imageSize: 8, patchSize: 4, channels: 1, width: 8, depth: 1, heads: 2, mlpRatio: 2))
        (c.prototypes, c.headHidden, c.bottleneck, c.batchSize, c.epochs, c.warmupEpochs) = (8, 8, 4, 4, 2, 1)
        (c.augmentation.globalSize, c.augmentation.localSize, c.augmentation.localCrops) = (8, 4, 2)
        let tiny = ShapesDataset.make(count: 8, size: 8, channels: 1, seed: 1)
        let trainer = try TeacherStudentTrainer(configuration: c, train: tiny)
        let checkpointURL = directory.appendingPathComponent("seed-checkpoint.safetensors")
        try RunCheckpoint.save(trainer, to: checkpointURL)
        let checkpointSeed = [UInt8](try Data(contentsOf: checkpointURL))

        return [
            Reader(name: "IDX images", fileName: "m-images-idx3-ubyte", seeds: [idxImages, gzip(idxImages)]) {
                _ = try DatasetFiles.idx(images: $0, labels: nil)
            },
            Reader(name: "IDX labels", fileName: "m-labels-idx1-ubyte", seeds: [idxLabels, gzip(idxLabels)]) {
                _ = try DatasetFiles.idx(images: imagesPath, labels: $0)
            },
            Reader(name: "CIFAR-10 batch", fileName: "data_batch_1.bin", seeds: [cifar]) { _ = try DatasetFiles.cifar10([$0]) },
            Reader(name: ".npy images", fileName: "images.npy",
                   seeds: [npy(descr: "|u1", shape: [6, 12, 12], payload: pixels), npy(descr: "<f4", shape: [4, 8, 8, 3], payload: rgbBytes)]) {
                _ = try DatasetFiles.npy(images: $0, labels: nil)
            },
            Reader(name: ".npy labels", fileName: "labels.npy", seeds: [npy(descr: "<i8", shape: [6], payload: labelBytes)]) {
                _ = try DatasetFiles.npy(images: npyImagesPath, labels: $0)
            },
            Reader(name: "safetensors", fileName: "m.safetensors", seeds: [safetensorsSeed]) {
                _ = try SafeTensors.read(URL(fileURLWithPath: $0))
            },
            Reader(name: "training state", fileName: "checkpoint.safetensors", seeds: [checkpointSeed]) {
                let url = URL(fileURLWithPath: $0)
                _ = try RunCheckpoint.configuration(in: url)
                try RunCheckpoint.restore(trainer, from: url)
            },
        ]
    }
}
