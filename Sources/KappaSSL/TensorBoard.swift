import Foundation
import KappaNN

/// TensorBoard event files, written by hand: TFRecord framing (length, masked CRC-32C of the
/// length, data, masked CRC-32C of the data) around `Event` protocol buffers with scalar and
/// histogram summaries. The few fields needed are encoded directly (field numbers from
/// TensorFlow's `event.proto` and `summary.proto`), which is smaller than swift-protobuf with
/// generated code for two messages.
///
/// `tensorboard --logdir runs` shows every run folder's file.
public final class TensorBoardLog {
    /// The event file.
    public let path: String
    let handle: FileHandle

    /// Starts a new event file in `folder`, removing the folder's older ones (a resumed run
    /// writes its whole history again from `metrics.jsonl`, so that the file mirrors the log).
    public init(folder: String, wallTime: Double = Date().timeIntervalSince1970) throws {
        for name in (try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? [] where name.hasPrefix("events.out.tfevents.") {
            try? FileManager.default.removeItem(atPath: folder + "/" + name)
        }
        let host = ProcessInfo.processInfo.hostName.split(separator: ".").first.map(String.init) ?? "host"
        path = folder + "/events.out.tfevents.\(Int(wallTime)).\(host).kappa"
        guard FileManager.default.createFile(atPath: path, contents: nil), let h = FileHandle(forWritingAtPath: path) else {
            throw FileError(path: path, problem: "cannot create the TensorBoard event file")
        }
        handle = h
        var event = Proto()
        event.double(1, wallTime)
        event.string(3, "brain.Event:2")
        write(event)
    }

    deinit { try? handle.close() }

    /// Scalars at `step` (TensorBoard's x axis).
    public func scalars(_ values: [(tag: String, value: Double)], step: Int, wallTime: Double = Date().timeIntervalSince1970) {
        var summary = Proto()
        for (tag, value) in values {
            var v = Proto()
            v.string(1, tag)
            v.float(2, Float(value))
            summary.message(1, v)
        }
        event(summary, step: step, wallTime: wallTime)
    }

    /// A histogram of `counts[i]` over buckets ending at `limits[i]` (the first starting at `min`).
    public func histogram(_ tag: String, min: Double, max: Double, limits: [Double], counts: [Double], sum: Double, sumSquares: Double,
                          step: Int, wallTime: Double = Date().timeIntervalSince1970) {
        var h = Proto()
        h.double(1, min)
        h.double(2, max)
        h.double(3, counts.reduce(0, +))
        h.double(4, sum)
        h.double(5, sumSquares)
        h.packedDoubles(6, limits)
        h.packedDoubles(7, counts)
        var v = Proto()
        v.string(1, tag)
        v.message(5, h)
        var summary = Proto()
        summary.message(1, v)
        event(summary, step: step, wallTime: wallTime)
    }

    /// A histogram of `values` in `bins` equal buckets.
    public func histogram(_ tag: String, values: [Double], bins: Int = 30, step: Int, wallTime: Double = Date().timeIntervalSince1970) {
        guard let h = Histogram(values, bins: bins) else { return }
        let v = h.values
        histogram(tag, min: v.min()!, max: v.max()!, limits: Array(h.edges.dropFirst()), counts: h.counts,
                  sum: v.reduce(0, +), sumSquares: v.reduce(0) { $0 + $1 * $1 }, step: step, wallTime: wallTime)
    }

    func event(_ summary: Proto, step: Int, wallTime: Double) {
        var e = Proto()
        e.double(1, wallTime)
        e.varint(2, UInt64(bitPattern: Int64(step)))
        e.message(5, summary)
        write(e)
    }

    /// One TFRecord.
    func write(_ message: Proto) {
        var length = [UInt8](repeating: 0, count: 8)
        withUnsafeBytes(of: UInt64(message.bytes.count).littleEndian) { for i in 0..<8 { length[i] = $0[i] } }
        var record = length
        withUnsafeBytes(of: TensorBoardLog.maskedCRC(length).littleEndian) { record += $0 }
        record += message.bytes
        withUnsafeBytes(of: TensorBoardLog.maskedCRC(message.bytes).littleEndian) { record += $0 }
        handle.write(Data(record))
    }

    /// TFRecord's masked CRC-32C: ((crc >> 15) | (crc << 17)) + 0xa282ead8.
    static func maskedCRC(_ bytes: [UInt8]) -> UInt32 {
        let c = crc32c(bytes)
        return ((c >> 15) | (c << 17)) &+ 0xa282_ead8
    }

    /// CRC-32C (Castagnoli).
    static func crc32c(_ bytes: [UInt8]) -> UInt32 { CRC32.castagnoli.checksum(bytes) }
}

/// The protocol-buffer wire format, as far as events need it.
struct Proto {
    var bytes: [UInt8] = []

    mutating func key(_ field: Int, _ wireType: UInt64) { append(varint: UInt64(field) << 3 | wireType) }
    mutating func append(varint v: UInt64) {
        var v = v
        while v >= 0x80 { bytes.append(UInt8(v & 0x7F) | 0x80); v >>= 7 }
        bytes.append(UInt8(v))
    }
    mutating func varint(_ field: Int, _ v: UInt64) { key(field, 0); append(varint: v) }
    mutating func double(_ field: Int, _ v: Double) {
        key(field, 1)
        withUnsafeBytes(of: v.bitPattern.littleEndian) { bytes += $0 }
    }
    mutating func float(_ field: Int, _ v: Float) {
        key(field, 5)
        withUnsafeBytes(of: v.bitPattern.littleEndian) { bytes += $0 }
    }
    mutating func string(_ field: Int, _ s: String) { lengthDelimited(field, Array(s.utf8)) }
    mutating func message(_ field: Int, _ m: Proto) { lengthDelimited(field, m.bytes) }
    mutating func packedDoubles(_ field: Int, _ values: [Double]) {
        var data: [UInt8] = []
        for v in values { withUnsafeBytes(of: v.bitPattern.littleEndian) { data += $0 } }
        lengthDelimited(field, data)
    }
    mutating func lengthDelimited(_ field: Int, _ data: [UInt8]) {
        key(field, 2)
        append(varint: UInt64(data.count))
        bytes += data
    }
}

/// The checksums, for tests.
public enum TensorBoardLogTestHooks {
    /// CRC-32C of `bytes`.
    public static func crc32c(_ bytes: [UInt8]) -> UInt32 { TensorBoardLog.crc32c(bytes) }
    /// TFRecord's masked CRC-32C of `bytes`.
    public static func maskedCRC(_ bytes: [UInt8]) -> UInt32 { TensorBoardLog.maskedCRC(bytes) }
}
