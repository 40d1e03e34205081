import Foundation
import Kappa
import KappaNN
import Synchronization

/// Set by SIGINT (Ctrl-C): the session saves a checkpoint and stops cleanly.
let interruptRequested = Atomic<Bool>(false)

/// A whole training run with its outputs: progress on the terminal (plain log lines when
/// not a terminal), `metrics.jsonl`, SVG plots, `checkpoint.safetensors` after every epoch
/// and on Ctrl-C, evaluation every `evaluateEvery` epochs and at the end.
public final class TrainingSession {
    public let trainer: DINOTrainer
    public let reference: ImageDataset, test: ImageDataset
    public let output: String
    public var evaluateEvery = 5
    public var linearProbe = true
    public var name = "DINO-vMF"
    var losses: [(Double, Double)] = []
    var evaluations: [EvaluationReport] = []

    /// What a run ended with.
    public struct Outcome {
        public let report: EvaluationReport?
        public let interrupted: Bool
        public let diverged: Bool
        public let seconds: Double
    }

    public init(trainer: DINOTrainer, reference: ImageDataset, test: ImageDataset, output: String) {
        (self.trainer, self.reference, self.test, self.output) = (trainer, reference, test, output)
    }

    public var checkpointURL: URL { URL(fileURLWithPath: output).appendingPathComponent("checkpoint.safetensors") }

    /// Trains to the end (or to Ctrl-C), resuming from the output folder's checkpoint when `resume`.
    public func run(resume: Bool = false) throws -> Outcome {
        try FileManager.default.createDirectory(atPath: output, withIntermediateDirectories: true)
        if resume {
            guard FileManager.default.fileExists(atPath: checkpointURL.path) else {
                throw CheckpointError(path: checkpointURL.path, problem: "no checkpoint to resume from")
            }
            try trainer.resume(from: checkpointURL)
            log("resumed at epoch \(trainer.epoch), step \(trainer.step)")
        }
        let metrics = try MetricsLog(path: output + "/metrics.jsonl",
                                     resumingAt: resume ? (step: trainer.step, epoch: trainer.epoch) : nil)
        interruptRequested.store(false, ordering: .relaxed)
        signal(SIGINT) { _ in interruptRequested.store(true, ordering: .relaxed) }
        defer { signal(SIGINT, SIG_DFL) }
        let start = Date()
        let c = trainer.configuration
        let perEpoch = trainer.train.count / c.batchSize
        let total = c.epochs * perEpoch
        let terminal = isatty(STDOUT_FILENO) != 0
        var diverged = false, interrupted = false
        var stepStart = Date(), stepsTimed = 0
        while !trainer.isFinished {
            var epochEntropy = 0.0, epochKL = 0.0, epochLoss = 0.0, n = 0.0
            let completed = trainer.trainEpoch(onStep: { s in
                metrics.write("step", s)
                losses.append((Double(s.step), s.loss))
                if !s.loss.isFinite { diverged = true }
                epochEntropy += s.teacherEntropy; epochKL += s.klDivergence; epochLoss += s.loss; n += 1
                stepsTimed += 1
                let rate = Date().timeIntervalSince(stepStart) / Double(stepsTimed)
                let eta = Int(rate * Double(total - s.step - 1))
                let line = String(format: "epoch %d/%d step %d/%d  ETA %d:%02d  loss %.4f  lr %.2e  τt %.3f  H(t) %.2f  KL %.3f",
                                  s.epoch + 1, c.epochs, s.step + 1, total, eta / 60, eta % 60, s.loss, s.learningRate,
                                  s.teacherTemperature, s.teacherEntropy, s.klDivergence)
                if terminal {
                    print("\r" + line, terminator: "")
                    fflush(stdout)
                } else if s.step % 50 == 0 {
                    print(line)
                    fflush(stdout)
                }
            }, shouldStop: { interruptRequested.load(ordering: .relaxed) })
            if terminal { print("") }
            if diverged {
                log("the loss became NaN or infinite at step \(trainer.step); stopping")
                break
            }
            if !completed {
                interrupted = true
                log("interrupted at epoch \(trainer.epoch), step \(trainer.step): saving \(checkpointURL.path)")
                try trainer.save(to: checkpointURL)
                break
            }
            struct EpochRecord: Codable { let epoch: Int; let loss: Double; let teacherEntropy: Double; let klDivergence: Double }
            metrics.write("epoch", EpochRecord(epoch: trainer.epoch, loss: epochLoss / n, teacherEntropy: epochEntropy / n,
                                               klDivergence: epochKL / n))
            if trainer.epoch % evaluateEvery == 0 || trainer.isFinished {
                let report = trainer.evaluate(reference: reference, test: test, linearProbe: linearProbe && trainer.isFinished)
                evaluations.append(report)
                metrics.write("evaluation", report)
                log(String(format: "epoch %d: kNN %.2f%% (raw pixels %.2f%%, random init %.2f%%), utilization %d/%d",
                           report.epoch, 100 * report.knn, 100 * report.knnRawPixels, 100 * report.knnRandomInit,
                           report.utilization, report.prototypes))
            }
            // Saved after the epoch's records: a run killed before this line redoes the epoch and
            // its records (a resume drops records past the checkpoint), one killed after it has them.
            try trainer.save(to: checkpointURL)
            stepStart = Date(); stepsTimed = 0
            try writePlots()
        }
        try writePlots()
        return Outcome(report: evaluations.last, interrupted: interrupted, diverged: diverged, seconds: Date().timeIntervalSince(start))
    }

    func log(_ s: String) { print(s); fflush(stdout) }

    func writePlots() throws {
        var smoothed: [(Double, Double)] = []
        var ema = losses.first?.1 ?? 0
        for (x, y) in losses where y.isFinite { ema = 0.95 * ema + 0.05 * y; smoothed.append((x, ema)) }
        try SVGPlot.lines(title: "\(name) training loss", xLabel: "step", series: [("loss (EMA 0.95)", smoothed)])
            .write(toFile: output + "/loss.svg", atomically: true, encoding: .utf8)
        if !evaluations.isEmpty {
            let e = evaluations.map { Double($0.epoch) }
            try SVGPlot.lines(title: "kNN accuracy (k = 20, T = 0.07)", xLabel: "epoch", series: [
                ("teacher", zip(e, evaluations.map { 100 * $0.knn }).map { ($0, $1) }),
                ("raw pixels", zip(e, evaluations.map { 100 * $0.knnRawPixels }).map { ($0, $1) }),
                ("random init", zip(e, evaluations.map { 100 * $0.knnRandomInit }).map { ($0, $1) }),
            ]).write(toFile: output + "/knn.svg", atomically: true, encoding: .utf8)
            try SVGPlot.lines(title: "prototype utilization (of \(trainer.configuration.prototypes))", xLabel: "epoch",
                              series: [("prototypes used", zip(e, evaluations.map { Double($0.utilization) }).map { ($0, $1) })])
                .write(toFile: output + "/utilization.svg", atomically: true, encoding: .utf8)
        }
        try SVGPlot.histogram(title: "prototype norms ‖w_k‖", xLabel: "‖w_k‖",
                              values: trainer.teacherHead.prototypeNorms.scalars(as: Double.self))
            .write(toFile: output + "/norms.svg", atomically: true, encoding: .utf8)
    }

    /// A short report of an evaluation.
    public static func describe(_ r: EvaluationReport, name: String, seconds: Double) -> String {
        var lines = [String(format: "%@ after %d epochs (%.1f min)", name, r.epoch, seconds / 60)]
        lines.append(String(format: "  kNN (k=20, T=0.07):  %.2f%%", 100 * r.knn))
        if let p = r.linearProbe { lines.append(String(format: "  linear probe:        %.2f%%", 100 * p)) }
        lines.append(String(format: "  baselines, same split: kNN on raw pixels %.2f%%, kNN on the random-init network %.2f%%",
                            100 * r.knnRawPixels, 100 * r.knnRandomInit))
        lines.append("  prototype utilization: \(r.utilization) of \(r.prototypes)")
        let n = r.prototypeNorms
        lines.append(String(format: "  ‖w_k‖: min %.3f, p10 %.3f, median %.3f, p90 %.3f, max %.3f", n.min, n.p10, n.median, n.p90, n.max))
        let q = zip(r.knnByNormQuartile, r.quartileCounts).map { $0.isNaN ? "–" : String(format: "%.1f%% (%d)", 100 * $0, $1) }
        lines.append("  kNN by norm quartile of the arg-max prototype (low → high): " + q.joined(separator: ", "))
        return lines.joined(separator: "\n")
    }
}
