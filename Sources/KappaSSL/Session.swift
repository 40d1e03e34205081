import Foundation
import Kappa
import KappaNN

/// A whole training run with its outputs: progress on the terminal (plain log lines when
/// not a terminal), `metrics.jsonl`, SVG plots, `checkpoint.safetensors` after every epoch
/// and when stopped, evaluation every `evaluateEvery` epochs and at the end.
///
/// With several processes (`Distributed.world`) every process runs the session (training
/// and evaluation are collective) and only rank 0 prints and writes files; each process reads
/// the checkpoint it resumes from, so the output folder must be visible to all of them (a
/// shared filesystem, or the same path on one machine).
public final class TrainingSession {
    /// The run.
    public let trainer: TeacherStudentTrainer
    /// Its evaluation splits.
    public let evaluator: Evaluator
    /// The output folder.
    public let output: String
    /// Evaluate every this many epochs (and after the last); default ``defaultEvaluateEvery``.
    public var evaluateEvery = TrainingSession.defaultEvaluateEvery
    /// 2: in the default run a kNN evaluation takes about 4 s against about 22 s per epoch
    /// (the first, which also computes the two baselines once, about 11 s), so evaluating
    /// every second epoch costs under 10% of the run (every epoch would cost about 16%) and
    /// gives the kNN curve five points.
    public static let defaultEvaluateEvery = 2
    /// Run the linear probe in the final evaluation.
    public var linearProbe = true
    /// The name on the plots and in the report.
    public var name = "DINO-vMF"
    /// Resuming may lengthen the run: the checkpoint's configuration may have fewer epochs.
    public var allowsLongerRun = false
    /// Asked before every step; when it returns true the session saves a checkpoint and
    /// stops (a command sets it from its Ctrl-C handler).
    public var shouldStop: () -> Bool = { false }
    var losses: [(Double, Double)] = []
    var evaluations: [EvaluationReport] = []

    /// What a run ended with.
    public struct Outcome {
        /// The last evaluation.
        public let report: EvaluationReport?
        /// Whether ``shouldStop`` stopped the run (a checkpoint was saved).
        public let interrupted: Bool
        /// Whether the loss became NaN or infinite.
        public let diverged: Bool
        /// Wall-clock time of this call.
        public let seconds: Double
    }

    /// A session writing to `output`.
    public init(trainer: TeacherStudentTrainer, evaluator: Evaluator, output: String) {
        (self.trainer, self.evaluator, self.output) = (trainer, evaluator, output)
    }

    /// `checkpoint.safetensors` in the output folder.
    public var checkpointURL: URL { URL(fileURLWithPath: output).appendingPathComponent("checkpoint.safetensors") }

    /// Trains to the end (or to Ctrl-C), resuming from the output folder's checkpoint when `resume`.
    public func run(resume: Bool = false) throws -> Outcome {
        guard evaluateEvery >= 1 else { throw TrainerError("evaluateEvery must be at least 1, not \(evaluateEvery)") }
        let main = Distributed.isMain
        if main { try FileManager.default.createDirectory(atPath: output, withIntermediateDirectories: true) }
        if resume {
            guard FileManager.default.fileExists(atPath: checkpointURL.path) else {
                throw CheckpointError(path: checkpointURL.path, problem: "no checkpoint to resume from")
            }
            try RunCheckpoint.restore(trainer, from: checkpointURL, allowingLongerRun: allowsLongerRun)
            log("resumed at epoch \(trainer.epoch), step \(trainer.step)")
        }
        let metrics = main ? try MetricsLog(path: output + "/metrics.jsonl",
                                            resumingAt: resume ? (step: trainer.step, epoch: trainer.epoch) : nil) : nil
        tensorBoard = main ? try TensorBoardLog(folder: output) : nil
        var resumedMeans = restore(from: metrics?.keptRecords ?? [])
        if resume && trainer.isFinished {
            log("the run in \(output) has finished its \(trainer.configuration.epochs) epochs: nothing to resume (--extend with a larger --epochs continues it)")
            return Outcome(report: evaluations.last, interrupted: false, diverged: false, seconds: 0)
        }
        let start = Date()
        let c = trainer.configuration
        let total = trainer.totalSteps
        let terminal = main && isatty(STDOUT_FILENO) != 0
        var diverged = false, interrupted = false
        var stepStart = Date(), stepsTimed = 0
        while !trainer.isFinished {
            var epochMeans = resumedMeans
            resumedMeans = EpochMeans()
            let completed = trainer.trainEpoch(onStep: { s in
                metrics?.write("step", s)
                tensorBoard?.scalars([("train/loss", s.loss), ("train/learningRate", s.learningRate), ("train/weightDecay", s.weightDecay),
                                      ("train/teacherMomentum", s.teacherMomentum)] + (s.terms + s.monitors).map { ("train/" + $0.key, $0.value) },
                                     step: s.step)
                losses.append((Double(s.step), s.loss))
                if !s.loss.isFinite { diverged = true }
                epochMeans.add(s)
                stepsTimed += 1
                let rate = Date().timeIntervalSince(stepStart) / Double(stepsTimed)
                let eta = Int(rate * Double(total - s.step - 1))
                let line = String(format: "epoch %d/%d step %d/%d  ETA %d:%02d  loss %.4f", s.epoch + 1, c.epochs, s.step + 1, total,
                                  eta / 60, eta % 60, s.loss)
                    + s.terms.map { "  \($0.label) " + String(format: $0.format, $0.value) }.joined()
                    + String(format: "  lr %.2e", s.learningRate)
                    + s.monitors.map { "  \($0.label) " + String(format: $0.format, $0.value) }.joined()
                if terminal {
                    print("\r" + line, terminator: "")
                    fflush(stdout)
                } else if main && s.step % 50 == 0 {
                    print(line)
                    fflush(stdout)
                }
            }, shouldStop: shouldStop)
            if terminal { print("") }
            if diverged {
                log("the loss became NaN or infinite at step \(trainer.step); stopping")
                break
            }
            if !completed {
                interrupted = true
                log("interrupted at epoch \(trainer.epoch), step \(trainer.step): saving \(checkpointURL.path)")
                if main { try RunCheckpoint.save(trainer, to: checkpointURL) }
                break
            }
            let epochRecord = epochMeans.record(epoch: trainer.epoch)
            metrics?.write("epoch", epochRecord)
            writeEpoch(epochRecord)
            if trainer.epoch % evaluateEvery == 0 || trainer.isFinished {
                let evaluationStart = Date()
                let report = evaluator.evaluate(trainer, linearProbe: linearProbe && trainer.isFinished)
                evaluations.append(report)
                metrics?.write("evaluation", report)
                writeEvaluation(report)
                log(String(format: "epoch %d: kNN %.2f%% (raw pixels %.2f%%, random init %.2f%%), utilization %d/%d  [evaluation %.1f s]",
                           report.epoch, 100 * report.knn, 100 * report.knnRawPixels, 100 * report.knnRandomInit,
                           report.utilization, report.prototypes, Date().timeIntervalSince(evaluationStart)))
            }
            // Saved after the epoch's records: a run killed before this line redoes the epoch and
            // its records (a resume drops records past the checkpoint), one killed after it has them.
            if main { try RunCheckpoint.save(trainer, to: checkpointURL) }
            stepStart = Date(); stepsTimed = 0
            if main { try writePlots() }
        }
        if main { try writePlots() }
        return Outcome(report: evaluations.last, interrupted: interrupted, diverged: diverged, seconds: Date().timeIntervalSince(start))
    }

    /// A line on rank 0's standard output.
    func log(_ s: String) {
        guard Distributed.isMain else { return }
        print(s); fflush(stdout)
    }

    /// The run's TensorBoard event file (rewritten from the kept log on resume).
    var tensorBoard: TensorBoardLog?

    /// An epoch record's means, as TensorBoard scalars `epoch/<key>` at the epoch.
    func writeEpoch(_ record: [String: Double]) {
        guard let epoch = record["epoch"] else { return }
        tensorBoard?.scalars(record.filter { $0.key != "epoch" }.sorted { $0.key < $1.key }.map { ("epoch/" + $0.key, $0.value) }, step: Int(epoch))
    }

    /// An evaluation as TensorBoard scalars and histograms at its epoch.
    func writeEvaluation(_ r: EvaluationReport) {
        guard let tb = tensorBoard else { return }
        var values = [("eval/knn", r.knn), ("eval/knnRawPixels", r.knnRawPixels), ("eval/knnRandomInit", r.knnRandomInit),
                      ("eval/utilization", Double(r.utilization)), ("eval/prototypeNormMedian", r.prototypeNorms.median)]
        if let p = r.linearProbe { values.append(("eval/linearProbe", p)) }
        tb.scalars(values, step: r.epoch)
        if let norms = r.prototypeNormValues { tb.histogram("eval/prototypeNorms", values: norms, step: r.epoch) }
        if let counts = r.assignmentCounts, !counts.isEmpty {
            // The teacher's assignment: how many evaluation images each prototype (by index) wins.
            tb.histogram("eval/prototypeAssignment", min: 0, max: Double(counts.count), limits: (1...counts.count).map(Double.init),
                         counts: counts.map(Double.init), sum: zip(counts.indices, counts).reduce(0) { $0 + Double($1.0 * $1.1) },
                         sumSquares: zip(counts.indices, counts).reduce(0) { $0 + Double($1.0 * $1.0 * $1.1) }, step: r.epoch)
        }
    }

    /// The means of an epoch's steps: the loss, its terms and the monitors, by key.
    struct EpochMeans {
        var sums: [String: Double] = [:]
        var n = 0.0
        mutating func add(_ values: [(String, Double)]) {
            for (k, v) in values { sums[k, default: 0] += v }
            n += 1
        }
        mutating func add(_ s: StepLog) {
            add([("loss", s.loss)] + (s.terms + s.monitors).map { ($0.key, $0.value) })
        }
        func record(epoch: Int) -> [String: Double] {
            var r: [String: Double] = ["epoch": Double(epoch)]
            for (k, s) in sums { r[k] = s / Swift.max(n, 1) }
            return r
        }
    }

    /// The step records' fields that are not the loss, a term or a monitor.
    static let scheduleKeys: Set<String> = ["kind", "epoch", "step", "learningRate", "weightDecay", "teacherMomentum"]

    /// What a resumed run takes over from the log it continues: the loss curve, the
    /// evaluations, and the sums of the current epoch's steps before the checkpoint, so that its
    /// epoch record and plots equal an uninterrupted run's.
    func restore(from records: [Data]) -> EpochMeans {
        var means = EpochMeans()
        let decoder = JSONDecoder()
        decoder.nonConformingFloatDecodingStrategy = .convertFromString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        /// A field of a record: a number (the log writes NaN and infinities as strings) or anything else.
        struct Field: Decodable {
            let number: Double?
            init(from decoder: Decoder) throws {
                let c = try decoder.singleValueContainer()
                if c.decodeNil() { number = .nan; return }   // a non-finite number
                if let d = try? c.decode(Double.self) { number = d; return }
                let s = try? c.decode(String.self)
                number = s == "nan" ? .nan : s == "inf" ? .infinity : s == "-inf" ? -.infinity : nil
            }
        }
        struct Kind: Decodable { let kind: String }
        for data in records {
            // JSONDecoder reads numbers back exactly as they were written.
            guard let kind = try? decoder.decode(Kind.self, from: data).kind else { continue }
            switch kind {
            case "step":
                guard let fields = try? decoder.decode([String: Field].self, from: data),
                      let step = fields["step"]?.number, let epoch = fields["epoch"]?.number, let loss = fields["loss"]?.number else { continue }
                losses.append((step, loss))
                tensorBoard?.scalars(fields.filter { !["kind", "epoch", "step"].contains($0.key) }.sorted { $0.key < $1.key }
                                        .compactMap { k, v in v.number.map { ("train/" + k, $0) } }, step: Int(step))
                if Int(epoch) == trainer.epoch + 1 {   // step records number epochs from 1
                    means.add(fields.filter { !Self.scheduleKeys.contains($0.key) }.compactMap { k, v in v.number.map { (k, $0) } })
                }
            case "evaluation":
                if let report = try? decoder.decode(EvaluationReport.self, from: data) {
                    evaluations.append(report)
                    writeEvaluation(report)
                }
            case "epoch":
                if let fields = try? decoder.decode([String: Field].self, from: data) {
                    writeEpoch(fields.filter { $0.key != "kind" }.compactMapValues(\.number))
                }
            default:
                break
            }
        }
        return means
    }


    /// The command line that reproduces the run, for `report.html` (set by the command).
    public var command: String?

    /// The run so far, as the plots and the report draw it.
    public var record: RunRecord { RunRecord(name: name, losses: losses.map { (step: $0.0, loss: $0.1) }, evaluations: evaluations,
                                      prototypes: trainer.configuration.prototypes) }

    func writePlots() throws {
        let r = record
        let norms = trainer.teacherHead.prototypeNorms.scalars(as: Double.self)
        try RunPlots.loss([r], title: "\(name) training loss").write(toFile: output + "/loss.svg", atomically: true, encoding: .utf8)
        try RunPlots.knn([r]).write(toFile: output + "/knn.svg", atomically: true, encoding: .utf8)
        try RunPlots.utilization([r]).write(toFile: output + "/utilization.svg", atomically: true, encoding: .utf8)
        try RunPlots.norms(norms).write(toFile: output + "/norms.svg", atomically: true, encoding: .utf8)
        try HTMLReport.run(r, configuration: trainer.configuration, command: command, norms: norms)
            .write(toFile: output + "/report.html", atomically: true, encoding: .utf8)
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
        let q = zip(r.knnByNormQuartile, r.quartileCounts).map { a, n in a.map { String(format: "%.1f%% (%d)", 100 * $0, n) } ?? "–" }
        lines.append("  kNN by norm quartile of the arg-max prototype (low → high): " + q.joined(separator: ", "))
        return lines.joined(separator: "\n")
    }
}
