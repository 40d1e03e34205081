import Foundation
import KappaFuzzing

// Hostile-file campaign over every reader: `swift run -c release KappaFuzz [iterations] [seed]`
// (default 10,000 mutants per reader). Exits 1 when any mutant was not read or rejected with
// the file named within the time limit; a crash or hang would stop the command itself.
let arguments = CommandLine.arguments.dropFirst()
let iterations = arguments.first.flatMap(Int.init) ?? 10_000
let seed = arguments.dropFirst().first.flatMap(UInt64.init) ?? 1
let directory = FileManager.default.temporaryDirectory.appendingPathComponent("kappa-fuzz-\(getpid())")
try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
defer { try? FileManager.default.removeItem(at: directory) }
var failed = false
for reader in try HostileFiles.readers(directory: directory) {
    let outcome = HostileFiles.run(reader, iterations: iterations, seed: seed, directory: directory)
    print(outcome)
    for f in outcome.failures.prefix(10) { print("  " + f) }
    failed = failed || !outcome.failures.isEmpty
}
exit(failed ? 1 : 0)
