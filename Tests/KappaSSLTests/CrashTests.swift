import Foundation
import Kappa
import KappaNN
import KappaSSL
import Testing

/// Crash safety: a training run killed with SIGKILL at random points, half of them while a
/// checkpoint is being written, then stopped twice with SIGINT (Ctrl-C) mid-epoch, and resumed
/// each time, ends with the same weights and the same metrics.jsonl (byte for byte) as an
/// uninterrupted run, and no kill ever leaves an unreadable checkpoint.
@Suite("Crash-safe training (SIGKILL, SIGINT)")
struct CrashTests {
    /// The DINOvMF program built beside the test bundle (`swift test` builds it).
    static var program: URL? {
        let url = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("DINOvMF")
        return FileManager.default.isExecutableFile(atPath: url.path) ? url : nil
    }

    static func start(_ program: URL, output: URL, resume: Bool) throws -> Process {
        let p = Process()
        p.executableURL = program
        p.arguments = ["train", "--train-count", "48", "--eval-count", "32", "--batch-size", "16", "--epochs", "5", "--warmup-epochs", "1",
                       "--eval-every", "1", "--no-linear-probe", "--prototypes", "32", "--head-hidden", "32", "--bottleneck", "16",
                       "--seed", "3", "--threads", "1", "--output", output.path] + (resume ? ["--resume"] : [])
        var environment = ProcessInfo.processInfo.environment
        environment["KAPPA_FAULT_WRITE_DELAY_MS"] = "150"   // widen each checkpoint write to about half a second
        p.environment = environment
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        return p
    }

    static func temporaryFiles(in folder: URL) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: folder.path)) ?? []).filter { $0.hasPrefix(".checkpoint.safetensors.tmp-") }
    }

    @Test("killed at random points and resumed: identical weights and metrics, never an unreadable checkpoint",
          .enabled(if: program != nil, "needs the DINOvMF program beside the test bundle (swift build)"))
    func killAndResume() throws {
        let program = try #require(Self.program)
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("kappa-crash-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: root) }
        let reference = root.appendingPathComponent("uninterrupted"), crashed = root.appendingPathComponent("killed")
        try FileManager.default.createDirectory(at: crashed, withIntermediateDirectories: true)

        let began = Date()
        let straight = try Self.start(program, output: reference, resume: false)
        straight.waitUntilExit()
        #expect(straight.terminationStatus == 0)
        let duration = Date().timeIntervalSince(began)

        // Six runs killed (odd ones while the child writes a checkpoint, the others at a random
        // moment of the run), each resumed from what the last one left; the seventh finishes.
        var g = RandomGenerator(seed: 2026)
        var kills = 0, killsDuringWrite = 0, interrupts = 0, finished = false
        let checkpoint = crashed.appendingPathComponent("checkpoint.safetensors")
        // What each attempt does: SIGKILL at a random moment or during a checkpoint write, Ctrl-C, or finish.
        enum Stop { case killAnywhere, killWhileWriting, interrupt, finish }
        let plan: [Stop] = [.killAnywhere, .interrupt, .killWhileWriting, .killAnywhere, .killWhileWriting, .interrupt, .killWhileWriting, .finish]
        for stop in plan {
            let resume = FileManager.default.fileExists(atPath: checkpoint.path)
            let p = try Self.start(program, output: crashed, resume: resume)
            let ownTemporary = ".checkpoint.safetensors.tmp-\(p.processIdentifier)-"
            let writing = { Self.temporaryFiles(in: crashed).contains { $0.hasPrefix(ownTemporary) } }
            if stop == .killAnywhere || stop == .killWhileWriting {
                if stop == .killAnywhere {
                    usleep(UInt32(1e6 * (0.2 + g.nextUniform() * duration / 2)))
                } else {
                    let deadline = Date().addingTimeInterval(2 * duration)
                    while p.isRunning && !writing() && Date() < deadline { usleep(1_000) }
                    usleep(UInt32(g.nextInt(below: 300_000)))
                }
            }
            if (stop == .killAnywhere || stop == .killWhileWriting) && p.isRunning {
                let duringWrite = writing()
                kill(p.processIdentifier, SIGKILL)
                p.waitUntilExit()
                kills += 1
                if duringWrite { killsDuringWrite += 1 }
                if FileManager.default.fileExists(atPath: checkpoint.path) {
                    // Whatever the moment of the kill, the checkpoint on disk reads and validates.
                    _ = try RunCheckpoint.configuration(in: checkpoint)
                    _ = try SafeTensors.read(checkpoint)
                }
            } else if stop == .interrupt && p.isRunning {
                // Ctrl-C mid-epoch: the run saves where it is and exits 130.
                let log = crashed.appendingPathComponent("metrics.jsonl")
                let size = (try? FileManager.default.attributesOfItem(atPath: log.path)[.size] as? Int) ?? 0
                let deadline = Date().addingTimeInterval(2 * duration)
                while p.isRunning && Date() < deadline
                        && ((try? FileManager.default.attributesOfItem(atPath: log.path)[.size] as? Int) ?? 0) <= size + 200 {
                    usleep(2_000)
                }
                kill(p.processIdentifier, SIGINT)
                p.waitUntilExit()
                #expect(p.terminationStatus == 130 || p.terminationStatus == 0, "status \(p.terminationStatus) after SIGINT")
                if p.terminationStatus == 130 { interrupts += 1 }
            } else {
                p.waitUntilExit()
                #expect(p.terminationStatus == 0)
                finished = p.terminationStatus == 0
                if finished { break }
            }
        }
        print("crash test: \(kills) SIGKILLs, \(killsDuringWrite) during a checkpoint write, \(interrupts) SIGINTs")
        #expect(interrupts >= 1, "at least one run stopped by Ctrl-C and resumed")
        #expect(finished)
        #expect(kills >= 3 && killsDuringWrite >= 1, "\(kills) kills, \(killsDuringWrite) during writes")

        let a = try SafeTensors.read(reference.appendingPathComponent("checkpoint.safetensors"))
        let b = try SafeTensors.read(checkpoint)
        #expect(a.tensors.map(\.name) == b.tensors.map(\.name))
        for (x, y) in zip(a.tensors, b.tensors) {
            #expect(x.tensor.rawBytes() == y.tensor.rawBytes(), "\(x.name) differs")
        }
        let metricsA = try String(contentsOf: reference.appendingPathComponent("metrics.jsonl"), encoding: .utf8)
        let metricsB = try String(contentsOf: crashed.appendingPathComponent("metrics.jsonl"), encoding: .utf8)
        #expect(metricsA == metricsB)
        #expect(metricsA.contains("\"evaluation\""))
        #expect(Self.temporaryFiles(in: crashed).isEmpty)
    }
}
