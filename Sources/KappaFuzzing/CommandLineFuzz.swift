import Foundation
import Kappa
import KappaNN
import KappaSSL

/// The command-line campaign: argument lists drawn from a fixed seed (valid and invalid values
/// of every option of `DINOvMF train` and `eval`, random combinations, hostile data files and
/// checkpoints) run against a built program. No run may end by a signal or a Swift runtime
/// failure, hang, or fail with a message that names neither an option nor a file. Training runs
/// use `--dry-run` (one step on two images and a small evaluation), so that a campaign of
/// thousands of runs takes minutes.
public enum CommandLineFuzz {
    /// What a campaign found.
    public struct Outcome: CustomStringConvertible {
        public var runs = 0, succeeded = 0, refused = 0
        public var traps: [String] = [], hangs: [String] = [], unnamed: [String] = []
        public var slowest = 0.0
        /// Runs by exit status.
        public var statuses: [Int32: Int] = [:]

        public var description: String {
            let byStatus = statuses.keys.sorted().map { "\($0): \(statuses[$0]!)" }.joined(separator: ", ")
            return "\(runs) runs: \(succeeded) succeeded, \(refused) refused with a message (exit statuses \(byStatus)); "
                + "\(traps.count) traps, \(hangs.count) hangs, \(unnamed.count) failures naming no option or file; slowest \(String(format: "%.1f", slowest)) s"
        }
        public var failures: [String] { traps + hangs + unnamed }
    }

    /// The files a campaign's runs refer to, made in `directory`: a labeled `.npy` set, a
    /// valid checkpoint, a run folder to resume, and hostile variants of each.
    public struct Files {
        public let directory: URL
        public let dataSets: [String], checkpoints: [String], runFolders: [String]
    }

    /// Writes the campaign's files.
    public static func prepare(in directory: URL) throws -> Files {
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        func write(_ name: String, _ bytes: [UInt8]) throws -> String {
            let url = directory.appendingPathComponent(name)
            try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
            try Data(bytes).write(to: url)
            return url.path
        }
        func labels(_ n: Int) -> [UInt8] { (0..<n).flatMap { i in withUnsafeBytes(of: Int64(i % 10).littleEndian) { Array($0) } } }
        var g = RandomGenerator(seed: 77)
        var dataSets: [String] = []
        // A good set, odd shapes, and mutants of the good one.
        let pixels = (0..<(100 * 28 * 28)).map { _ in UInt8(truncatingIfNeeded: g.nextInt(below: 256)) }
        let good = try write("good/images.npy", HostileFiles.npy(descr: "|u1", shape: [100, 28, 28], payload: pixels))
        _ = try write("good/labels.npy", HostileFiles.npy(descr: "<i8", shape: [100], payload: labels(100)))
        dataSets.append(good)
        for (name, shape) in [("tiny", [40, 2, 2]), ("wide", [40, 28, 20]), ("rgb", [40, 32, 32, 3]), ("one", [1, 28, 28]), ("odd", [40, 30, 30])] {
            let bytes = [UInt8](repeating: 100, count: shape.reduce(1, *))
            dataSets.append(try write("\(name)/images.npy", HostileFiles.npy(descr: "|u1", shape: shape, payload: bytes)))
            _ = try write("\(name)/labels.npy", HostileFiles.npy(descr: "<i8", shape: [shape[0]], payload: labels(shape[0])))
        }
        let seedFile = HostileFiles.npy(descr: "|u1", shape: [100, 28, 28], payload: pixels)
        for i in 0..<8 {
            dataSets.append(try write("mutant\(i)/images.npy", HostileFiles.mutate(seedFile, using: &g)))
            _ = try write("mutant\(i)/labels.npy", HostileFiles.npy(descr: "<i8", shape: [100], payload: labels(100)))
        }
        dataSets.append(directory.appendingPathComponent("missing/images.npy").path)
        // A checkpoint of the default configuration on 28-pixel images (one ResNet), its
        // mutants, and run folders holding each.
        let config = try DINOConfiguration.preset(mixedPolarity: true)
        let trainer = try TeacherStudentTrainer(configuration: config, iterationsPerEpoch: 1)
        let valid = directory.appendingPathComponent("run0/checkpoint.safetensors")
        try FileManager.default.createDirectory(at: valid.deletingLastPathComponent(), withIntermediateDirectories: true)
        try RunCheckpoint.save(trainer, to: valid)
        let validBytes = [UInt8](try Data(contentsOf: valid))
        var checkpoints = [valid.path], runFolders = [valid.deletingLastPathComponent().path]
        for i in 1..<5 {
            let path = try write("run\(i)/checkpoint.safetensors", HostileFiles.mutate(validBytes, using: &g))
            checkpoints.append(path)
            runFolders.append(URL(fileURLWithPath: path).deletingLastPathComponent().path)
        }
        checkpoints.append(directory.appendingPathComponent("nothing.safetensors").path)
        return Files(directory: directory, dataSets: dataSets, checkpoints: checkpoints, runFolders: runFolders)
    }

    /// The values an option is tried with: typical, boundary, out of range, not a number.
    static let integers = ["0", "1", "2", "3", "-1", "7", "16", "64", "1000", "99999999999", "-99999999999", "1e3", "abc", ""]
    static let reals = ["0", "1", "0.5", "-0.5", "1e-9", "2", "1e308", "-1e308", "inf", "-inf", "nan", "0.04", "abc", ""]
    static let booleans = ["true", "false", "yes", "1", ""]

    /// The options of `train` with their kinds of values.
    static let trainOptions: [(String, [String])] = [
        ("--method", ["dino-vmf", "dino", "ibot-vmf", "ibot", "simclr", ""]),
        ("--backbone", ["resnet", "vit-micro", "vit-tiny", "vit-small", "vit-conv", "vit-stem", "vgg"]),
        ("--vmf-normalization", booleans), ("--normalized-prototypes", booleans),
        ("--centering", ["probability", "logit", "sinkhorn", "none"]),
        ("--resnet-width", integers), ("--prototypes", integers), ("--bottleneck", integers), ("--head-hidden", integers),
        ("--head-batch-norm", booleans), ("--patch-size", integers), ("--drop-path", reals),
        ("--epochs", integers), ("--batch-size", integers), ("--lr", reals), ("--min-lr", reals), ("--warmup-epochs", integers),
        ("--weight-decay", reals), ("--weight-decay-end", reals), ("--teacher-momentum", reals), ("--student-temp", reals),
        ("--teacher-temp", reals), ("--warmup-teacher-temp", reals), ("--warmup-teacher-epochs", integers),
        ("--center-momentum", reals), ("--clip-grad", reals), ("--freeze-last-layer", integers),
        ("--augmentation", ["small", "dino", "big"]), ("--local-crops", integers), ("--local-crop-size", integers),
        ("--global-crop-min", reals),
        ("--invert-probability", reals), ("--rotation", reals), ("--translation", reals), ("--noise", reals),
        ("--local-crop-min", reals), ("--patch-weight", reals), ("--patch-teacher-temp", reals), ("--mask-ratio-min", reals),
        ("--mask-ratio-max", reals), ("--mask-probability", reals), ("--seed", integers), ("--threads", integers),
        ("--eval-every", integers), ("--train-count", integers), ("--eval-count", integers), ("--sync-batch-norm", booleans),
    ]
    static let flags = ["--exact-normalizer", "--no-decay-on-norms", "--no-linear-probe", "--resume", "--extend", "--overlap-allreduce",
                        "--bogus-flag"]

    /// One argument list: `train --dry-run` with random options (usually few images, so that
    /// the run is quick), or `eval` of a checkpoint, or a malformed command.
    public static func arguments(using g: inout RandomGenerator, files: Files) -> [String] {
        func pick<T>(_ xs: [T]) -> T { xs[g.nextInt(below: xs.count)] }
        let kind = g.nextUniform()
        if kind < 0.05 { return pick([["--help"], ["bogus"], ["train", "--epochs"], ["eval"], ["--data"], ["train", "--", "x"], ["ablation", "--budget-epochs", "0"]]) }
        var args: [String]
        if kind < 0.8 {
            args = ["train", "--dry-run"]
            let count = 1 + g.nextInt(below: 6)
            for _ in 0..<count {
                let (option, values) = pick(trainOptions)
                // Usually a typical value, so that many runs get past validation and train.
                let typical = values == integers ? ["1", "2", "4", "8", "16"] : values == reals ? ["0.04", "0.1", "0.5", "0.9"] : values
                args += [option, g.nextUniform() < 0.6 ? pick(typical) : pick(values)]
            }
            if g.nextUniform() < 0.2 { args.append(pick(flags)) }
            if g.nextUniform() < 0.3 { args += ["--output", pick(files.runFolders + ["/proc/kappa", files.dataSets[0], files.directory.path + "/fresh"])] }
        } else {
            args = ["eval", "--checkpoint", pick(files.checkpoints)]
        }
        if g.nextUniform() < 0.4 { args += ["--data", pick(files.dataSets + ["builtin"])] }
        // Few images unless the list says otherwise: the default 8,000 would make runs slow
        // (an evaluation of them all takes about a minute in a debug build, so eval always
        // gets few; a dry run trains on two images whatever the count).
        if !args.contains("--train-count") && (args[0] == "eval" || g.nextUniform() < 0.95) { args += ["--train-count", pick(["64", "80", "100"])] }
        if !args.contains("--eval-count") && g.nextUniform() < 0.95 { args += ["--eval-count", pick(["1", "4", "16"])] }
        if !args.contains("--threads") { args += ["--threads", "1"] }
        return args
    }

    /// Runs `program` with `arguments`, killing it after `timeLimit` seconds.
    static func execute(_ program: URL, _ arguments: [String], timeLimit: Double) throws -> (status: Int32, signaled: Bool, hung: Bool, output: String, seconds: Double) {
        let p = Process()
        p.executableURL = program
        p.arguments = arguments
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("kappa-cli-fuzz-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).txt")
        _ = FileManager.default.createFile(atPath: out.path, contents: nil)
        defer { try? FileManager.default.removeItem(at: out) }
        let handle = try FileHandle(forWritingTo: out)
        p.standardOutput = handle
        p.standardError = handle
        let start = Date()
        try p.run()
        var hung = false
        while p.isRunning {
            if Date().timeIntervalSince(start) > timeLimit {
                hung = true
                kill(p.processIdentifier, SIGKILL)
                break
            }
            usleep(2_000)
        }
        p.waitUntilExit()
        try? handle.close()
        let output = (try? String(contentsOf: out, encoding: .utf8)) ?? ""
        return (p.terminationStatus, p.terminationReason == .uncaughtSignal, hung, output, Date().timeIntervalSince(start))
    }

    /// Runs `runs` argument lists from `seed` against `program` (the DINOvMF executable).
    public static func campaign(program: URL, runs: Int, seed: UInt64, directory: URL, timeLimit: Double = 60,
                                progress: ((Int, Outcome) -> Void)? = nil) throws -> Outcome {
        let files = try prepare(in: directory)
        var g = RandomGenerator(seed: seed)
        var outcome = Outcome()
        for i in 0..<runs {
            let args = arguments(using: &g, files: files)
            let r = try execute(program, args, timeLimit: timeLimit)
            outcome.runs += 1
            outcome.slowest = Swift.max(outcome.slowest, r.seconds)
            let shown = args.map { $0.isEmpty ? "''" : $0 }.joined(separator: " ")
            let tail = String(r.output.suffix(300)).replacingOccurrences(of: "\n", with: " | ")
            if r.hung {
                outcome.hangs.append("run \(i): no end within \(Int(timeLimit)) s: \(shown)")
            } else if r.signaled || r.output.contains("Fatal error") || r.output.contains("runtime failure") {
                outcome.traps.append("run \(i): \(r.signaled ? "signal \(r.status)" : "runtime failure"): \(shown) → \(tail)")
            } else {
                outcome.statuses[r.status, default: 0] += 1
                if r.status == 0 {
                    outcome.succeeded += 1
                } else {
                    outcome.refused += 1
                    // The message must name an option or a file of the run.
                    let paths = args.filter { $0.hasPrefix("/") }
                    let named = r.output.contains("--") || r.output.contains("Unexpected argument") || r.output.contains("Usage:")
                        || paths.contains { r.output.contains($0) } || r.output.contains(files.directory.path)
                        || r.output.range(of: #"Error: [^ ]*/[^ ]*: "#, options: .regularExpression) != nil
                    if !named { outcome.unnamed.append("run \(i): status \(r.status) names no option or file: \(shown) → \(tail)") }
                }
            }
            progress?(i, outcome)
        }
        return outcome
    }
}
