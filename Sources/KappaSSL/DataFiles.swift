import CZlib
import Foundation

/// Readers for the dataset files Kappa trains on. Every reader validates declared sizes
/// against the bytes present before allocating, and throws a ``DatasetError`` naming the
/// file and the first problem for anything malformed, truncated or unsupported.
public enum DatasetFiles {
    /// The largest file (after decompression) accepted: 4 GiB.
    static let maxBytes = 4 << 30

    /// Loads a dataset from `path`, detecting the format:
    /// - a folder with MNIST/Fashion-MNIST IDX files (`train-images-idx3-ubyte[.gz]` and
    ///   labels, else the `t10k-` pair), CIFAR-10 binary batches (`data_batch_*.bin`,
    ///   `test_batch.bin`), or `images.npy` (with `labels.npy` when present);
    /// - an IDX images file (labels from the matching `labels-idx1` file when present);
    /// - a `.npy` images file (labels from `<name>_labels.npy` or `labels.npy` beside it);
    /// - a CIFAR-10 `.bin` batch.
    public static func load(_ path: String) throws -> ImageDataset {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
            throw DatasetError(path: path, problem: "no such file or folder")
        }
        if isDir.boolValue {
            let files = try FileManager.default.contentsOfDirectory(atPath: path).sorted()
            let join = { (f: String) in (path as NSString).appendingPathComponent(f) }
            for prefix in ["train-", "t10k-"] {
                if let images = files.first(where: { $0.hasPrefix(prefix + "images-idx3-ubyte") }) {
                    let labels = files.first(where: { $0.hasPrefix(prefix + "labels-idx1-ubyte") })
                    return try idx(images: join(images), labels: labels.map(join))
                }
            }
            let batches = files.filter { $0.hasPrefix("data_batch_") && $0.hasSuffix(".bin") }
            if !batches.isEmpty { return try cifar10(batches.map(join)) }
            if files.contains("test_batch.bin") { return try cifar10([join("test_batch.bin")]) }
            if files.contains("images.npy") {
                return try npy(images: join("images.npy"), labels: files.contains("labels.npy") ? join("labels.npy") : nil)
            }
            throw DatasetError(path: path, problem: "no IDX, CIFAR-10 or .npy dataset files in this folder")
        }
        let name = (path as NSString).lastPathComponent
        let folder = (path as NSString).deletingLastPathComponent
        if name.hasSuffix(".npy") {
            let stem = String(name.dropLast(4))
            let candidates = [stem + "_labels.npy", "labels.npy"].map { (folder as NSString).appendingPathComponent($0) }
            let labels = candidates.first { $0 != path && FileManager.default.fileExists(atPath: $0) }
            return try npy(images: path, labels: labels)
        }
        if name.hasSuffix(".bin") { return try cifar10([path]) }
        if name.contains("images-idx3") {
            let labels = (folder as NSString).appendingPathComponent(name.replacingOccurrences(of: "images-idx3", with: "labels-idx1"))
            return try idx(images: path, labels: FileManager.default.fileExists(atPath: labels) ? labels : nil)
        }
        throw DatasetError(path: path, problem: "unknown dataset format (expected IDX, CIFAR-10 .bin or .npy)")
    }

    /// Reads a file, inflating it when it is gzip-compressed. POSIX reads, with the size
    /// checked before anything is allocated (and without a leak Foundation's
    /// `FileManager.contents(atPath:)` showed under AddressSanitizer on malformed files).
    static func readBytes(_ path: String) throws -> [UInt8] {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw DatasetError(path: path, problem: "cannot be read (\(String(cString: strerror(errno))))") }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG else {
            throw DatasetError(path: path, problem: "is not a regular file")
        }
        let size = Int(info.st_size)
        guard size <= maxBytes else { throw DatasetError(path: path, problem: "is \(size) bytes, more than the \(maxBytes) accepted") }
        var bytes = [UInt8](repeating: 0, count: size)
        var done = 0
        try bytes.withUnsafeMutableBytes { raw in
            while done < size {
                let n = read(fd, raw.baseAddress! + done, size - done)
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { throw DatasetError(path: path, problem: "could not be read to its end (\(done) of \(size) bytes)") }
                done += n
            }
        }
        guard bytes.count >= 2, bytes[0] == 0x1F, bytes[1] == 0x8B else { return bytes }
        return try gunzip(bytes, path: path)
    }

    static func gunzip(_ input: [UInt8], path: String) throws -> [UInt8] {
        var stream = z_stream()
        guard inflateInit2_(&stream, 16 + MAX_WBITS, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
            throw DatasetError(path: path, problem: "zlib could not start")
        }
        defer { inflateEnd(&stream) }
        var output = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 1 << 20)
        var input = input
        return try input.withUnsafeMutableBufferPointer { inBuf in
            stream.next_in = inBuf.baseAddress
            stream.avail_in = UInt32(inBuf.count)
            while true {
                let status = chunk.withUnsafeMutableBufferPointer { out -> Int32 in
                    stream.next_out = out.baseAddress
                    stream.avail_out = UInt32(out.count)
                    return inflate(&stream, Z_NO_FLUSH)
                }
                let produced = chunk.count - Int(stream.avail_out)
                output += chunk[0..<produced]
                guard output.count <= maxBytes else { throw DatasetError(path: path, problem: "decompresses to more than \(maxBytes) bytes") }
                if status == Z_STREAM_END { return output }
                guard status == Z_OK else {
                    throw DatasetError(path: path, problem: status == Z_BUF_ERROR ? "truncated gzip stream" : "corrupt gzip data (zlib status \(status))")
                }
                if stream.avail_in == 0 && produced == 0 { throw DatasetError(path: path, problem: "truncated gzip stream") }
            }
        }
    }

    /// An IDX file of unsigned bytes: (dimension sizes, payload).
    static func idxArray(_ path: String, dimensions: Int) throws -> ([Int], ArraySlice<UInt8>) {
        let b = try readBytes(path)
        guard b.count >= 4 else { throw DatasetError(path: path, problem: "truncated: \(b.count) bytes, no IDX magic number") }
        guard b[0] == 0, b[1] == 0, b[2] == 0x08 else {
            throw DatasetError(path: path, problem: "not an IDX file of unsigned bytes (magic \(b[0..<4].map { String($0) }.joined(separator: " ")))")
        }
        guard Int(b[3]) == dimensions else {
            throw DatasetError(path: path, problem: "has \(b[3]) dimensions, expected \(dimensions)")
        }
        let header = 4 + 4 * dimensions
        guard b.count >= header else { throw DatasetError(path: path, problem: "truncated inside the header") }
        var dims: [Int] = []
        for d in 0..<dimensions {
            let o = 4 + 4 * d
            dims.append(Int(b[o]) << 24 | Int(b[o + 1]) << 16 | Int(b[o + 2]) << 8 | Int(b[o + 3]))
        }
        let (expected, overflow) = dims.reduce((1, false)) { acc, d in
            let (p, o) = acc.0.multipliedReportingOverflow(by: d)
            return (p, acc.1 || o)
        }
        guard !overflow, expected == b.count - header else {
            throw DatasetError(path: path, problem: "declares \(dims) = \(overflow ? "overflowing" : String(expected)) bytes but holds \(b.count - header)")
        }
        return (dims, b[header...])
    }

    /// MNIST / Fashion-MNIST IDX files (raw or gzip).
    public static func idx(images: String, labels: String?) throws -> ImageDataset {
        let (dims, pixels) = try idxArray(images, dimensions: 3)
        guard dims[0] > 0, dims[1] > 0, dims[2] > 0 else { throw DatasetError(path: images, problem: "empty image dimensions \(dims)") }
        var labelValues: [Int]?
        if let labels {
            let (ld, lb) = try idxArray(labels, dimensions: 1)
            guard ld[0] == dims[0] else {
                throw DatasetError(path: labels, problem: "has \(ld[0]) labels for \(dims[0]) images in \(images)")
            }
            labelValues = lb.map(Int.init)
        }
        return ImageDataset(images: pixels.map { Float($0) / 255 }, labels: labelValues, count: dims[0], channels: 1,
                            height: dims[1], width: dims[2], source: images)
    }

    /// CIFAR-10 binary batches: records of one label byte (0–9) and 3,072 pixel bytes
    /// (red, green, blue planes of 32×32).
    public static func cifar10(_ paths: [String]) throws -> ImageDataset {
        var images: [Float] = [], labels: [Int] = []
        for path in paths {
            let b = try readBytes(path)
            guard !b.isEmpty, b.count % 3073 == 0 else {
                throw DatasetError(path: path, problem: "\(b.count) bytes is not a whole number of 3,073-byte CIFAR-10 records")
            }
            for r in 0..<(b.count / 3073) {
                let label = Int(b[r * 3073])
                guard label < 10 else { throw DatasetError(path: path, problem: "record \(r) has label \(label), not 0–9") }
                labels.append(label)
                images += b[(r * 3073 + 1)..<((r + 1) * 3073)].map { Float($0) / 255 }
            }
        }
        return ImageDataset(images: images, labels: labels, count: labels.count, channels: 3, height: 32, width: 32,
                            source: paths.joined(separator: ", "))
    }

    /// A parsed `.npy` file: element type, shape and raw payload.
    static func npyArray(_ path: String) throws -> (descr: String, shape: [Int], payload: ArraySlice<UInt8>) {
        let b = try readBytes(path)
        let fail = { (p: String) in DatasetError(path: path, problem: p) }
        guard b.count >= 10, b[0] == 0x93, Array(b[1..<6]) == Array("NUMPY".utf8) else { throw fail("not a .npy file (bad magic)") }
        let major = b[6]
        let (lenBytes, start) = major == 1 ? (2, 8) : (4, 8)
        guard major >= 1 && major <= 3, b.count >= start + lenBytes else { throw fail("unsupported .npy version \(major)") }
        var headerLength = 0
        for i in 0..<lenBytes { headerLength |= Int(b[start + i]) << (8 * i) }
        let headerStart = start + lenBytes
        guard headerLength <= b.count - headerStart else { throw fail("truncated: header of \(headerLength) bytes") }
        guard let header = String(bytes: b[headerStart..<(headerStart + headerLength)], encoding: .utf8) else {
            throw fail("header is not text")
        }
        func field(_ key: String) -> String? {
            guard let r = header.range(of: "'\(key)':") else { return nil }
            let rest = header[r.upperBound...].drop { $0 == " " }
            if rest.first == "'" { return String(rest.dropFirst().prefix { $0 != "'" }) }
            if rest.first == "(" { return String(rest.dropFirst().prefix { $0 != ")" }) }
            return String(rest.prefix { $0 != "," && $0 != "}" }).trimmingCharacters(in: .whitespaces)
        }
        guard let descr = field("descr"), let order = field("fortran_order"), let shapeText = field("shape") else {
            throw fail("header lacks descr, fortran_order or shape: \(header)")
        }
        guard order == "False" else { throw fail("Fortran-ordered arrays are not supported") }
        let parts = shapeText.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        let shape = try parts.map { p -> Int in
            guard let v = Int(p), v >= 0, v <= Int(Int32.max) else { throw fail("invalid shape (\(shapeText))") }
            return v
        }
        let itemSize: Int
        switch descr {
        case "|u1", "<u1", "u1", "|i1": itemSize = 1
        case "<f4", "<i4", "<u4": itemSize = 4
        case "<i8", "<u8", "<f8": itemSize = 8
        default: throw fail("unsupported element type \(descr)")
        }
        let (count, overflow) = shape.reduce((itemSize, false)) { acc, d in
            let (p, o) = acc.0.multipliedReportingOverflow(by: d)
            return (p, acc.1 || o)
        }
        let payload = b[(headerStart + headerLength)...]
        guard !overflow, count == payload.count else {
            throw fail("shape (\(shapeText)) of \(descr) needs \(overflow ? "too many" : String(count)) bytes, the file has \(payload.count)")
        }
        return (descr, shape, payload)
    }

    /// NumPy `.npy` images (uint8 in 0…255 or float32 in [0, 1]; N×H×W or N×H×W×C with
    /// C = 1 or 3) and optional integer labels (N).
    public static func npy(images: String, labels: String?) throws -> ImageDataset {
        let (descr, shape, payload) = try npyArray(images)
        guard shape.count == 3 || (shape.count == 4 && (shape[3] == 1 || shape[3] == 3)) else {
            throw DatasetError(path: images, problem: "shape \(shape) is not N×H×W or N×H×W×C with C = 1 or 3")
        }
        let (n, h, w, c) = (shape[0], shape[1], shape[2], shape.count == 4 ? shape[3] : 1)
        guard n > 0, h > 0, w > 0 else { throw DatasetError(path: images, problem: "shape \(shape) holds no pixels") }
        var values: [Float]
        switch descr {
        case "|u1", "<u1", "u1": values = payload.map { Float($0) / 255 }
        case "<f4":
            values = [Float](repeating: 0, count: payload.count / 4)
            payload.withUnsafeBytes { raw in
                for i in 0..<values.count { values[i] = Float(bitPattern: raw.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self).littleEndian) }
            }
            if let bad = values.firstIndex(where: { !$0.isFinite }) {
                throw DatasetError(path: images, problem: "pixel \(bad) (image \(bad / Swift.max(h * w * c, 1))) is \(values[bad]); pixels must be finite")
            }
        default: throw DatasetError(path: images, problem: "images must be uint8 or float32, not \(descr)")
        }
        if c > 1 {  // HWC → CHW
            var chw = [Float](repeating: 0, count: values.count)
            for i in 0..<n { for y in 0..<h { for x in 0..<w { for k in 0..<c {
                chw[((i * c + k) * h + y) * w + x] = values[((i * h + y) * w + x) * c + k]
            } } } }
            values = chw
        }
        var labelValues: [Int]?
        if let labels {
            let (ld, lshape, lp) = try npyArray(labels)
            guard lshape == [n] else { throw DatasetError(path: labels, problem: "shape \(lshape) does not match \(n) images in \(images)") }
            let size = lp.count / Swift.max(n, 1)
            labelValues = try (0..<n).map { i in
                var v = 0
                for k in 0..<size { v |= Int(lp[lp.startIndex + i * size + k]) << (8 * k) }
                if size == 8 || ld.hasPrefix("<i") && size == 4 && v >= 1 << 31 { v = size == 4 ? v - (1 << 32) : v }
                guard ld != "<f4" && ld != "<f8", v >= 0, v < 1 << 20 else {
                    throw DatasetError(path: labels, problem: "label \(i) is not a small non-negative integer (\(ld))")
                }
                return v
            }
        }
        return ImageDataset(images: values, labels: labelValues, count: n, channels: c, height: h, width: w, source: images)
    }
}
