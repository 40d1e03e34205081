import Foundation
import Kappa
import KappaSSL
import Testing

let mnistFolder = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("shared/data/mnist").path

func scratch() -> String {
    let p = NSTemporaryDirectory() + "kappa-data-\(UUID().uuidString)"
    try! FileManager.default.createDirectory(atPath: p, withIntermediateDirectories: true)
    return p
}

func idxBytes(_ dims: [Int], _ payload: [UInt8]) -> [UInt8] {
    var b: [UInt8] = [0, 0, 8, UInt8(dims.count)]
    for d in dims { b += [UInt8(d >> 24 & 255), UInt8(d >> 16 & 255), UInt8(d >> 8 & 255), UInt8(d & 255)] }
    return b + payload
}

func npyBytes(_ descr: String, _ shape: [Int], _ payload: [UInt8]) -> [UInt8] {
    var header = "{'descr': '\(descr)', 'fortran_order': False, 'shape': (\(shape.map(String.init).joined(separator: ", "))\(shape.count == 1 ? "," : "")), }"
    while (10 + header.utf8.count + 1) % 64 != 0 { header += " " }
    header += "\n"
    return [0x93] + Array("NUMPY".utf8) + [1, 0, UInt8(header.utf8.count & 255), UInt8(header.utf8.count >> 8)] + Array(header.utf8) + payload
}

func expectDatasetError(_ fragment: String, sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void) {
    do {
        try body()
        Issue.record("no error", sourceLocation: sourceLocation)
    } catch let e as DatasetError {
        #expect(e.problem.contains(fragment), "\(e)", sourceLocation: sourceLocation)
    } catch {
        Issue.record("unexpected \(error)", sourceLocation: sourceLocation)
    }
}

@Suite("Datasets: built-in shapes, IDX, CIFAR-10, npy")
struct DataTests {
    @Test func shapesAreDeterministicAndBalanced() {
        let a = ShapesDataset.make(count: 500, size: 28, seed: 3), b = ShapesDataset.make(count: 500, size: 28, seed: 3)
        #expect(a.images == b.images && a.labels == b.labels)
        #expect(ShapesDataset.make(count: 10, seed: 4).images != a.subset(0..<10).images)
        let counts = (0..<10).map { c in a.labels!.filter { $0 == c }.count }
        #expect(counts.allSatisfy { $0 > 25 }, "\(counts)")
        #expect(a.images.allSatisfy { $0 >= 0 && $0 <= 1 })
        let rgb = ShapesDataset.make(count: 4, size: 32, channels: 3, seed: 1)
        #expect(rgb.channels == 3 && rgb.images.count == 4 * 3 * 32 * 32)
        // Image i depends only on (seed, i).
        #expect(ShapesDataset.make(count: 20, seed: 3).subset(5..<6).images == a.subset(5..<6).images)
    }

    @Test(.enabled(if: FileManager.default.fileExists(atPath: mnistFolder), "needs ../shared/data/mnist (the MNIST test set)"))
    func mnistFromShared() throws {
        let d = try DatasetFiles.load(mnistFolder)
        #expect(d.count == 10_000 && d.height == 28 && d.width == 28 && d.channels == 1)
        #expect(d.labels!.count == 10_000 && d.classCount == 10)
        #expect(d.labels!.prefix(5) == [7, 2, 1, 0, 4])  // the first t10k labels
    }

    @Test func idxRawAndGzipped() throws {
        let dir = scratch()
        let pixels = (0..<(3 * 2 * 2)).map { UInt8($0 * 20) }
        try Data(idxBytes([3, 2, 2], pixels)).write(to: URL(fileURLWithPath: dir + "/train-images-idx3-ubyte"))
        try Data(idxBytes([3], [1, 2, 3])).write(to: URL(fileURLWithPath: dir + "/train-labels-idx1-ubyte"))
        let d = try DatasetFiles.load(dir)
        #expect(d.count == 3 && d.labels == [1, 2, 3] && d.images[1] == 20 / 255)
        // gzip them (the system's gzip) and read again.
        let gz = Process()
        gz.executableURL = URL(fileURLWithPath: "/bin/gzip")
        gz.arguments = [dir + "/train-images-idx3-ubyte", dir + "/train-labels-idx1-ubyte"]
        try gz.run()
        gz.waitUntilExit()
        let z = try DatasetFiles.load(dir)
        #expect(z.images == d.images && z.labels == d.labels)
        // Truncated gzip, wrong counts, wrong magic.
        let gzData = try Data(contentsOf: URL(fileURLWithPath: dir + "/train-images-idx3-ubyte.gz"))
        try gzData.prefix(gzData.count - 8).write(to: URL(fileURLWithPath: dir + "/train-images-idx3-ubyte.gz"))
        expectDatasetError("gzip") { _ = try DatasetFiles.load(dir) }
        let bad = dir + "/x-images-idx3-ubyte"
        try Data(idxBytes([3, 2, 2], Array(pixels.prefix(11)))).write(to: URL(fileURLWithPath: bad))
        expectDatasetError("declares [3, 2, 2]") { _ = try DatasetFiles.load(bad) }
        try Data(idxBytes([0x7FFF_FFFF, 0x7FFF_FFFF, 0x7FFF_FFFF], [])).write(to: URL(fileURLWithPath: bad))
        expectDatasetError("declares") { _ = try DatasetFiles.load(bad) }
        try Data([0, 0, 9, 3]).write(to: URL(fileURLWithPath: bad))
        expectDatasetError("not an IDX file") { _ = try DatasetFiles.load(bad) }
    }

    @Test func cifarBatches() throws {
        let dir = scratch()
        var record = [UInt8](repeating: 7, count: 3073)
        record[0] = 3
        try Data(record + record).write(to: URL(fileURLWithPath: dir + "/data_batch_1.bin"))
        let d = try DatasetFiles.load(dir)
        #expect(d.count == 2 && d.channels == 3 && d.labels == [3, 3])
        try Data(record.prefix(3000)).write(to: URL(fileURLWithPath: dir + "/data_batch_1.bin"))
        expectDatasetError("3,073-byte") { _ = try DatasetFiles.load(dir) }
        record[0] = 12
        try Data(record).write(to: URL(fileURLWithPath: dir + "/data_batch_1.bin"))
        expectDatasetError("label 12") { _ = try DatasetFiles.load(dir) }
    }

    @Test func npyArrays() throws {
        let dir = scratch()
        // uint8 N×H×W×C with C = 3, and int64 labels.
        let pixels = (0..<(2 * 2 * 2 * 3)).map { UInt8($0) }
        try Data(npyBytes("|u1", [2, 2, 2, 3], pixels)).write(to: URL(fileURLWithPath: dir + "/images.npy"))
        var labels: [UInt8] = []
        for v in [4, 9] { labels += withUnsafeBytes(of: Int64(v).littleEndian, Array.init) }
        try Data(npyBytes("<i8", [2], labels)).write(to: URL(fileURLWithPath: dir + "/labels.npy"))
        let d = try DatasetFiles.load(dir)
        #expect(d.count == 2 && d.channels == 3 && d.height == 2 && d.labels == [4, 9])
        #expect(d.images[0] == 0 && d.images[1] == 3 / 255 && d.images[4] == 1 / 255)  // CHW from HWC
        // float32 N×H×W.
        var floats: [UInt8] = []
        for v: Float in [0.25, 0.5, 0.75, 1] { floats += withUnsafeBytes(of: v.bitPattern.littleEndian, Array.init) }
        let f = scratch() + "/f.npy"  // a folder without labels.npy
        try Data(npyBytes("<f4", [1, 2, 2], floats)).write(to: URL(fileURLWithPath: f))
        #expect(try DatasetFiles.load(f).images == [0.25, 0.5, 0.75, 1])
        try Data(npyBytes("<f4", [1, 2, 3], floats)).write(to: URL(fileURLWithPath: f))
        expectDatasetError("needs 24 bytes") { _ = try DatasetFiles.load(f) }
        try Data(npyBytes("<c8", [1, 2, 2], floats)).write(to: URL(fileURLWithPath: f))
        expectDatasetError("unsupported element type") { _ = try DatasetFiles.load(f) }
        try Data(Array("not numpy at all".utf8)).write(to: URL(fileURLWithPath: f))
        expectDatasetError("bad magic") { _ = try DatasetFiles.load(f) }
        expectDatasetError("no such file") { _ = try DatasetFiles.load(dir + "/absent.npy") }
    }
}
