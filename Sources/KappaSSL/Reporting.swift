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
        // Non-finite numbers (a diverged loss) are written as JSON null.
        encoder.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "\u{1}inf", negativeInfinity: "\u{1}-inf", nan: "\u{1}nan")
        guard let encoded = try? encoder.encode(Tagged(kind: kind, record: record)) else { return }
        var text = String(decoding: encoded, as: UTF8.self)
        for marker in ["\"\\u0001inf\"", "\"\\u0001-inf\"", "\"\\u0001nan\""] { text = text.replacingOccurrences(of: marker, with: "null") }
        var data = Data(text.utf8)
        data.append(0x0A)
        handle.write(data)
    }
}

/// The finite values in `bins` equal bins from their minimum to their maximum (a bin of width
/// 1 around a single value): what the SVG histograms and TensorBoard's both draw.
struct Histogram {
    let values: [Double]
    /// bins + 1 bin edges, and the count in each bin.
    let edges: [Double], counts: [Double]

    init?(_ all: [Double], bins: Int) {
        values = all.filter(\.isFinite)
        guard var lo = values.min(), var hi = values.max(), bins >= 1 else { return nil }
        if lo == hi { (lo, hi) = (lo - 0.5, hi + 0.5) }
        var counts = [Double](repeating: 0, count: bins)
        for x in values { counts[Swift.min(bins - 1, Int((x - lo) / (hi - lo) * Double(bins)))] += 1 }
        (self.counts, edges) = (counts, (0...bins).map { lo + (hi - lo) * Double($0) / Double(bins) })
    }
}

/// SVG charts for a run's plots, written by hand (no plotting package is on this platform's
/// list): round-number ticks on both axes with a light grid, axis labels, the legend beside the
/// plot, markers where a series has few points (a single point still shows), and constant
/// baselines as labelled dashed lines.
public enum SVGPlot {
    /// A line of a chart.
    public struct Series {
        /// The legend's name.
        public var name: String
        /// (x, y) points; non-finite ones are skipped.
        public var points: [(Double, Double)]
        /// Markers on every point (default: when the series has at most 25 points).
        public var markers: Bool?
        /// A series.
        public init(_ name: String, _ points: [(Double, Double)], markers: Bool? = nil) {
            (self.name, self.points, self.markers) = (name, points, markers)
        }
    }

    static let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
    static let (width, height) = (760.0, 380.0)
    static let (left, right, top, bottom) = (64.0, 200.0, 40.0, 48.0)

    /// Four to six round-number ticks covering [lo, hi]: multiples of 1, 2 or 5 × 10ⁿ.
    public static func ticks(_ lo: Double, _ hi: Double) -> [Double] {
        var (lo, hi) = (lo, hi)
        if !(hi > lo) { (lo, hi) = (lo - 1, lo + 1) }
        let raw = (hi - lo) / 5
        let magnitude = Foundation.pow(10, Foundation.floor(Foundation.log10(raw)))
        var best: [Double] = []
        // Tick k is k·m·10ⁿ, computed as an integer over a power of ten where n < 0, so that 0.6
        // prints as 0.6 and not 0.6000000000000001.
        let inverse = magnitude < 1 ? (1 / magnitude).rounded() : 1
        func tick(_ k: Double, _ m: Double) -> Double { magnitude < 1 ? k * m / inverse : k * m * magnitude }
        for m in [1.0, 2, 5, 10, 20] {
            let step = m * magnitude
            let first = Foundation.floor(lo / step + 1e-9), last = Foundation.ceil(hi / step - 1e-9)
            let n = Int((last - first).rounded()) + 1
            if n <= 7 { best = (0..<n).map { tick(first + Double($0), m) }; if n >= 4 || m >= 10 { break } }
        }
        return best
    }

    /// A line chart of `series` over x, with `baselines` as dashed horizontal lines.
    public static func lines(title: String, xLabel: String, yLabel: String, series: [Series],
                             baselines: [(name: String, value: Double)] = []) -> String {
        let finite = series.flatMap(\.points).filter { $0.0.isFinite && $0.1.isFinite }
        let ys = finite.map(\.1) + baselines.map(\.value).filter(\.isFinite)
        guard let x0 = finite.map(\.0).min(), let x1 = finite.map(\.0).max(), let y0 = ys.min(), let y1 = ys.max() else {
            return frame(title, "<text x=\"\(width / 2)\" y=\"\(height / 2)\" text-anchor=\"middle\" font-size=\"13\">no data yet</text>\n")
        }
        let xt = ticks(x0, x1), yt = ticks(y0, y1)
        let (xa, xb, ya, yb) = (xt.first!, xt.last!, yt.first!, yt.last!)
        let (pw, ph) = (width - left - right, height - top - bottom)
        let sx = { (x: Double) in left + (x - xa) / Swift.max(xb - xa, 1e-300) * pw }
        let sy = { (y: Double) in top + ph - (y - ya) / Swift.max(yb - ya, 1e-300) * ph }
        var body = grid(xt.map { ($0, sx($0)) }, yt.map { ($0, sy($0)) }, xLabel: xLabel, yLabel: yLabel)
        var legend: [(name: String, color: String, dashed: Bool)] = []
        for (i, s) in series.enumerated() {
            let color = colors[i % colors.count]
            let pts = s.points.filter { $0.0.isFinite && $0.1.isFinite }
            if pts.count > 1 {
                let path = pts.map { String(format: "%.1f,%.1f", sx($0.0), sy($0.1)) }.joined(separator: " ")
                body += "<polyline fill=\"none\" stroke=\"\(color)\" stroke-width=\"2\" points=\"\(path)\"/>\n"
            }
            if s.markers ?? (pts.count <= 25) {
                for p in pts { body += String(format: "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3.5\" fill=\"%@\"/>\n", sx(p.0), sy(p.1), color) }
            }
            legend.append((s.name, color, false))
        }
        for (j, b) in baselines.enumerated() where b.value.isFinite {
            let color = colors[(series.count + j) % colors.count]
            body += String(format: "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%@\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\"/>\n",
                           left, sy(b.value), left + pw, sy(b.value), color)
            legend.append(("\(b.name) (\(format(b.value)))", color, true))
        }
        for (i, item) in legend.enumerated() {
            let y = top + 8 + 20 * Double(i), x = width - right + 14
            body += String(format: "<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"%@\" stroke-width=\"2\"%@/>\n",
                           x, y, x + 22, y, item.color, item.dashed ? " stroke-dasharray=\"6 4\"" : "")
            body += String(format: "<text x=\"%.0f\" y=\"%.0f\" font-size=\"12\">%@</text>\n", x + 28, y + 4, escape(item.name))
        }
        return frame(title, body)
    }

    /// A histogram of `values` in `bins` equal bins.
    public static func histogram(title: String, xLabel: String, yLabel: String = "count", values: [Double], bins: Int = 30) -> String {
        guard let h = Histogram(values, bins: bins) else { return lines(title: title, xLabel: xLabel, yLabel: yLabel, series: []) }
        return bars(title: title, xLabel: xLabel, yLabel: yLabel, edges: h.edges, counts: h.counts)
    }

    /// Bars of `counts[i]` over [edges[i], edges[i + 1]).
    public static func bars(title: String, xLabel: String, yLabel: String, edges: [Double], counts: [Double]) -> String {
        guard counts.count >= 1, edges.count == counts.count + 1, let top0 = counts.max() else {
            return lines(title: title, xLabel: xLabel, yLabel: yLabel, series: [])
        }
        let xt = ticks(edges.first!, edges.last!), yt = ticks(0, Swift.max(top0, 1))
        let (xa, xb, yb) = (xt.first!, xt.last!, yt.last!)
        let (pw, ph) = (width - left - right, height - top - bottom)
        let sx = { (x: Double) in left + (x - xa) / Swift.max(xb - xa, 1e-300) * pw }
        let sy = { (y: Double) in top + ph - y / Swift.max(yb, 1e-300) * ph }
        var body = grid(xt.map { ($0, sx($0)) }, yt.map { ($0, sy($0)) }, xLabel: xLabel, yLabel: yLabel)
        for (i, c) in counts.enumerated() where c > 0 {
            body += String(format: "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"#1f77b4\"/>\n",
                           sx(edges[i]), sy(c), Swift.max(sx(edges[i + 1]) - sx(edges[i]) - 1, 0.5), sy(0) - sy(c))
        }
        return frame(title, body)
    }

    static func grid(_ xt: [(Double, Double)], _ yt: [(Double, Double)], xLabel: String, yLabel: String) -> String {
        let (pw, ph) = (width - left - right, height - top - bottom)
        var s = ""
        for (v, x) in xt {
            s += String(format: "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#e4e4e4\"/>\n", x, top, x, top + ph)
            s += String(format: "<text x=\"%.1f\" y=\"%.1f\" font-size=\"11\" text-anchor=\"middle\">%@</text>\n", x, top + ph + 16, format(v))
        }
        for (v, y) in yt {
            s += String(format: "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#e4e4e4\"/>\n", left, y, left + pw, y)
            s += String(format: "<text x=\"%.1f\" y=\"%.1f\" font-size=\"11\" text-anchor=\"end\">%@</text>\n", left - 6, y + 4, format(v))
        }
        s += String(format: "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" stroke=\"#444\"/>\n", left, top, pw, ph)
        s += String(format: "<text x=\"%.1f\" y=\"%.1f\" font-size=\"12\" text-anchor=\"middle\">%@</text>\n", left + pw / 2, height - 10, escape(xLabel))
        s += String(format: "<text x=\"14\" y=\"%.1f\" font-size=\"12\" text-anchor=\"middle\" transform=\"rotate(-90 14 %.1f)\">%@</text>\n",
                    top + ph / 2, top + ph / 2, escape(yLabel))
        return s
    }

    /// A tick label: up to four significant digits, no trailing zeros.
    static func format(_ x: Double) -> String {
        if x == 0 { return "0" }
        if Swift.abs(x) >= 1e5 || Swift.abs(x) < 1e-3 { return String(format: "%.2g", x) }
        var s = String(format: "%.4g", x)
        if s.contains(".") && !s.contains("e") { while s.hasSuffix("0") { s.removeLast() }; if s.hasSuffix(".") { s.removeLast() } }
        return s
    }

    /// Text for XML: the five characters that must be escaped.
    public static func escape(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
            .replacingOccurrences(of: "\"", with: "&quot;").replacingOccurrences(of: "'", with: "&#39;")
    }

    static func frame(_ title: String, _ body: String) -> String {
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(width))\" height=\"\(Int(height))\" viewBox=\"0 0 \(Int(width)) \(Int(height))\" font-family=\"sans-serif\">\n"
            + "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
            + "<text x=\"\(left + (width - left - right) / 2)\" y=\"24\" font-size=\"15\" text-anchor=\"middle\">\(escape(title))</text>\n" + body + "</svg>\n"
    }
}

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
