import Foundation

/// Appends one JSON record per line to `metrics.jsonl`.
public final class MetricsLog {
    let handle: FileHandle
    /// The file.
    public let path: String
    /// The records kept from the old log when resuming (one JSON object per line), in order.
    public private(set) var keptRecords: [Data] = []

    /// Opens the log at `path`: a new one, or, resuming a run from a checkpoint at `resumingAt`,
    /// the old one without the records written after that checkpoint (and without a line cut
    /// off by a crash), so that a resumed run's log equals an uninterrupted one's.
    public init(path: String, resumingAt checkpoint: (step: Int, epoch: Int)? = nil) throws {
        self.path = path
        var kept = Data()
        if let checkpoint, let old = FileManager.default.contents(atPath: path) {
            struct Line: Decodable { let kind: String; let step: Int?; let epoch: Int? }
            for line in old.split(separator: 0x0A) {
                guard let l = try? JSONDecoder().decode(Line.self, from: Data(line)) else { continue }
                let keep = l.kind == "step" ? (l.step ?? .max) < checkpoint.step : (l.epoch ?? .max) <= checkpoint.epoch
                if keep {
                    kept.append(contentsOf: line)
                    kept.append(0x0A)
                    keptRecords.append(Data(line))
                }
            }
        }
        guard FileManager.default.createFile(atPath: path, contents: kept) else {
            throw DatasetError(path: path, problem: "cannot create the metrics file")
        }
        guard let h = FileHandle(forWritingAtPath: path) else { throw DatasetError(path: path, problem: "cannot open for writing") }
        h.seekToEndOfFile()
        handle = h
    }

    deinit { try? handle.close() }

    /// Appends `record` as one JSON line with `"kind": kind` (sorted keys).
    public func write<T: Encodable>(_ kind: String, _ record: T) {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        encoder.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        guard var data = try? encoder.encode(Tagged(kind: kind, record: record)) else { return }
        data.append(0x0A)
        handle.write(data)
    }
}

/// Minimal SVG charts for the run's plots (no plotting package is available on this
/// platform's list, so these few lines are written by hand).
public enum SVGPlot {
    /// A line chart of one or more series over x.
    public static func lines(title: String, xLabel: String, series: [(name: String, points: [(Double, Double)])]) -> String {
        let (w, h, m) = (640.0, 360.0, 50.0)
        let all = series.flatMap(\.points).filter { $0.1.isFinite }
        guard let x0 = all.map(\.0).min(), let x1 = all.map(\.0).max(), var y0 = all.map(\.1).min(), var y1 = all.map(\.1).max() else {
            return frame(w, h, title, "")
        }
        if y0 == y1 { y0 -= 1; y1 += 1 }
        let sx = { (x: Double) in m + (x - x0) / Swift.max(x1 - x0, 1e-12) * (w - 2 * m) }
        let sy = { (y: Double) in h - m - (y - y0) / (y1 - y0) * (h - 2 * m) }
        let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
        var body = axes(w, h, m, xLabel: xLabel, x0: x0, x1: x1, y0: y0, y1: y1)
        for (i, s) in series.enumerated() {
            let pts = s.points.filter { $0.1.isFinite }.map { String(format: "%.1f,%.1f", sx($0.0), sy($0.1)) }.joined(separator: " ")
            body += "<polyline fill=\"none\" stroke=\"\(colors[i % colors.count])\" stroke-width=\"2\" points=\"\(pts)\"/>\n"
            body += "<text x=\"\(w - m - 150)\" y=\"\(m + 16 * Double(i))\" font-size=\"12\" fill=\"\(colors[i % colors.count])\">\(escape(s.name))</text>\n"
        }
        return frame(w, h, title, body)
    }

    /// A histogram of values.
    public static func histogram(title: String, xLabel: String, values: [Double], bins: Int = 30) -> String {
        let (w, h, m) = (640.0, 360.0, 50.0)
        let v = values.filter(\.isFinite)
        guard var lo = v.min(), var hi = v.max() else { return frame(w, h, title, "") }
        if lo == hi { lo -= 0.5; hi += 0.5 }
        var counts = [Int](repeating: 0, count: bins)
        for x in v { counts[Swift.min(bins - 1, Int((x - lo) / (hi - lo) * Double(bins)))] += 1 }
        let top = Double(counts.max() ?? 1)
        var body = axes(w, h, m, xLabel: xLabel, x0: lo, x1: hi, y0: 0, y1: top)
        let bw = (w - 2 * m) / Double(bins)
        for (i, c) in counts.enumerated() where c > 0 {
            let bh = Double(c) / top * (h - 2 * m)
            body += String(format: "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"#1f77b4\"/>\n",
                           m + Double(i) * bw, h - m - bh, bw - 1, bh)
        }
        return frame(w, h, title, body)
    }

    static func axes(_ w: Double, _ h: Double, _ m: Double, xLabel: String, x0: Double, x1: Double, y0: Double, y1: Double) -> String {
        var s = "<line x1=\"\(m)\" y1=\"\(h - m)\" x2=\"\(w - m)\" y2=\"\(h - m)\" stroke=\"black\"/>\n"
        s += "<line x1=\"\(m)\" y1=\"\(m)\" x2=\"\(m)\" y2=\"\(h - m)\" stroke=\"black\"/>\n"
        s += String(format: "<text x=\"%.0f\" y=\"%.0f\" font-size=\"11\">%@</text>\n", m, h - m + 16, fmt(x0))
        s += String(format: "<text x=\"%.0f\" y=\"%.0f\" font-size=\"11\" text-anchor=\"end\">%@</text>\n", w - m, h - m + 16, fmt(x1))
        s += String(format: "<text x=\"%.0f\" y=\"%.0f\" font-size=\"11\" text-anchor=\"end\">%@</text>\n", m - 4, h - m, fmt(y0))
        s += String(format: "<text x=\"%.0f\" y=\"%.0f\" font-size=\"11\" text-anchor=\"end\">%@</text>\n", m - 4, m + 4, fmt(y1))
        s += "<text x=\"\(w / 2)\" y=\"\(h - 12)\" font-size=\"12\" text-anchor=\"middle\">\(escape(xLabel))</text>\n"
        return s
    }

    static func fmt(_ x: Double) -> String { Swift.abs(x) >= 1000 || (Swift.abs(x) < 0.01 && x != 0) ? String(format: "%.2e", x) : String(format: "%.3g", x) }
    static func escape(_ s: String) -> String { s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;") }

    static func frame(_ w: Double, _ h: Double, _ title: String, _ body: String) -> String {
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(w))\" height=\"\(Int(h))\" font-family=\"sans-serif\">\n"
            + "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
            + "<text x=\"\(w / 2)\" y=\"24\" font-size=\"15\" text-anchor=\"middle\">\(escape(title))</text>\n" + body + "</svg>\n"
    }
}

/// A record with a `kind` field added.
private struct Tagged<R: Encodable>: Encodable {
    let kind: String
    let record: R
    func encode(to encoder: Encoder) throws {
        try record.encode(to: encoder)
        var c = encoder.container(keyedBy: Key.self)
        try c.encode(kind, forKey: Key(stringValue: "kind")!)
    }
    struct Key: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init?(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }
}
