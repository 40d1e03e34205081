import Foundation
import Kappa
import KappaNN

/// What one training step reports: where it was, the schedules' values, the loss with its
/// named terms and the objective's monitors. In `metrics.jsonl` the terms and monitors are
/// fields of the record beside the fixed ones, under their keys.
public struct StepLog: Encodable, Sendable {
    /// The epoch and the step over the run, both from 0 (`metrics.jsonl` writes the epoch
    /// from 1, as its epoch and evaluation records number the epoch they close).
    public let epoch: Int, step: Int
    /// The loss, and the schedules' values at this step.
    public let loss: Double, learningRate: Double, weightDecay: Double, teacherMomentum: Double
    /// The objective's terms and monitors (``ObjectiveOutput``).
    public let terms: [LoggedScalar], monitors: [LoggedScalar]

    /// A term's or monitor's value by key.
    public subscript(key: String) -> Double? { (terms + monitors).first { $0.key == key }?.value }

    struct Key: CodingKey {
        var stringValue: String
        init(_ s: String) { stringValue = s }
        init?(stringValue: String) { self.stringValue = stringValue }
        var intValue: Int? { nil }
        init?(intValue: Int) { nil }
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: Key.self)
        try c.encode(epoch + 1, forKey: Key("epoch"))   // epochs count from 1 in metrics.jsonl, as in epoch records
        try c.encode(step, forKey: Key("step"))
        try c.encode(loss, forKey: Key("loss"))
        try c.encode(learningRate, forKey: Key("learningRate"))
        try c.encode(weightDecay, forKey: Key("weightDecay"))
        try c.encode(teacherMomentum, forKey: Key("teacherMomentum"))
        for s in terms + monitors { try c.encode(s.value, forKey: Key(s.key)) }
    }
}

/// The one teacher–student training loop every method runs through: an objective
/// (``SelfSupervisedObjective``) turns a batch of views into a loss; the trainer does the rest
/// the same way for all of them, as DINO's `train_one_epoch` does:
///
/// 1. sets AdamW's learning rate (linear warmup, then cosine) and weight decay (cosine) for
///    the step;
/// 2. asks the objective for the loss; stops the run if it is NaN or infinite;
/// 3. back-propagates, clips each parameter's gradient, drops the head's last layer gradient
///    in the first epochs, and steps AdamW;
/// 4. moves the teacher towards the student (EMA, momentum on a cosine schedule).
///
/// With several processes (`Distributed.world`, `mpirun -np N`) it trains data-parallel,
/// as PyTorch's DistributedDataParallel: rank 0's initial weights are broadcast, each process
/// takes its shard of every global batch of N · `batchSize` images, gradients are averaged
/// over the processes (in buckets; optionally started while backward still runs) before clipping, BatchNorm is synchronized
/// (``DINOConfiguration/synchronizeBatchNorm``), the logged loss and monitors are the means
/// over the processes, and they agree on when to stop. The result equals one process's with
/// batch N · `batchSize` up to the order of floating-point sums.
///
/// Checkpoints (``RunCheckpoint``) save the networks, the optimizer, the objective's
/// ``SelfSupervisedObjective/state`` and the position; a resumed run ends bit-identical to an
/// uninterrupted one. Evaluation is ``Evaluator``'s; a whole run with its outputs is
/// ``TrainingSession``'s.
public final class TeacherStudentTrainer {
    /// The run's configuration.
    public let configuration: DINOConfiguration
    /// The method.
    public let objective: SelfSupervisedObjective
    /// The student and the EMA teacher.
    public let networks: TeacherStudentNetworks
    /// AdamW over the student (and the objective's module), in DINO's parameter groups.
    public let optimizer: AdamW
    /// The training images (nil for a trainer driven with ``step(_:)`` alone).
    public let train: ImageDataset?
    /// The position: epochs completed, steps taken.
    public internal(set) var epoch = 0, step = 0
    /// The generator left after the initialization; saved in checkpoints.
    public internal(set) var generator: RandomGenerator
    /// Steps per epoch.
    public let iterationsPerEpoch: Int
    /// The processes training together (`Distributed.size` when the trainer was made).
    public let processes: Int
    /// Images per step over all processes: ``processes`` × the configuration's batch size.
    public var globalBatchSize: Int { configuration.batchSize * processes }
    let lrSchedule: [Double], wdSchedule: [Double], momentumSchedule: [Double]
    /// With several processes: start each bucket's allreduce while backward runs, or (false,
    /// the default) average the buckets after backward with blocking allreduces, which was the
    /// faster on a machine whose cores all compute (see `GradientAverager`). The results are
    /// the same.
    public var overlapsGradientAveraging = false
    /// With several processes: the averager of the trained parameters' gradients (their
    /// tensors stay the same objects for the trainer's life; checkpoints load into them).
    let averager: GradientAverager?
    /// The trained parameters (student, head, the objective's module), clipped and averaged
    /// every step, and the teacher's and student's parameters of the EMA (backbone then head),
    /// collected once for the same reason.
    let trained: [(name: String, tensor: Tensor)]
    let emaTeacher: [(name: String, tensor: Tensor)], emaStudent: [(name: String, tensor: Tensor)]

    /// The student backbone.
    public var student: FeatureEncoder { networks.student }
    /// The teacher backbone.
    public var teacher: FeatureEncoder { networks.teacher }
    /// The student head.
    public var studentHead: DINOHead { networks.studentHead }
    /// The teacher head.
    public var teacherHead: DINOHead { networks.teacherHead }

    /// A trainer of `objective` (by default the configuration's ``DINOConfiguration/makeObjective()``)
    /// on `train`. Throws ``TrainerError`` when the data or the networks cannot serve.
    public convenience init(configuration c: DINOConfiguration, objective: SelfSupervisedObjective? = nil,
                            train: ImageDataset) throws {
        let global = c.batchSize * Distributed.size
        guard train.count >= global else {
            throw TrainerError("\(train.source): \(train.count) training images, fewer than a batch of \(global)"
                               + (Distributed.size > 1 ? " (\(Distributed.size) processes × \(c.batchSize))" : ""))
        }
        try c.check(train)
        try self.init(configuration: c, objective: objective, iterationsPerEpoch: train.count / global, train: train)
    }

    /// A trainer whose schedules assume `iterationsPerEpoch` steps per epoch, driven with
    /// ``step(_:)`` (the benchmark steps) or, with `train`, ``trainEpoch(onStep:shouldStop:)``.
    public init(configuration c: DINOConfiguration, objective: SelfSupervisedObjective? = nil, iterationsPerEpoch: Int,
                train: ImageDataset? = nil) throws {
        guard c.epochs >= 1, c.batchSize >= 1, iterationsPerEpoch >= 1, (0...c.epochs).contains(c.warmupEpochs) else {
            throw TrainerError("epochs \(c.epochs), batch \(c.batchSize), \(iterationsPerEpoch) steps per epoch, warmup \(c.warmupEpochs): need epochs, batch and steps of at least 1 and warmup in 0...epochs")
        }
        configuration = c
        self.train = train
        self.iterationsPerEpoch = iterationsPerEpoch
        processes = Distributed.size
        var g = RandomGenerator(seed: c.seed)
        let student = c.backbone.make(using: &g)
        let studentHead = DINOHead(inFeatures: student.featureCount, prototypes: c.prototypes, layers: c.headLayers, hidden: c.headHidden,
                                   bottleneck: c.bottleneck, batchNorm: c.headBatchNorm, normLastLayer: c.normalizedPrototypes, using: &g)
        var tg = RandomGenerator(seed: c.seed ^ 0x7EAC)
        let teacher = c.backbone.make(using: &tg)
        let teacherHead = DINOHead(inFeatures: teacher.featureCount, prototypes: c.prototypes, layers: c.headLayers, hidden: c.headHidden,
                                   bottleneck: c.bottleneck, batchNorm: c.headBatchNorm, normLastLayer: c.normalizedPrototypes, using: &tg)
        teacher.copyParameters(from: student)
        teacherHead.copyParameters(from: studentHead)
        networks = TeacherStudentNetworks(student: student, studentHead: studentHead, teacher: teacher, teacherHead: teacherHead)
        self.objective = objective ?? c.makeObjective()
        do { try self.objective.check(networks) } catch { throw TrainerError("\(error)") }
        emaStudent = student.namedParameters() + studentHead.namedParameters()
        emaTeacher = teacher.namedParameters() + teacherHead.namedParameters()
        trained = emaStudent + (self.objective.module?.namedParameters() ?? [])
        if processes > 1 {
            // Every process starts from rank 0's weights (they agree already: same seed).
            Distributed.broadcast(student.stateDict().map(\.tensor) + studentHead.stateDict().map(\.tensor)
                                  + teacher.stateDict().map(\.tensor) + teacherHead.stateDict().map(\.tensor)
                                  + (self.objective.module?.stateDict().map(\.tensor) ?? []))
            averager = GradientAverager(parameters: trained.map(\.tensor))
            let sync = c.synchronizeBatchNorm ?? true
            for m in [student, studentHead, teacher, teacherHead] as [Module] { m.synchronizeBatchNorm(sync) }
            self.objective.module?.synchronizeBatchNorm(sync)
        } else {
            averager = nil
        }
        let lr = c.baseLearningRate * Double(c.batchSize * processes) / 256
        optimizer = AdamW(groups: ParameterGroup.dinoGroups(student, learningRate: lr, weightDecay: c.weightDecay, prefix: "backbone.")
                          + ParameterGroup.dinoGroups(studentHead, learningRate: lr, weightDecay: c.weightDecay,
                                                      decayPrototypeScale: c.decayPrototypeScale, prefix: "head.")
                          + (self.objective.module.map {
                              ParameterGroup.dinoGroups($0, learningRate: lr, weightDecay: c.weightDecay, prefix: "objective.")
                          } ?? []))
        lrSchedule = Schedule.cosine(base: lr, final: c.minLearningRate, epochs: c.epochs, iterationsPerEpoch: iterationsPerEpoch,
                                     warmupEpochs: c.warmupEpochs)
        wdSchedule = Schedule.cosine(base: c.weightDecay, final: c.weightDecayEnd, epochs: c.epochs, iterationsPerEpoch: iterationsPerEpoch)
        momentumSchedule = Schedule.cosine(base: c.teacherMomentum, final: c.teacherMomentumEnd ?? 1, epochs: c.epochs,
                                           iterationsPerEpoch: iterationsPerEpoch)
        generator = g
    }

    /// Whether all epochs are done.
    public var isFinished: Bool { epoch >= configuration.epochs }

    /// The total number of steps of the run.
    public var totalSteps: Int { configuration.epochs * iterationsPerEpoch }

    /// One training step on `batch` at the current position (schedules past the run's end keep
    /// their last value). Returns the step's log; when the loss is not finite nothing is
    /// updated, the position stays, and the log says so (`loss` NaN or infinite).
    @discardableResult
    public func step(_ batch: ObjectiveBatch) -> StepLog {
        let c = configuration
        let it = Swift.min(step, lrSchedule.count - 1)
        optimizer.setSchedule(learningRate: lrSchedule[it], weightDecay: wdSchedule[it])
        let context = StepContext(epoch: epoch, step: step, epochs: c.epochs, iterationsPerEpoch: iterationsPerEpoch, seed: c.seed,
                                  firstSample: Distributed.rank * batch.views[0].shape[0])
        let out = objective(batch, networks: networks, context: context)
        var value = out.loss.item()
        var (terms, monitors) = (out.terms, out.monitors)
        if processes > 1 {
            // The means over the processes: what one process with the whole batch would log,
            // and one decision on a non-finite loss for all.
            var values = [value] + terms.map(\.value) + monitors.map(\.value)
            Distributed.allReduce(&values)
            let mean = values.map { $0 / Double(processes) }
            value = mean[0]
            terms = zip(terms, mean[1...]).map { LoggedScalar($0.key, label: $0.label, $1, format: $0.format) }
            monitors = zip(monitors, mean[(1 + terms.count)...]).map { LoggedScalar($0.key, label: $0.label, $1, format: $0.format) }
        }
        let log = StepLog(epoch: epoch, step: step, loss: value, learningRate: lrSchedule[it], weightDecay: wdSchedule[it],
                          teacherMomentum: momentumSchedule[it], terms: terms, monitors: monitors)
        guard value.isFinite else { return log }
        optimizer.zeroGrad()
        if let averager {
            // With the overlap, each bucket's allreduce starts as soon as backward has completed its gradients.
            out.loss.backward(onGradientReady: overlapsGradientAveraging ? averager.gradientReady : nil)
            averager.finish()
        } else {
            out.loss.backward()
        }
        if c.clipGradient > 0 { Gradients.clipPerParameter(parameters: trained, maxNorm: c.clipGradient) }
        if epoch < c.freezeLastLayerEpochs { networks.studentHead.cancelLastLayerGradients() }
        optimizer.step()
        emaUpdate(teacherParameters: emaTeacher, studentParameters: emaStudent, momentum: momentumSchedule[it])
        step += 1
        return log
    }

    /// Runs the rest of the current epoch on ``train``; `onStep` sees every step, `shouldStop`
    /// is asked before each (Ctrl-C). Returns false when stopped early or when the loss became
    /// NaN (the last log `onStep` saw has the non-finite loss). Does nothing once the run
    /// ``isFinished``.
    @discardableResult
    public func trainEpoch(onStep: (StepLog) -> Void = { _ in }, shouldStop: () -> Bool = { false }) -> Bool {
        guard let train else { preconditionFailure("trainEpoch: this trainer was made without training images") }
        guard !isFinished else { return true }
        let c = configuration
        let loader = MultiCropLoader(dataset: train, augmentation: c.augmentation, batchSize: c.batchSize, seed: c.seed, epoch: epoch,
                                     shard: (Distributed.rank, processes))
        defer { loader.stop() }
        // A resumed run skips the batches this epoch already trained on.
        let done = step - epoch * iterationsPerEpoch
        for _ in 0..<done { _ = loader.next() }
        networks.student.train(); networks.studentHead.train(); objective.module?.train()
        while let batch = loader.next() {
            var stop = [shouldStop() ? 1.0 : 0]
            if processes > 1 { Distributed.allReduce(&stop, .max) }   // one process's Ctrl-C stops all
            if stop[0] > 0 { return false }
            let log = step(ObjectiveBatch(views: batch.views, globalCount: 2, labels: batch.labels))
            onStep(log)
            if !log.loss.isFinite { return false }
        }
        epoch += 1
        return true
    }
}

/// Why a trainer cannot be made as configured.
public struct TrainerError: Error, CustomStringConvertible, Equatable {
    /// What cannot be made.
    public let problem: String
    /// An error saying `problem`.
    public init(_ problem: String) { self.problem = problem }
    public var description: String { problem }
}
