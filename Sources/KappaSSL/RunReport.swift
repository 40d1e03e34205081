import Foundation
import KappaNN

/// What a run's output folder holds, as its `metrics.jsonl` records it: the loss of every step
/// and every evaluation. ``read(folder:)`` reads one back (for `compare`).
public struct RunRecord {
    /// The run's name in tables and legends (its folder's name by default).
    public var name: String
    /// (step, loss) of every step.
    public var losses: [(step: Double, loss: Double)] = []
    /// The evaluations, in order.
    public var evaluations: [EvaluationReport] = []
    /// The prototype count, for the utilization plot.
    public var prototypes: Int?

    /// A record of a run.
    public init(name: String, losses: [(step: Double, loss: Double)] = [], evaluations: [EvaluationReport] = [], prototypes: Int? = nil) {
        (self.name, self.losses, self.evaluations, self.prototypes) = (name, losses, evaluations, prototypes)
    }

    /// Reads `folder/metrics.jsonl`. Throws `FileError` naming the file when it is missing or
    /// holds no record.
    public static func read(folder: String) throws -> RunRecord {
        let path = folder + "/metrics.jsonl"
        guard let data = FileManager.default.contents(atPath: path) else { throw FileError(path: path, problem: "no metrics log here") }
        var record = RunRecord(name: URL(fileURLWithPath: folder).lastPathComponent)
        let decoder = JSONDecoder()
        struct Step: Decodable { let kind: String; let step: Double?; let loss: Double? }
        for line in data.split(separator: 0x0A) {
            guard let s = try? decoder.decode(Step.self, from: Data(line)) else { continue }
            if s.kind == "step", let step = s.step { record.losses.append((step, s.loss ?? .nan)) }
            if s.kind == "evaluation", let e = try? decoder.decode(EvaluationReport.self, from: Data(line)) {
                record.evaluations.append(e)
                record.prototypes = e.prototypes
            }
        }
        guard !record.losses.isEmpty || !record.evaluations.isEmpty else { throw FileError(path: path, problem: "holds no step or evaluation record") }
        return record
    }

    /// The loss smoothed by an exponential moving average (0.95), as the plots draw it.
    public var smoothedLoss: [(Double, Double)] {
        var out: [(Double, Double)] = []
        var ema: Double?
        for (x, y) in losses where y.isFinite {
            ema = ema.map { 0.95 * $0 + 0.05 * y } ?? y
            out.append((x, ema!))
        }
        return out
    }
}

/// The plots of one run or of several overlaid.
public enum RunPlots {
    /// The training loss (EMA 0.95) over steps.
    public static func loss(_ runs: [RunRecord], title: String = "training loss") -> String {
        SVGPlot.lines(title: title, xLabel: "step", yLabel: "loss (EMA 0.95)",
                      series: runs.map { SVGPlot.Series(runs.count == 1 ? "loss" : $0.name, $0.smoothedLoss, markers: false) })
    }

    /// kNN accuracy over epochs: one run's teacher with its two baselines dashed, or each run's teacher.
    public static func knn(_ runs: [RunRecord]) -> String {
        let series = runs.map { r in SVGPlot.Series(runs.count == 1 ? "teacher" : r.name, r.evaluations.map { (Double($0.epoch), 100 * $0.knn) }) }
        var baselines: [(name: String, value: Double)] = []
        if let last = runs.first?.evaluations.last, runs.allSatisfy({ $0.evaluations.last?.knnRawPixels == last.knnRawPixels }) {
            baselines = [("raw pixels", 100 * last.knnRawPixels), ("random init", 100 * last.knnRandomInit)]
        }
        return SVGPlot.lines(title: "kNN accuracy (k = 20, T = 0.07)", xLabel: "epoch", yLabel: "kNN accuracy (%)", series: series,
                             baselines: baselines)
    }

    /// Prototypes in use over epochs.
    public static func utilization(_ runs: [RunRecord]) -> String {
        let k = runs.compactMap(\.prototypes).max()
        return SVGPlot.lines(title: "prototype utilization" + (k.map { " (of \($0))" } ?? ""), xLabel: "epoch", yLabel: "prototypes used",
                             series: runs.map { r in SVGPlot.Series(runs.count == 1 ? "prototypes used" : r.name,
                                                                    r.evaluations.map { (Double($0.epoch), Double($0.utilization)) }) })
    }

    /// A histogram of the prototype norms.
    public static func norms(_ norms: [Double]) -> String {
        SVGPlot.histogram(title: "prototype norms ‖w_k‖", xLabel: "‖w_k‖", yLabel: "prototypes", values: norms)
    }
}

/// Self-contained HTML reports (inline SVG, no network), written as XHTML so that any XML
/// parser reads them.
public enum HTMLReport {
    static let style = """
        body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
        table { border-collapse: collapse; margin: 1em 0; }
        td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
        th { background: #f4f4f4; } td.name, th.name { text-align: left; }
        pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 12px; }
        .plots svg { margin: 0.5em 0; }
        """

    static func page(_ title: String, _ body: String) -> String {
        """
        <?xml version="1.0" encoding="UTF-8"?>
        <!DOCTYPE html>
        <html xmlns="http://www.w3.org/1999/xhtml" lang="en">
        <head><meta charset="utf-8"/><title>\(SVGPlot.escape(title))</title><style>\(style)</style></head>
        <body>
        <h1>\(SVGPlot.escape(title))</h1>
        \(body)
        </body>
        </html>

        """
    }

    static func percent(_ x: Double?) -> String { x.map { String(format: "%.2f%%", 100 * $0) } ?? "–" }

    /// The rows of the final table of each run, side by side.
    static func table(_ runs: [RunRecord]) -> String {
        func row(_ label: String, _ f: (EvaluationReport) -> String) -> String {
            "<tr><th class=\"name\">\(SVGPlot.escape(label))</th>" + runs.map { "<td>\($0.evaluations.last.map(f).map(SVGPlot.escape) ?? "–")</td>" }.joined() + "</tr>\n"
        }
        var s = "<table>\n<tr><th class=\"name\"></th>" + runs.map { "<th>\(SVGPlot.escape($0.name))</th>" }.joined() + "</tr>\n"
        s += row("epochs") { "\($0.epoch)" }
        s += row("kNN (k = 20, T = 0.07)") { percent($0.knn) }
        s += row("linear probe") { percent($0.linearProbe) }
        s += row("kNN, raw pixels") { percent($0.knnRawPixels) }
        s += row("kNN, random init") { percent($0.knnRandomInit) }
        s += row("prototypes used") { "\($0.utilization) of \($0.prototypes)" }
        s += row("‖w_k‖ min / median / max") { String(format: "%.3f / %.3f / %.3f", $0.prototypeNorms.min, $0.prototypeNorms.median, $0.prototypeNorms.max) }
        s += row("kNN by norm quartile (low → high)") { r in
            zip(r.knnByNormQuartile, r.quartileCounts).map { a, n in a.map { String(format: "%.1f%% (%d)", 100 * $0, n) } ?? "–" }.joined(separator: ", ")
        }
        return s + "</table>\n"
    }

    /// One run: the command, the final table, the plots and the configuration.
    public static func run(_ record: RunRecord, configuration: DINOConfiguration, command: String?, norms: [Double]) -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let config = (try? encoder.encode(configuration)).map { String(decoding: $0, as: UTF8.self) } ?? ""
        var body = ""
        if let command { body += "<p>Reproduce with:</p>\n<pre>\(SVGPlot.escape(command))</pre>\n" }
        body += "<h2>Final evaluation</h2>\n" + table([record])
        body += "<h2>Plots</h2>\n<div class=\"plots\">\n" + RunPlots.knn([record]) + RunPlots.loss([record]) + RunPlots.utilization([record])
            + RunPlots.norms(norms) + "</div>\n"
        body += "<h2>Configuration</h2>\n<pre>\(SVGPlot.escape(config))</pre>\n"
        return page("\(record.name): report", body)
    }

    /// Several runs side by side (an ablation's cells, `compare`): the table and overlaid curves.
    public static func comparison(_ runs: [RunRecord], title: String, command: String?) -> String {
        var body = ""
        if let command { body += "<p>Reproduce with:</p>\n<pre>\(SVGPlot.escape(command))</pre>\n" }
        body += "<h2>Final evaluations</h2>\n" + table(runs)
        body += "<h2>Plots</h2>\n<div class=\"plots\">\n" + RunPlots.knn(runs) + RunPlots.loss(runs) + RunPlots.utilization(runs) + "</div>\n"
        return page(title, body)
    }
}
