import Foundation
import Kappa
import KappaNN

/// A teacher–student run in one safetensors file: student and teacher (`backbone.*`,
/// `head.*`), AdamW's moments, the objective's ``SelfSupervisedObjective/state`` (`extra.*`),
/// the position and generator, and the configuration as JSON metadata. Written atomically.
public enum RunCheckpoint {
    /// The metadata key of the configuration inside ``TrainingState/configuration``.
    static let configurationKey = "dino"
    /// The metadata key of the objective's type name.
    static let objectiveKey = "objective"

    /// The objective's description when it has one (it should name its own settings), else its type.
    /// The metadata key of the training data's identity.
    static let dataKey = "data"
    /// The metadata key of the number of processes that wrote the run (absent: 1). The
    /// configuration's batch size is per process; the run is defined by the whole batch.
    static let processesKey = "processes"

    /// What a trainer trains on: its source and the number of images.
    static func dataIdentity(_ d: ImageDataset?) -> String? {
        d.map { "\($0.source), \($0.count) images of \($0.channels)×\($0.height)×\($0.width)" }
    }

    static func objectiveName(_ o: SelfSupervisedObjective) -> String {
        (o as? CustomStringConvertible)?.description ?? String(describing: type(of: o))
    }

    /// Saves the whole run.
    public static func save(_ trainer: TeacherStudentTrainer, to url: URL) throws {
        let config = String(decoding: try JSONEncoder().encode(trainer.configuration), as: UTF8.self)
        let n = trainer.networks
        try TrainingCheckpoint.save(to: url, student: StudentTeacherPair(n.student, n.studentHead, trainer.objective.module),
                                    teacher: StudentTeacherPair(n.teacher, n.teacherHead), optimizer: trainer.optimizer,
                                    extra: trainer.objective.state,
                                    state: TrainingState(step: trainer.step, epoch: trainer.epoch, generator: trainer.generator,
                                                         configuration: [configurationKey: config,
                                                                         objectiveKey: objectiveName(trainer.objective),
                                                         processesKey: String(trainer.processes)]
                                                             .merging(dataIdentity(trainer.train).map { [dataKey: $0] } ?? [:]) { a, _ in a }))
    }

    /// Restores a run saved by ``save(_:to:)`` into a trainer made with the same
    /// configuration, objective and (with `checkingData`, when both know it) training data, all
    /// checked. Throws `CheckpointError` (KappaNN's `FileError`) naming the file and the problem;
    /// the trainer is only changed when everything fits.
    /// With `allowingLongerRun` the trainer's configuration may differ in its epochs, if it
    /// has more (a run extended past its end: the schedules become the longer run's).
    /// A run written by N processes resumes with any other number M whose batch size per
    /// process makes the same whole batch (N · B = M · B′): the batch size is compared as that
    /// product.
    public static func restore(_ trainer: TeacherStudentTrainer, from url: URL, checkingData: Bool = true,
                               allowingLongerRun: Bool = false) throws {
        // One read and one decoding of the metadata for every check; nothing is loaded before they pass.
        let (tensors, meta) = try SafeTensors.read(url)
        var (stored, saved) = try storedConfiguration(meta, url)
        let mine = trainer.configuration
        if saved.batchSize * processes(stored) == mine.batchSize * trainer.processes { saved.batchSize = mine.batchSize }
        if saved != mine {
            var lengthened = saved
            lengthened.epochs = mine.epochs
            guard allowingLongerRun && lengthened == mine else {
                let hint = lengthened == mine ? "; a run goes on for more epochs with --extend" : ""
                throw CheckpointError(path: url.path, problem: "it was written by a run with another configuration (\(difference(saved, mine)))\(hint)")
            }
            guard mine.epochs > saved.epochs else {
                throw CheckpointError(path: url.path, problem: "the run has \(saved.epochs) epochs; extending needs more, not \(mine.epochs)")
            }
        }
        let n = trainer.networks
        if let savedObjective = stored.configuration[objectiveKey], savedObjective != objectiveName(trainer.objective) {
            throw CheckpointError(path: url.path, problem: "it was written by a run of \(savedObjective), not \(objectiveName(trainer.objective))")
        }
        if checkingData, let savedData = stored.configuration[dataKey], let data = dataIdentity(trainer.train), savedData != data {
            throw CheckpointError(path: url.path, problem: "it was trained on \(savedData), not on \(data)")
        }
        var extra: [String: Tensor] = [:]
        for (name, t) in tensors where name.hasPrefix("extra.") { extra[String(name.dropFirst(6))] = t }
        for (name, t) in trainer.objective.state {
            guard let s = extra[name], s.shape == t.shape, s.dtype == t.dtype else {
                throw CheckpointError(path: url.path, problem: "the objective's state '\(name)' (\(t.shape) \(t.dtype)) is missing or of another shape")
            }
        }
        let (state, loaded) = try TrainingCheckpoint.load(from: url, student: StudentTeacherPair(n.student, n.studentHead, trainer.objective.module),
                                                          teacher: StudentTeacherPair(n.teacher, n.teacherHead), optimizer: trainer.optimizer)
        do { try trainer.objective.loadState(loaded) } catch { throw CheckpointError(path: url.path, problem: "\(error)") }
        (trainer.step, trainer.epoch, trainer.generator) = (state.step, state.epoch, state.generator)
    }

    /// Reads the configuration stored in a checkpoint written by ``save(_:to:)``, with the
    /// batch size per process that makes the run's whole batch with `processes` processes
    /// (by default `Distributed.size`); throws when the whole batch does not divide.
    public static func configuration(in url: URL, processes: Int = Distributed.size) throws -> DINOConfiguration {
        let (state, c) = try storedConfiguration(try SafeTensors.read(url).metadata, url)
        var config = c
        let whole = c.batchSize * Self.processes(state)
        guard whole % processes == 0 else {
            throw CheckpointError(path: url.path, problem: "the run's batch of \(whole) images does not split over \(processes) processes")
        }
        config.batchSize = whole / processes
        return config
    }

    /// The number of processes that wrote a checkpoint.
    static func processes(_ state: TrainingState) -> Int {
        state.configuration[processesKey].flatMap { Int($0) }.map { Swift.max(1, $0) } ?? 1
    }

    /// The training state and the configuration in a checkpoint's metadata.
    static func storedConfiguration(_ meta: [String: String], _ url: URL) throws -> (state: TrainingState, configuration: DINOConfiguration) {
        guard let json = meta["kappa.training_state"],
              let state = try? JSONDecoder().decode(TrainingState.self, from: Data(json.utf8)),
              let config = state.configuration[configurationKey] else {
            throw CheckpointError(path: url.path, problem: "not a DINOvMF checkpoint (no configuration in the metadata)")
        }
        do {
            return (state, try JSONDecoder().decode(DINOConfiguration.self, from: Data(config.utf8)))
        } catch {
            throw CheckpointError(path: url.path, problem: "its configuration cannot be read by this version of Kappa (\(error))")
        }
    }

    /// The top-level fields in which two configurations differ, for error messages.
    static func difference(_ a: DINOConfiguration, _ b: DINOConfiguration) -> String {
        func fields(_ c: DINOConfiguration) -> [String: String] {
            guard let data = try? JSONEncoder().encode(c),
                  let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else { return [:] }
            var out: [String: String] = [:]
            for (k, v) in object {
                let d = (try? JSONSerialization.data(withJSONObject: v, options: [.sortedKeys, .fragmentsAllowed])) ?? Data()
                out[k] = String(decoding: d, as: UTF8.self)
            }
            return out
        }
        let (fa, fb) = (fields(a), fields(b))
        let keys = Set(fa.keys).union(fb.keys).filter { fa[$0] != fb[$0] }.sorted()
        return keys.isEmpty ? "unknown difference" : "differs in " + keys.joined(separator: ", ")
    }
}

/// A backbone and its head (and the objective's own module) as one module, named
/// `backbone.*`, `head.*` and `objective.*` in checkpoints.
final class StudentTeacherPair: Module {
    let backbone: Module, head: DINOHead
    let objective: Module?
    init(_ backbone: Module, _ head: DINOHead, _ objective: Module? = nil) {
        (self.backbone, self.head, self.objective) = (backbone, head, objective)
        super.init()
    }
}
