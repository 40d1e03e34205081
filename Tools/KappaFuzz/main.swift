import Foundation
import KappaFuzzing

// Two campaigns:
//
//     swift run -c release KappaFuzz [iterations] [seed]        hostile files against every reader
//     swift run -c release KappaFuzz --command-line [runs] [seed]
//                                                              argument lists against DINOvMF
//
// The first (default 10,000 mutants per reader) exits 1 when any mutant was not read or
// rejected with the file named within the time limit; a crash or hang would stop the command
// itself. The second (default 10,000 runs; build DINOvMF first, `swift build -c release`, which
// `swift run` does) runs the DINOvMF program beside this one and exits 1 on any trap, hang
// (60 s) or failure whose message names neither an option nor a file.
var arguments = Array(CommandLine.arguments.dropFirst())
let commandLine = arguments.first == "--command-line"
if commandLine { arguments.removeFirst() }
let count = arguments.first.flatMap(Int.init) ?? 10_000
let seed = arguments.dropFirst().first.flatMap(UInt64.init) ?? 1
let directory = FileManager.default.temporaryDirectory.appendingPathComponent("kappa-fuzz-\(getpid())")
try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
defer { try? FileManager.default.removeItem(at: directory) }
var failed = false
if commandLine {
    let program = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("DINOvMF")
    guard FileManager.default.isExecutableFile(atPath: program.path) else {
        print("\(program.path): not built; run `swift build -c release --product DINOvMF` first")
        exit(1)
    }
    let start = Date()
    let outcome = try CommandLineFuzz.campaign(program: program, runs: count, seed: seed, directory: directory) { i, o in
        if (i + 1) % 500 == 0 { print("\(i + 1) runs, \(o.failures.count) failures, \(Int(Date().timeIntervalSince(start))) s"); fflush(stdout) }
    }
    print(outcome)
    print(String(format: "%.1f min", Date().timeIntervalSince(start) / 60))
    for f in outcome.failures.prefix(20) { print("  " + f) }
    failed = !outcome.failures.isEmpty
} else {
    for reader in try HostileFiles.readers(directory: directory) {
        let outcome = HostileFiles.run(reader, iterations: count, seed: seed, directory: directory)
        print(outcome)
        for f in outcome.failures.prefix(10) { print("  " + f) }
        failed = failed || !outcome.failures.isEmpty
    }
}
exit(failed ? 1 : 0)
