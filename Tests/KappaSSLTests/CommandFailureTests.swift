import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import Kappa
import KappaFuzzing
import KappaNN
import KappaSSL
import Testing

/// The eleven failures of the command line that issue 15 lists, each run against the built
/// `DINOvMF` program: every one ends with an exit status a script can rely on (never a signal
/// or a Swift runtime trap) and a message naming the option or the file, or with a correct run.
@Suite("Command line: no trap on bad arguments, files or resumes",
       .enabled(if: CrashTests.program != nil, "needs the DINOvMF program beside the test bundle (swift build)"))
struct CommandFailureTests {
    struct Run {
        let status: Int32, reason: Process.TerminationReason, output: String
        var trapped: Bool { reason == .uncaughtSignal || output.contains("Fatal error") || output.contains("precondition") }
    }

    /// Runs DINOvMF with `arguments`; sends SIGINT once the file `interruptWhen` exists (the
    /// run's metrics log: training has started) when given.
    static func run(_ arguments: [String], interruptWhen: String? = nil) throws -> Run {
        let p = Process()
        p.executableURL = CrashTests.program!
        p.arguments = arguments
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        if let interruptWhen {
            let start = Date()
            while !FileManager.default.fileExists(atPath: interruptWhen) && Date().timeIntervalSince(start) < 120 {
                Thread.sleep(forTimeInterval: 0.05)
            }
            Thread.sleep(forTimeInterval: 0.5)
            kill(p.processIdentifier, SIGINT)
        }
        let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        return Run(status: p.terminationStatus, reason: p.terminationReason, output: output)
    }

    static let folder = FileManager.default.temporaryDirectory.appendingPathComponent("kappa-cli-\(UUID().uuidString)")
    static func path(_ name: String) -> String { folder.appendingPathComponent(name).path }

    /// A tiny training run: 32 images, one thread, a ResNet of width 2.
    static let tiny = ["--train-count", "32", "--eval-count", "16", "--batch-size", "16", "--prototypes", "16", "--head-hidden", "16",
                       "--bottleneck", "8", "--resnet-width", "2", "--no-linear-probe", "--threads", "1"]

    /// Writes images (and, unless `labeled` is false, `<name>_labels.npy` beside them).
    static func writeNPY(_ name: String, descr: String = "|u1", shape: [Int], payload: [UInt8]? = nil, labeled: Bool = true) throws -> String {
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        let bytes = payload ?? [UInt8](repeating: 128, count: shape.reduce(1, *))
        try Data(HostileFiles.npy(descr: descr, shape: shape, payload: bytes)).write(to: URL(fileURLWithPath: path(name)))
        if labeled && !name.hasSuffix("labels.npy") {
            let labels = (0..<shape[0]).flatMap { i in withUnsafeBytes(of: Int64(i % 10).littleEndian) { Array($0) } }
            let stem = String(name.dropLast(4))
            try Data(HostileFiles.npy(descr: "<i8", shape: [shape[0]], payload: labels)).write(to: URL(fileURLWithPath: path(stem + "_labels.npy")))
        }
        return path(name)
    }

    func expectUsage(_ arguments: [String], naming option: String) throws {
        let r = try Self.run(arguments)
        #expect(!r.trapped && r.status == 64 && r.output.contains(option), "\(arguments): status \(r.status)\n\(r.output.suffix(600))")
    }

    func expectDataError(_ arguments: [String], saying text: String) throws {
        let r = try Self.run(arguments)
        #expect(!r.trapped && r.status == 1 && r.output.contains(text), "\(arguments): status \(r.status)\n\(r.output.suffix(600))")
    }

    @Test func argumentsOutOfRangeNameTheOption() throws {
        try expectUsage(["--eval-count", "0"], naming: "--eval-count")                    // 1
        try expectUsage(["--eval-every", "0"], naming: "--eval-every")                    // 2
        try expectUsage(["--lr", "inf"], naming: "--lr")                                  // 10
        try expectUsage(["--prototypes", "0"], naming: "--prototypes")                    // 10
        try expectUsage(["--epochs", "1", "--warmup-epochs", "2"], naming: "--warmup-epochs")
        try expectUsage(["--output", "/proc/kappa-x"], naming: "--output")                // 10
        try expectUsage(["--patch-size", "4"], naming: "--patch-size")                     // the ResNet has no patches
        try expectUsage(["--backbone", "vit-micro", "--patch-size", "5"], naming: "--patch-size")
        try expectUsage(["--backbone", "vit-micro", "--drop-path", "1"], naming: "--drop-path")
        try expectUsage(["ablation", "--seed", "1", "--seeds", "0", "1"], naming: "--seeds")
        try expectUsage(["ablation", "--seeds", "3", "3"], naming: "--seeds")
        try FileManager.default.createDirectory(at: Self.folder, withIntermediateDirectories: true)
        _ = FileManager.default.createFile(atPath: Self.path("a-file"), contents: Data([1]))
        try expectUsage(["--output", Self.path("a-file")], naming: "is a file")           // 10
        let evalHelp = try Self.run(["eval", "--help"]).output
        #expect(!evalHelp.contains("--output") && !evalHelp.contains("--eval-every"), "eval lists only what it uses")
    }

    @Test func filesThatNoNetworkCanTakeAreRefusedWithTheirName() throws {
        let oneByOne = try Self.writeNPY("one.npy", shape: [100, 1, 1])                               // 3
        try expectDataError(["--data", oneByOne], saying: oneByOne)
        let empty = try Self.writeNPY("empty.npy", shape: [100, 0, 28], payload: [])
        try expectDataError(["--data", empty], saying: "holds no pixels")
        let wide = try Self.writeNPY("wide.npy", shape: [100, 28, 32])                                // 11
        try expectDataError(["--data", wide], saying: "square")
        var floats = [Float](repeating: 0.5, count: 100 * 28 * 28)
        floats[28 * 28 * 3 + 5] = .nan                                                                // 11
        let nan = try Self.writeNPY("nan.npy", descr: "<f4", shape: [100, 28, 28],
                                    payload: floats.withUnsafeBytes { Array($0) })
        try expectDataError(["--data", nan], saying: "image 3")
    }

    @Test func shrunkSplitsWarnAndEvalTakesFewImagesAndRefusesOtherChannels() throws {
        let root = Self.folder.appendingPathComponent("splits")
        try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
        let images = try Self.writeNPY("splits/images.npy", shape: [100, 28, 28], labeled: false)
        let labels = (0..<100).flatMap { i -> [UInt8] in withUnsafeBytes(of: Int64(i % 10 == 0 ? 1_000_000 : i % 10).littleEndian) { Array($0) } }
        _ = try Self.writeNPY("splits/labels.npy", descr: "<i8", shape: [100], payload: labels)
        // 11: both splits shrunk, said on a warning line; 6: a label of a million does not size anything.
        let r = try Self.run(["--data", images, "--train-count", "80", "--eval-count", "80", "--epochs", "1", "--output", Self.path("run-split")]
                             + Self.tiny.dropFirst(4))
        #expect(!r.trapped && r.status == 0 && r.output.contains("warning: ") && r.output.contains("first 50"), "\(r.output.suffix(800))")
        #expect(r.output.contains("warning: the learning-rate warmup is 1 epoch"), "9: --epochs 1 works and says the warmup is clamped")
        // 4: eval with fewer images than the checkpoint's batch.
        let checkpoint = Self.path("run-split/checkpoint.safetensors")
        let few = try Self.run(["eval", "--checkpoint", checkpoint, "--data", "builtin", "--train-count", "10", "--eval-count", "10", "--threads", "1"])
        #expect(!few.trapped && few.status == 0 && few.output.contains("kNN"), "\(few.output.suffix(600))")
        // 5: eval of a one-channel checkpoint on RGB images.
        let rgb = try Self.writeNPY("rgb.npy", shape: [20, 32, 32, 3])
        try expectDataError(["eval", "--checkpoint", checkpoint, "--data", rgb, "--threads", "1"], saying: "3 channels")
    }

    @Test func compareTabulatesAndOverlaysDINOAndDINOvMF() throws {
        let a = Self.path("cmp-dino"), b = Self.path("cmp-vmf"), out = Self.path("cmp")
        #expect(try Self.run(Self.tiny + ["--epochs", "2", "--method", "dino", "--output", a]).status == 0)
        #expect(try Self.run(Self.tiny + ["--epochs", "2", "--output", b]).status == 0)
        let r = try Self.run(["compare", a, b, "--output", out])
        #expect(r.status == 0 && r.output.contains("cmp-dino") && r.output.contains("cmp-vmf") && r.output.contains("kNN"), "\(r.output)")
        for file in ["knn.svg", "loss.svg", "utilization.svg", "report.html"] {
            #expect(FileManager.default.fileExists(atPath: out + "/" + file), "\(file)")
        }
        let knn = try String(contentsOfFile: out + "/knn.svg", encoding: .utf8)
        #expect(knn.contains("cmp-dino") && knn.contains("cmp-vmf"), "both runs in the legend")
        try expectUsage(["compare", a], naming: "two or more")
        try expectDataError(["compare", a, Self.path("nowhere")], saying: "nowhere")
    }

    @Test func koLeoProgramRuns() throws {
        let koleo = CrashTests.program!.deletingLastPathComponent().appendingPathComponent("KoLeo")
        try #require(FileManager.default.isExecutableFile(atPath: koleo.path), "KoLeo is built beside DINOvMF")
        for extra in [[], ["--koleo-weight", "0.3"]] {
            let p = Process()
            p.executableURL = koleo
            p.arguments = ["--dry-run", "--threads", "1", "--train-count", "64", "--eval-count", "8"] + extra
            let pipe = Pipe()
            (p.standardOutput, p.standardError) = (pipe, pipe)
            try p.run()
            let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            p.waitUntilExit()
            #expect(p.terminationReason == .exit && p.terminationStatus == 0 && output.contains("dry run"), "\(extra): \(output.suffix(600))")
        }
    }

    @Test func ablationWritesOneReportWithEveryCell() throws {
        let out = Self.path("ablation")
        let r = try Self.run(["ablation", "--budget-epochs", "1", "--seeds", "0", "1"] + Self.tiny.filter { $0 != "--no-linear-probe" } + ["--output", out])
        #expect(r.status == 0 && r.output.contains("| run |"), "\(r.output.suffix(800))")
        // Eight rows, each with both seeds' kNN, linear probe, prototypes used and norm range.
        let rows = r.output.split(separator: "\n").filter { $0.hasPrefix("| true |") || $0.hasPrefix("| false |") }
        #expect(rows.count == 8, "\(r.output.suffix(1200))")
        for row in rows {
            let fields = row.split(separator: "|").map { $0.trimmingCharacters(in: .whitespaces) }
            #expect(fields.count == 8 && fields[3...6].allSatisfy { $0.components(separatedBy: " / ").count == 2 }, "\(row)")
        }
        let seeds = try FileManager.default.contentsOfDirectory(atPath: out).filter { $0.hasSuffix("seed=1") }
        #expect(seeds.count == 8, "one folder per cell and seed: \(seeds)")
        let html = try Data(contentsOf: URL(fileURLWithPath: out + "/report.html"))
        final class Columns: NSObject, XMLParserDelegate {
            var headers = 0, svg = 0
            func parser(_ parser: XMLParser, didStartElement name: String, namespaceURI: String?, qualifiedName: String?, attributes: [String: String] = [:]) {
                if name == "th" && attributes["class"] == nil { headers += 1 }
                if name == "svg" { svg += 1 }
            }
        }
        let parser = XMLParser(data: html)
        let columns = Columns()
        parser.delegate = columns
        #expect(parser.parse() && columns.headers == 16 && columns.svg == 3, "eight cells × two seeds side by side, three overlaid plots")
    }

    @Test func resumeChecksTheRunAndCtrlCExitsWith130() throws {
        let output = Self.path("run-resume")
        let first = try Self.run(Self.tiny + ["--epochs", "1", "--output", output])
        #expect(first.status == 0, "\(first.output.suffix(600))")
        // 7: another method, another dataset, a finished run.
        try expectDataError(Self.tiny + ["--epochs", "1", "--output", output, "--resume", "--method", "dino"], saying: "another configuration")
        try expectDataError(Array(Self.tiny.dropFirst(2)) + ["--train-count", "48", "--epochs", "1", "--output", output, "--resume"],
                            saying: "trained on")
        let finished = try Self.run(Self.tiny + ["--epochs", "1", "--output", output, "--resume"])
        #expect(finished.status == 0 && finished.output.contains("finished"), "\(finished.output.suffix(600))")
        // A longer run is refused unless asked for with --extend, which then trains the second epoch.
        try expectDataError(Self.tiny + ["--epochs", "2", "--output", output, "--resume"], saying: "--extend")
        let extended = try Self.run(Self.tiny + ["--epochs", "2", "--output", output, "--resume", "--extend"])
        #expect(extended.status == 0 && extended.output.contains("after 2 epochs"), "\(extended.output.suffix(600))")
        // 11: Ctrl-C saves and exits with 130.
        let long = try Self.run(Self.tiny + ["--epochs", "200", "--output", Self.path("run-interrupt")],
                                interruptWhen: Self.path("run-interrupt/metrics.jsonl"))
        #expect(!long.trapped && long.status == 130 && long.output.contains("--resume"), "status \(long.status)\n\(long.output.suffix(600))")
    }
}

@Suite("Evaluation with sparse labels")
struct SparseLabelTests {
    @Test func labelsAreMappedToDenseClasses() throws {
        let base = ShapesDataset.make(count: 40, size: 8, seed: 1)
        let labels = base.labels!.map { $0 == 0 ? 1_000_000 : $0 }
        let d = ImageDataset(images: base.images, labels: labels, count: 40, channels: 1, height: 8, width: 8, source: "sparse")
        let evaluator = try Evaluator(reference: d.subset(0..<30), test: d.subset(30..<40))
        var c = DINOConfiguration()
        c.backbone = .resnet(width: 2, channels: 1)
        (c.prototypes, c.headHidden, c.bottleneck, c.batchSize) = (8, 8, 4, 8)
        let trainer = try TeacherStudentTrainer(configuration: c, iterationsPerEpoch: 1)
        let report = evaluator.evaluate(trainer, linearProbe: true)
        #expect(report.knn >= 0 && report.knn <= 1 && (report.linearProbe ?? -1) >= 0)
    }
}

/// The command-line campaign of `KappaFuzz --command-line` (which runs 10,000), a few hundred
/// runs from a fixed seed against the debug build.
@Suite("Command line: fuzz campaign", .enabled(if: CrashTests.program != nil, "needs the DINOvMF program beside the test bundle (swift build)"))
struct CommandLineFuzzTests {
    @Test(.timeLimit(.minutes(15)))
    func noTrapNoHangAndEveryFailureNamesAnOptionOrAFile() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("kappa-cli-fuzz-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: directory) }
        let runs = ProcessInfo.processInfo.environment["KAPPA_CLI_FUZZ_RUNS"].flatMap(Int.init) ?? 150
        let outcome = try CommandLineFuzz.campaign(program: CrashTests.program!, runs: runs, seed: 2026, directory: directory)
        print(outcome)
        #expect(outcome.failures.isEmpty, "\(outcome.failures.prefix(5).joined(separator: "\n"))")
        #expect(outcome.succeeded > runs / 10, "enough runs get past validation to exercise training: \(outcome)")
    }
}
