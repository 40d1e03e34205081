import Foundation
import Kappa
import KappaFuzzing
import KappaNN
import KappaSSL
import Testing

/// Every reader against mutated files: each mutant is read or rejected with an error naming
/// the file, quickly, and no corrupt header makes a reader allocate what it declares.
/// `swift run -c release KappaFuzz 10000` runs the same campaign at 10,000 mutants per reader.
@Suite("Hostile files")
struct HostileFileTests {
    static func temporaryDirectory() throws -> URL {
        let d = FileManager.default.temporaryDirectory.appendingPathComponent("kappa-hostile-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: d, withIntermediateDirectories: true)
        return d
    }

    @Test("300 mutants per reader: read or rejected naming the file, no slow case, no large allocation")
    func campaign() throws {
        let directory = try Self.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        let readers = try HostileFiles.readers(directory: directory)
        #expect(readers.count == 7)
        let before = HostileFiles.peakResidentBytes
        for reader in readers {
            let outcome = HostileFiles.run(reader, iterations: 300, seed: 42, directory: directory, timeLimit: 2)
            #expect(outcome.failures.isEmpty, "\(outcome)\n\(outcome.failures.prefix(5).joined(separator: "\n"))")
            #expect(outcome.rejected > 150, "\(outcome)")
        }
        // The campaign's mutants declare sizes up to 2⁶⁴; none of them may be allocated (the bound
        // leaves room for AddressSanitizer's quarantine; unsanitized growth is a few MB).
        #expect(HostileFiles.peakResidentBytes - before < 1 << 30)
    }

    @Test("huge or negative declared sizes are rejected before any allocation")
    func declaredSizes() throws {
        let directory = try Self.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: directory) }
        func write(_ name: String, _ bytes: [UInt8]) throws -> String {
            let url = directory.appendingPathComponent(name)
            try Data(bytes).write(to: url)
            return url.path
        }
        let header = { (text: String) in HostileFiles.npyFile(header: text) }
        let before = HostileFiles.peakResidentBytes
        let cases: [(String, () throws -> Void)] = [
            ("big-images-idx3-ubyte", { _ = try DatasetFiles.idx(images: try write("big-images-idx3-ubyte", [0, 0, 8, 3, 0x7F, 0xFF, 0xFF, 0xFF, 0, 0, 0x10, 0, 0, 0, 0x10, 0]), labels: nil) }),
            ("huge.npy", { _ = try DatasetFiles.npy(images: try write("huge.npy", header("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999, 9), }\n")), labels: nil) }),
            ("negative.npy", { _ = try DatasetFiles.npy(images: try write("negative.npy", header("{'descr': '|u1', 'fortran_order': False, 'shape': (-1, 28, 28), }\n")), labels: nil) }),
            ("huge.safetensors", { _ = try SafeTensors.read(URL(fileURLWithPath: try write("huge.safetensors", [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F] + Array("{}".utf8)))) }),
            ("shape.safetensors", {
                let json = #"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}}"#
                let len = json.utf8.count
                let bytes = (0..<8).map { UInt8(truncatingIfNeeded: len >> (8 * $0)) } + Array(json.utf8) + [UInt8](repeating: 0, count: 16)
                _ = try SafeTensors.read(URL(fileURLWithPath: try write("shape.safetensors", bytes)))
            }),
        ]
        for (name, read) in cases {
            do {
                try read()
                Issue.record("\(name) was read")
            } catch {
                #expect("\(error)".contains(name), "\(error)")
            }
        }
        #expect(HostileFiles.peakResidentBytes - before < 1 << 30)
    }
}
