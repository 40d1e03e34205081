import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import Kappa
import KappaNN
import KappaSSL
import Testing

/// A Python that has TensorBoard, for the reader test: `KAPPA_PYTHON`, else `python3`.
let tensorBoardPython: String? = {
    for python in [ProcessInfo.processInfo.environment["KAPPA_PYTHON"], "/usr/bin/env"].compactMap({ $0 }) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: python)
        p.arguments = (python == "/usr/bin/env" ? ["python3"] : []) + ["-c", "import tensorboard.backend.event_processing.event_accumulator"]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        guard (try? p.run()) != nil else { continue }
        p.waitUntilExit()
        if p.terminationStatus == 0 { return python }
    }
    return nil
}()

@Suite("Reports: metrics, TensorBoard events, plots, report.html")
struct ReportingTests {
    /// A tiny run's folder, made once.
    static let run: (folder: String, session: TrainingSession) = {
        let data = ShapesDataset.make(count: 48, size: 16, seed: 8)
        let test = ShapesDataset.make(count: 24, size: 16, seed: 9)
        var c = tinyConfiguration()
        c.epochs = 3
        let folder = NSTemporaryDirectory() + "kappa-report-\(UUID().uuidString)"
        let session = TrainingSession(trainer: try! TeacherStudentTrainer(configuration: c, train: data),
                                      evaluator: try! Evaluator(reference: data, test: test), output: folder)
        (session.evaluateEvery, session.command) = (1, "swift run -c release DINOvMF --epochs 3")
        _ = try! session.run()
        return (folder, session)
    }()

    static func records(_ folder: String) throws -> [[String: Any]] {
        let text = try String(contentsOfFile: folder + "/metrics.jsonl", encoding: .utf8)
        return text.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
    }

    @Test func metricsNumberEpochsFromOneAndWriteNullForMissingValues() throws {
        let records = try Self.records(Self.run.folder)
        let steps = records.filter { $0["kind"] as? String == "step" }
        #expect(steps.count == 9 && steps.first?["epoch"] as? Int == 1 && steps.last?["epoch"] as? Int == 3)
        let epochs = records.filter { $0["kind"] as? String == "epoch" }.compactMap { $0["epoch"] as? Int }
        #expect(epochs == [1, 2, 3])
        // A non-finite value is null, not a string.
        let folder = NSTemporaryDirectory() + "kappa-null-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        let log = try MetricsLog(path: folder + "/metrics.jsonl")
        struct R: Encodable { let loss: Double; let quartiles: [Double?] }
        log.write("step", R(loss: .nan, quartiles: [0.5, nil]))
        let line = try String(contentsOfFile: folder + "/metrics.jsonl", encoding: .utf8)
        #expect(line == "{\"kind\":\"step\",\"loss\":null,\"quartiles\":[0.5,null]}\n")
    }

    @Test func crc32cAndTheEventFileFraming() throws {
        #expect(TensorBoardLogTestHooks.crc32c(Array("123456789".utf8)) == 0xE306_9283)
        let files = try FileManager.default.contentsOfDirectory(atPath: Self.run.folder).filter { $0.hasPrefix("events.out.tfevents.") }
        #expect(files.count == 1)
        // Every record: 8-byte length, masked CRC of the length, data, masked CRC of the data.
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: Self.run.folder + "/" + files[0])))
        var at = 0, records = 0
        while at < bytes.count {
            let length = (0..<8).reduce(0) { $0 | Int(bytes[at + $1]) << (8 * $1) }
            let data = Array(bytes[(at + 12)..<(at + 12 + length)])
            let crc = (0..<4).reduce(UInt32(0)) { $0 | UInt32(bytes[at + 12 + length + $1]) << (8 * UInt32($1)) }
            #expect(crc == TensorBoardLogTestHooks.maskedCRC(data))
            at += 16 + length
            records += 1
        }
        #expect(at == bytes.count && records > 9)
    }

    @Test(.enabled(if: tensorBoardPython != nil, "needs TensorBoard in Python (pip install tensorboard; KAPPA_PYTHON names the interpreter)"))
    func tensorBoardReadsEveryScalarOfTheLog() throws {
        let script = """
            import json, sys
            from tensorboard.backend.event_processing import event_accumulator as ea
            acc = ea.EventAccumulator(sys.argv[1], size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0})
            acc.Reload()
            out = {"scalars": {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]},
                   "histograms": {t: len(acc.Histograms(t)) for t in acc.Tags()["histograms"]}}
            print(json.dumps(out))
            """
        let p = Process()
        p.executableURL = URL(fileURLWithPath: tensorBoardPython!)
        p.arguments = (tensorBoardPython == "/usr/bin/env" ? ["python3"] : []) + ["-c", script, Self.run.folder]
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = FileHandle.nullDevice
        try p.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let read = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let scalars = try #require(read["scalars"] as? [String: [[Double]]])
        let histograms = try #require(read["histograms"] as? [String: Int])
        // Every number of every step, epoch and evaluation record, at its step or epoch (Float32 in the file).
        var expected = 0
        for r in try Self.records(Self.run.folder) {
            let kind = r["kind"] as! String
            let prefix = kind == "step" ? "train/" : kind == "epoch" ? "epoch/" : "eval/"
            let x = kind == "step" ? r["step"] as! Int : r["epoch"] as! Int
            for (key, value) in r where !["kind", "epoch", "step"].contains(key) {
                guard let v = value as? Double, kind != "evaluation" || ["knn", "linearProbe", "knnRawPixels", "knnRandomInit", "utilization"].contains(key)
                else { continue }
                let points = scalars[prefix + key] ?? []
                #expect(points.contains { Int($0[0]) == x && Swift.abs($0[1] - v) <= 1e-6 * Swift.max(1, Swift.abs(v)) }, "\(prefix + key) at \(x)")
                expected += 1
            }
        }
        #expect(expected > 50)
        #expect(histograms["eval/prototypeNorms"] == 3 && histograms["eval/prototypeAssignment"] == 3)
    }

    @Test func reportIsWellFormedWithEveryPlot() throws {
        let data = try Data(contentsOf: URL(fileURLWithPath: Self.run.folder + "/report.html"))
        final class Counter: NSObject, XMLParserDelegate {
            var svg = 0, tables = 0, text = ""
            func parser(_ parser: XMLParser, didStartElement name: String, namespaceURI: String?, qualifiedName: String?, attributes: [String: String] = [:]) {
                if name == "svg" { svg += 1 }
                if name == "table" { tables += 1 }
            }
            func parser(_ parser: XMLParser, foundCharacters string: String) { text += string }
        }
        let parser = XMLParser(data: data)
        let counter = Counter()
        parser.delegate = counter
        #expect(parser.parse(), "report.html is well-formed: \(String(describing: parser.parserError))")
        #expect(counter.svg == 4 && counter.tables == 1)
        #expect(counter.text.contains("swift run -c release DINOvMF --epochs 3") && counter.text.contains("kNN"))
        for plot in ["knn.svg", "loss.svg", "utilization.svg", "norms.svg"] {
            let svg = try String(contentsOfFile: Self.run.folder + "/" + plot, encoding: .utf8)
            #expect(XMLParser(data: Data(svg.utf8)).parse(), "\(plot) is well-formed")
        }
    }

    @Test func plotsHaveRoundTicksLabelsAndShowASinglePoint() {
        #expect(SVGPlot.ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1])
        #expect(SVGPlot.ticks(23.5, 67.35) == [20, 30, 40, 50, 60, 70])
        #expect(SVGPlot.ticks(1, 1250).count <= 7)
        let one = SVGPlot.lines(title: "t", xLabel: "epoch", yLabel: "kNN accuracy (%)", series: [.init("teacher", [(10, 67.35)])],
                                baselines: [("raw pixels", 56.55)])
        #expect(one.contains("<circle") && one.contains("kNN accuracy (%)") && one.contains("stroke-dasharray") && one.contains("raw pixels (56.55)"))
        #expect(XMLParser(data: Data(one.utf8)).parse())
    }
}
