import Foundation
import Kappa

/// A file that cannot be read or written as asked: the path and what is wrong with it. Every
/// reader and writer of Kappa (checkpoints, datasets, metrics) throws this one type.
public struct FileError: Error, CustomStringConvertible, Equatable {
    /// The file.
    public let path: String
    /// What is wrong with it, in a sentence.
    public let problem: String
    public var description: String { "\(path): \(problem)" }

    /// An error about `path`.
    public init(path: String, problem: String) {
        self.path = path
        self.problem = problem
    }
}

/// The errors of checkpoint files (``FileError``).
public typealias CheckpointError = FileError

/// The safetensors format (Hugging Face): an 8-byte little-endian header length, a JSON
/// header mapping each name to its dtype, shape and byte offsets (plus an optional
/// `__metadata__` of strings), then the raw little-endian data. PyTorch users read Kappa's
/// files with `safetensors.torch.load_file` and Kappa reads theirs (F32 and F64 tensors).
///
/// Kappa adds a CRC-32 of the data section to the metadata (`kappa.crc32`) and checks it
/// when present, so a flipped bit in a Kappa file is an error rather than a silently wrong
/// weight. (A hand-written CRC: no package on this platform's list provides one.)
public enum SafeTensors {
    /// The largest header accepted, against absurd declared sizes.
    static let maxHeaderBytes = 100 << 20

    /// Writes `tensors` atomically: to a temporary file in the same folder, flushed to disk,
    /// then renamed over `url`. A crash mid-write leaves any previous file intact.
    public static func write(_ tensors: [(name: String, tensor: Tensor)], metadata: [String: String] = [:], to url: URL) throws {
        var names = Set<String>()
        var header: [String: Any] = [:]
        var data: [UInt8] = []
        for (name, t) in tensors {
            guard names.insert(name).inserted, name != "__metadata__" else {
                throw CheckpointError(path: url.path, problem: "duplicate or reserved tensor name '\(name)'")
            }
            let bytes = t.rawBytes()
            header[name] = ["dtype": t.dtype == .float32 ? "F32" : "F64", "shape": t.shape,
                            "data_offsets": [data.count, data.count + bytes.count]] as [String: Any]
            data += bytes
        }
        var meta = metadata
        meta["kappa.crc32"] = String(crc32(data), radix: 16)
        header["__metadata__"] = meta
        var json = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        while json.count % 8 != 0 { json.append(0x20) }
        var file = [UInt8]()
        file.reserveCapacity(8 + json.count + data.count)
        withUnsafeBytes(of: UInt64(json.count).littleEndian) { file += $0 }
        file += json
        file += data
        try atomicWrite(file, to: url)
    }

    /// Reads and validates a whole file: every entry's dtype, shape and offsets, the data
    /// section's coverage and, when present, its CRC. Throws on the first problem.
    public static func read(_ url: URL) throws -> (tensors: [(name: String, tensor: Tensor)], metadata: [String: String]) {
        let path = url.path
        func fail(_ problem: String) -> CheckpointError { CheckpointError(path: path, problem: problem) }
        let bytes: Data
        do { bytes = try Data(contentsOf: url) } catch { throw fail("cannot be read (\(error.localizedDescription))") }
        guard bytes.count >= 8 else { throw fail("truncated: \(bytes.count) bytes, shorter than the 8-byte header length") }
        let n = bytes.prefix(8).enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        guard n <= UInt64(bytes.count - 8) else { throw fail("truncated: header declares \(n) bytes but the file has \(bytes.count - 8) after the length") }
        guard n <= UInt64(maxHeaderBytes) else { throw fail("header length \(n) exceeds the \(maxHeaderBytes)-byte limit") }
        let headerEnd = 8 + Int(n)
        guard let object = try? JSONSerialization.jsonObject(with: bytes.subdata(in: 8..<headerEnd)),
              let header = object as? [String: Any] else { throw fail("header is not a JSON object") }
        let dataSize = bytes.count - headerEnd
        var metadata: [String: String] = [:]
        var entries: [(name: String, dtype: DType, shape: [Int], begin: Int, end: Int)] = []
        for (name, value) in header {
            if name == "__metadata__" {
                guard let m = value as? [String: String] else { throw fail("__metadata__ is not a map of strings") }
                metadata = m
                continue
            }
            guard let e = value as? [String: Any] else { throw fail("entry '\(name)' is not an object") }
            let dtype: DType
            switch e["dtype"] as? String {
            case "F32": dtype = .float32
            case "F64": dtype = .float64
            case let other: throw fail("tensor '\(name)' has unsupported dtype \(other ?? "(none)"); Kappa reads F32 and F64")
            }
            guard let shapeValues = e["shape"] as? [Any], let shape = shapeValues.map({ ($0 as? NSNumber)?.intValue }) as? [Int],
                  shape.allSatisfy({ $0 >= 0 && $0 <= Int(Int32.max) }) else {
                throw fail("tensor '\(name)' has an invalid shape \(e["shape"] ?? "(none)")")
            }
            guard let offsets = e["data_offsets"] as? [Any], offsets.count == 2,
                  let begin = (offsets[0] as? NSNumber)?.intValue, let end = (offsets[1] as? NSNumber)?.intValue,
                  begin >= 0, begin <= end, end <= dataSize else {
                throw fail("tensor '\(name)' has data_offsets \(e["data_offsets"] ?? "(none)") outside the \(dataSize)-byte data section")
            }
            var elements = 1
            for d in shape {
                let (p, overflow) = elements.multipliedReportingOverflow(by: d)
                guard !overflow else { throw fail("tensor '\(name)' shape \(shape) overflows") }
                elements = p
            }
            guard elements.multipliedReportingOverflow(by: dtype.byteSize).partialValue == end - begin else {
                throw fail("tensor '\(name)' shape \(shape) × \(dtype) needs \(elements * dtype.byteSize) bytes, offsets give \(end - begin)")
            }
            entries.append((name, dtype, shape, begin, end))
        }
        entries.sort { $0.begin < $1.begin || ($0.begin == $1.begin && $0.end < $1.end) }
        var covered = 0
        for e in entries {
            guard e.begin == covered else { throw fail("data section is not tiled: tensor '\(e.name)' starts at \(e.begin), expected \(covered)") }
            covered = e.end
        }
        guard covered == dataSize else { throw fail("data section has \(dataSize) bytes but the tensors cover \(covered)") }
        if let expected = metadata["kappa.crc32"] {
            let actual = bytes.withUnsafeBytes { crc32(UnsafeRawBufferPointer(rebasing: $0[headerEnd...])) }
            guard String(actual, radix: 16) == expected else {
                throw fail("data checksum \(String(actual, radix: 16)) does not match the recorded \(expected): the file is corrupted")
            }
        }
        let tensors = try bytes.withUnsafeBytes { raw in
            try entries.map { e -> (name: String, tensor: Tensor) in
                let slice = UnsafeRawBufferPointer(rebasing: raw[(headerEnd + e.begin)..<(headerEnd + e.end)])
                guard let t = Tensor(rawBytes: slice, shape: e.shape, dtype: e.dtype) else { throw fail("tensor '\(e.name)' could not be built") }
                return (e.name, t)
            }
        }
        return (tensors, metadata)
    }
}

extension Module {
    /// Saves parameters and buffers by name to a safetensors file (atomically).
    public func save(to url: URL, metadata: [String: String] = [:]) throws {
        try SafeTensors.write(stateDict(), metadata: metadata, to: url)
    }

    /// Loads parameters and buffers from a safetensors file. The file must hold exactly this
    /// module's names with the same shapes and dtypes; on any mismatch it throws naming the
    /// file and the first problem, and nothing is changed.
    public func load(from url: URL) throws {
        try load(SafeTensors.read(url).tensors, path: url.path)
    }

    func load(_ tensors: [(name: String, tensor: Tensor)], path: String) throws {
        var byName: [String: Tensor] = [:]
        for (n, t) in tensors { byName[n] = t }
        let mine = stateDict()
        for (name, t) in mine {
            guard let source = byName[name] else { throw CheckpointError(path: path, problem: "missing tensor '\(name)'") }
            guard source.shape == t.shape else {
                throw CheckpointError(path: path, problem: "tensor '\(name)' has shape \(source.shape), the model expects \(t.shape)")
            }
            guard source.dtype == t.dtype else {
                throw CheckpointError(path: path, problem: "tensor '\(name)' is \(source.dtype), the model expects \(t.dtype)")
            }
        }
        let expected = Set(mine.map(\.name))
        if let extra = tensors.map(\.name).filter({ !expected.contains($0) }).sorted().first {
            throw CheckpointError(path: path, problem: "unexpected tensor '\(extra)' (not in the model)")
        }
        for (name, t) in mine { t.assign(byName[name]!) }
    }
}

/// Where a training run stands, saved with its weights so that a resumed run continues
/// exactly where it stopped.
public struct TrainingState: Codable, Equatable, Sendable {
    /// Steps taken.
    public var step: Int
    /// Epochs completed.
    public var epoch: Int
    /// The run's random generator state (`RandomGenerator.state`), as four words.
    public var generatorState: [UInt64]
    /// The run's configuration, as the command line or the caller describes it.
    public var configuration: [String: String]

    /// The state at a position, with the generator to continue from.
    public init(step: Int, epoch: Int, generator: RandomGenerator, configuration: [String: String] = [:]) {
        self.step = step
        self.epoch = epoch
        let s = generator.state
        generatorState = [s.0, s.1, s.2, s.3]
        self.configuration = configuration
    }

    /// The saved generator.
    public var generator: RandomGenerator {
        RandomGenerator(state: (generatorState[0], generatorState[1], generatorState[2], generatorState[3]))
    }
}

/// A whole training checkpoint in one safetensors file: the student's and teacher's
/// weights (`student.*`, `teacher.*`), the optimizer's moments (`optimizer.*`), any extra
/// state tensors such as centers (`extra.*`), and the ``TrainingState`` as JSON metadata.
public enum TrainingCheckpoint {
    static let stateKey = "kappa.training_state"

    /// Writes the checkpoint atomically.
    public static func save(to url: URL, student: Module, teacher: Module? = nil, optimizer: Optimizer? = nil,
                            extra: [(name: String, tensor: Tensor)] = [], state: TrainingState) throws {
        var tensors = student.stateDict().map { ("student." + $0.name, $0.tensor) }
        if let teacher { tensors += teacher.stateDict().map { ("teacher." + $0.name, $0.tensor) } }
        if let optimizer { tensors += optimizer.namedState().map { ("optimizer." + $0.name, $0.tensor) } }
        tensors += extra.map { ("extra." + $0.name, $0.tensor) }
        let json = String(decoding: try JSONEncoder().encode(state), as: UTF8.self)
        var meta = [stateKey: json]
        if let optimizer { meta["kappa.optimizer_steps"] = String(optimizer.stepCount) }
        try SafeTensors.write(tensors.map { (name: $0.0, tensor: $0.1) }, metadata: meta, to: url)
    }

    /// Reads and validates the checkpoint, then restores the modules and the optimizer; all
    /// or nothing. Returns the training state and the extra tensors by name.
    public static func load(from url: URL, student: Module, teacher: Module? = nil,
                            optimizer: Optimizer? = nil) throws -> (state: TrainingState, extra: [String: Tensor]) {
        let (tensors, meta) = try SafeTensors.read(url)
        func part(_ prefix: String) -> [(name: String, tensor: Tensor)] {
            tensors.filter { $0.name.hasPrefix(prefix) }.map { (String($0.name.dropFirst(prefix.count)), $0.tensor) }
        }
        guard let json = meta[stateKey], let state = try? JSONDecoder().decode(TrainingState.self, from: Data(json.utf8)),
              state.generatorState.count == 4, state.generatorState != [0, 0, 0, 0] else {
            throw CheckpointError(path: url.path, problem: "no valid training state in the metadata (\(stateKey))")
        }
        // Validate everything before changing anything.
        let probeStudent = try validated(part("student."), against: student, path: url.path)
        let probeTeacher = try teacher.map { try validated(part("teacher."), against: $0, path: url.path) }
        var optimizerState: [String: Tensor] = [:]
        for (n, t) in part("optimizer.") { optimizerState[n] = t }
        try student.load(probeStudent, path: url.path)
        if let teacher, let probeTeacher { try teacher.load(probeTeacher, path: url.path) }
        if let optimizer {
            try optimizer.loadState(optimizerState)
            optimizer.stepCount = Int(meta["kappa.optimizer_steps"] ?? "") ?? 0
        }
        var extra: [String: Tensor] = [:]
        for (n, t) in part("extra.") { extra[n] = t }
        return (state, extra)
    }

    private static func validated(_ tensors: [(name: String, tensor: Tensor)], against module: Module,
                                  path: String) throws -> [(name: String, tensor: Tensor)] {
        let mine = module.stateDict()
        var byName: [String: Tensor] = [:]
        for (n, t) in tensors { byName[n] = t }
        for (name, t) in mine {
            guard let s = byName[name], s.shape == t.shape, s.dtype == t.dtype else {
                let found = byName[name].map { "\($0.shape) \($0.dtype)" } ?? "nothing"
                throw CheckpointError(path: path, problem: "tensor '\(name)': expected \(t.shape) \(t.dtype), found \(found)")
            }
        }
        if let extra = tensors.map(\.name).filter({ n in !mine.contains { $0.name == n } }).first {
            throw CheckpointError(path: path, problem: "unexpected tensor '\(extra)' (not in the model)")
        }
        return tensors
    }
}

/// Writes `bytes` to a temporary file beside `url`, flushes it, renames it over `url` and
/// flushes the folder, so that `url` holds either the old or the new content.
func atomicWrite(_ bytes: [UInt8], to url: URL) throws {
    let dir = url.deletingLastPathComponent().path
    let tmp = dir + "/." + url.lastPathComponent + ".tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    func fail(_ what: String) -> CheckpointError {
        CheckpointError(path: url.path, problem: "\(what) failed: \(String(cString: strerror(errno)))")
    }
    let fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL, 0o644)
    guard fd >= 0 else { throw fail("creating \(tmp)") }
    var ok = false
    defer { if !ok { unlink(tmp) } }
    var written = 0
    try bytes.withUnsafeBytes { raw in
        while written < raw.count {
            // Fault injection: a pause in the middle of the data widens the window a crash test aims at.
            let chunk = writeDelay > 0 && written < raw.count / 2 ? raw.count / 2 - written : raw.count - written
            let n = Glibc.write(fd, raw.baseAddress! + written, chunk)
            if n < 0 { if errno == EINTR { continue }; close(fd); throw fail("writing \(tmp)") }
            written += n
            if writeDelay > 0 { usleep(writeDelay) }
        }
    }
    guard fsync(fd) == 0 else { close(fd); throw fail("flushing \(tmp)") }
    close(fd)
    if writeDelay > 0 { usleep(writeDelay) }
    guard rename(tmp, url.path) == 0 else { throw fail("renaming \(tmp)") }
    ok = true
    let dfd = open(dir, O_RDONLY)
    if dfd >= 0 { fsync(dfd); close(dfd) }
    // Temporary files of writers killed before their rename (one file has one writer at a time).
    let prefix = "." + url.lastPathComponent + ".tmp-"
    for name in (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [] where name.hasPrefix(prefix) {
        unlink(dir + "/" + name)
    }
}

/// Fault injection for crash tests; the library itself never sets it.
public enum FaultInjection {
    /// Microseconds to pause in the middle of every checkpoint write and before its rename
    /// (0: no pause). The commands set it from `KAPPA_FAULT_WRITE_DELAY_MS`
    /// (`HostSetup.applyFaultInjection()`), so that a crash test can kill a run mid-write.
    nonisolated(unsafe) public static var checkpointWriteDelay: UInt32 = 0
}

var writeDelay: UInt32 { FaultInjection.checkpointWriteDelay }

/// A table-driven reflected CRC-32: ``ieee`` (zlib's, for checkpoints) and ``castagnoli``
/// (CRC-32C, for TensorBoard's records).
public struct CRC32: Sendable {
    let table: [UInt32]

    /// The CRC of a reflected `polynomial`.
    public init(polynomial: UInt32) {
        table = (0..<256).map { i -> UInt32 in
            var c = UInt32(i)
            for _ in 0..<8 { c = c & 1 != 0 ? polynomial ^ (c >> 1) : c >> 1 }
            return c
        }
    }

    /// IEEE 802.3 (polynomial 0xEDB88320).
    public static let ieee = CRC32(polynomial: 0xEDB8_8320)
    /// Castagnoli, CRC-32C (polynomial 0x82F63B78).
    public static let castagnoli = CRC32(polynomial: 0x82F6_3B78)

    /// The checksum of `bytes`.
    public func checksum<C: Collection>(_ bytes: C) -> UInt32 where C.Element == UInt8 {
        var crc: UInt32 = 0xFFFF_FFFF
        for b in bytes { crc = table[Int((crc ^ UInt32(b)) & 0xFF)] ^ (crc >> 8) }
        return crc ^ 0xFFFF_FFFF
    }
}

func crc32<C: Collection>(_ bytes: C) -> UInt32 where C.Element == UInt8 { CRC32.ieee.checksum(bytes) }
