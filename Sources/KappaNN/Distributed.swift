import Foundation
import Kappa

/// How a collective combines the values of the processes.
public enum ReduceOperation: Sendable, Equatable {
    /// Elementwise sum.
    case sum
    /// Elementwise maximum.
    case max
}

/// The processes of one data-parallel run and the collectives training needs (PyTorch's
/// `ProcessGroup`): every process calls the same collectives in the same order. Kappa keeps
/// no transport of its own: `KappaMPI`'s `MPICommunicator` runs these over MPI, and
/// ``SingleProcess`` is the group of one. Errors are thrown, naming the call.
public protocol Communicator: AnyObject {
    /// This process's index, 0..<``size``.
    var rank: Int { get }
    /// The number of processes.
    var size: Int { get }
    /// Combines `values` elementwise over all processes, in place, in every process.
    func allReduce(_ values: UnsafeMutableBufferPointer<Float>, _ operation: ReduceOperation) throws
    /// Combines `values` elementwise over all processes, in place, in every process.
    func allReduce(_ values: UnsafeMutableBufferPointer<Double>, _ operation: ReduceOperation) throws
    /// Overwrites `bytes` in every process with process `root`'s.
    func broadcast(_ bytes: UnsafeMutableRawBufferPointer, root: Int) throws
    /// Every process's `bytes` (all of one length), concatenated in rank order into `result`
    /// (``size`` times as long), in every process.
    func allGather(_ bytes: UnsafeRawBufferPointer, into result: UnsafeMutableRawBufferPointer) throws
    /// Starts summing `values` over all processes in place and returns at once; the values
    /// may be read only after the returned reduction's ``PendingReduction/wait()``. The
    /// default runs the blocking `allReduce` and returns a completed reduction.
    func startAllReduce(_ values: UnsafeMutableBufferPointer<Float>) throws -> PendingReduction
    /// Waits until every process has called it.
    func barrier() throws
    /// Ends every process of the run with `message` (a collective that failed where no error
    /// can be thrown: the others would wait for this process forever).
    func abort(_ message: String) -> Never
}

/// A collective started by ``Communicator/startAllReduce(_:)`` that may still be running.
public protocol PendingReduction: AnyObject {
    /// Lets the collective progress without waiting (MPI progresses nonblocking collectives
    /// only inside MPI calls); true once it has completed.
    func test() throws -> Bool
    /// Waits for the collective to complete.
    func wait() throws
}

/// A reduction that completed when it was started.
final class CompletedReduction: PendingReduction {
    func test() throws -> Bool { true }
    func wait() throws {}
}

extension Communicator {
    public func startAllReduce(_ values: UnsafeMutableBufferPointer<Float>) throws -> PendingReduction {
        try allReduce(values, .sum)
        return CompletedReduction()
    }
}

/// The group of one process: every collective leaves the values as they are.
public final class SingleProcess: Communicator {
    /// The group of this process alone.
    public init() {}
    public var rank: Int { 0 }
    public var size: Int { 1 }
    public func allReduce(_ values: UnsafeMutableBufferPointer<Float>, _ operation: ReduceOperation) throws {}
    public func allReduce(_ values: UnsafeMutableBufferPointer<Double>, _ operation: ReduceOperation) throws {}
    public func broadcast(_ bytes: UnsafeMutableRawBufferPointer, root: Int) throws {
        precondition(root == 0, "broadcast: root \(root) in a group of one process")
    }
    public func allGather(_ bytes: UnsafeRawBufferPointer, into result: UnsafeMutableRawBufferPointer) throws {
        precondition(result.count == bytes.count, "allGather: \(result.count) bytes of result for \(bytes.count) bytes from one process")
        if let base = bytes.baseAddress, bytes.count > 0 { result.baseAddress!.copyMemory(from: base, byteCount: bytes.count) }
    }
    public func barrier() throws {}
    public func abort(_ message: String) -> Never {
        FileHandle.standardError.write(Data((message + "\n").utf8))
        exit(1)
    }
}

/// The run's process group and the data-parallel operations built on it, as
/// `torch.distributed`'s default group: a program that runs under `mpirun` sets ``world``
/// once at start-up (`KappaMPI`); everything else reads it. With the default
/// ``SingleProcess`` every operation here is the identity, so single-process code pays
/// nothing.
///
/// What reads it: ``BatchNorm`` with ``BatchNorm/synchronized`` (SyncBatchNorm), KappaSSL's
/// trainer (sharded batches, averaged gradients, averaged logs, one stop decision), the
/// centers and Sinkhorn–Knopp (batch statistics over all processes) and the evaluation
/// (features computed in shards).
///
/// The tensor helpers are for code that cannot throw (an op's VJP, a loss): when a
/// collective fails they end every process through ``Communicator/abort(_:)`` with the error,
/// rather than leave the others waiting.
public enum Distributed {
    /// The group of the run's processes (``SingleProcess`` unless a program set another).
    nonisolated(unsafe) public static var world: Communicator = SingleProcess()

    /// This process's rank in ``world``.
    public static var rank: Int { world.rank }
    /// The number of processes in ``world``.
    public static var size: Int { world.size }
    /// Whether this is rank 0, the process that prints and writes files.
    public static var isMain: Bool { world.rank == 0 }

    /// Runs a collective, ending the run on failure (see the type's discussion).
    static func must(_ body: () throws -> Void) {
        do { try body() } catch { world.abort("error: rank \(world.rank) of \(world.size): \(error)") }
    }

    /// Sums `values` elementwise over all processes, in place.
    public static func allReduce(_ values: inout [Double], _ operation: ReduceOperation = .sum) {
        guard size > 1 else { return }
        values.withUnsafeMutableBufferPointer { p in must { try world.allReduce(p, operation) } }
    }

    /// Adds `values` elementwise over all processes, in place (for `Tensor.batchNorm` and
    /// other kernels that take a synchronizing function).
    public static func sum(_ values: UnsafeMutableBufferPointer<Double>) {
        guard size > 1 else { return }
        must { try world.allReduce(values, .sum) }
    }

    /// The elementwise sum of `t` over all processes (a new tensor, not recorded).
    public static func allReduceSum(_ t: Tensor) -> Tensor {
        guard size > 1 else { return t }
        let out = withoutGradients { t.contiguous().copied() }
        switch out.dtype {
        case .float32: out.withMutableScalars(as: Float.self) { p in must { try world.allReduce(p, .sum) } }
        case .float64: out.withMutableScalars(as: Double.self) { p in must { try world.allReduce(p, .sum) } }
        }
        return out
    }

    /// The elementwise mean of `t` over all processes (a new tensor, not recorded).
    public static func allReduceMean(_ t: Tensor) -> Tensor {
        guard size > 1 else { return t }
        return withoutGradients { allReduceSum(t) / Double(size) }
    }

    /// Every process's `t` (all of one shape [n, …]) concatenated along axis 0 in rank order.
    public static func allGather(_ t: Tensor) -> Tensor {
        guard size > 1 else { return t }
        let out = Tensor.zeros([t.shape[0] * size] + t.shape.dropFirst(), dtype: t.dtype)
        func gather<T: TensorScalar>(_: T.Type) {
            t.withScalars(as: T.self) { src in   // copies a non-contiguous t
                out.withMutableScalars(as: T.self) { dst in
                    must { try world.allGather(UnsafeRawBufferPointer(src), into: UnsafeMutableRawBufferPointer(dst)) }
                }
            }
        }
        switch t.dtype {
        case .float32: gather(Float.self)
        case .float64: gather(Double.self)
        }
        return out
    }

    /// Overwrites `tensors` (leaves, contiguous) in every process with rank `root`'s: the
    /// initial weights of a run, so that every process starts from the same ones.
    public static func broadcast(_ tensors: [Tensor], root: Int = 0) {
        guard size > 1 else { return }
        for t in tensors {
            switch t.dtype {
            case .float32: t.withMutableScalars(as: Float.self) { p in must { try world.broadcast(UnsafeMutableRawBufferPointer(p), root: root) } }
            case .float64: t.withMutableScalars(as: Double.self) { p in must { try world.broadcast(UnsafeMutableRawBufferPointer(p), root: root) } }
            }
        }
    }

    /// Replaces the gradient of each of `parameters` with its mean over all processes (what
    /// PyTorch's DistributedDataParallel does after backward), in buckets of about
    /// `bucketBytes`, one allreduce each (``GradientAverager`` without the overlap). A parameter
    /// without a gradient must have none in every process (the processes run the same graph).
    public static func averageGradients(of parameters: [Tensor], bucketBytes: Int = 4 << 20) {
        guard size > 1 else { return }
        GradientAverager(parameters: parameters, bucketBytes: bucketBytes).finish()
    }
}

/// Averages the gradients of `parameters` over the processes of ``Distributed/world`` while
/// backward runs, as PyTorch's DistributedDataParallel: the parameters are packed into buckets
/// of about `bucketBytes` in reverse order (backward reaches the last layers first); when every
/// gradient of a bucket is complete (`Tensor.backward`'s `onGradientReady`), the bucket's
/// allreduce starts, nonblocking, and the rest of backward goes on. ``finish()`` reduces the
/// buckets left (all of them when backward ran without the hook), waits for the others and
/// sets each gradient to its mean. Every process must run the same graph, so that the buckets
/// start in the same order everywhere.
///
/// Whether the overlap pays depends on the MPI and the machine: Open MPI progresses a
/// nonblocking allreduce only inside MPI calls (the averager tests the reductions under way at
/// every gradient), and its nonblocking allreduce is slower than its blocking one. On this
/// project's two-core machine, where both processes compute on every core, a ViT-S/16 step was
/// 2.50 s with the overlap and 2.34 s without (docs/distributed.md); KappaSSL's trainer
/// overlaps only when asked (`overlapsGradientAveraging`, `--overlap-allreduce`).
///
/// ```swift
/// let averager = GradientAverager(parameters: model.parameters)
/// loss.backward(onGradientReady: averager.gradientReady)
/// averager.finish()
/// ```
///
/// Float32 gradients overlap with backward; Float64 ones are averaged in ``finish()``. After
/// ``finish()`` the averager serves the next backward (its bucket buffers are kept).
public final class GradientAverager {
    final class Bucket {
        let members: [Tensor]
        let buffer: UnsafeMutableBufferPointer<Float>
        var ready = 0
        var request: PendingReduction?
        init(_ members: [Tensor]) {
            self.members = members
            buffer = .allocate(capacity: members.reduce(0) { $0 + $1.count })
        }
        deinit { buffer.deallocate() }
    }
    let buckets: [Bucket]
    let bucketOf: [ObjectIdentifier: Int]
    let wide: [Tensor]
    /// Buckets in the order their allreduce started.
    var started: [Bucket] = []

    /// An averager of `parameters`' gradients (the same tensors at every backward).
    public init(parameters: [Tensor], bucketBytes: Int = 4 << 20) {
        var seen = Set<ObjectIdentifier>()
        let unique = parameters.filter { seen.insert(ObjectIdentifier($0)).inserted }
        let perBucket = Swift.max(1, bucketBytes / MemoryLayout<Float>.stride)
        var buckets: [Bucket] = [], current: [Tensor] = [], count = 0
        for p in unique.reversed() where p.dtype == .float32 {
            if !current.isEmpty && count + p.count > perBucket {
                buckets.append(Bucket(current))
                (current, count) = ([], 0)
            }
            current.append(p)
            count += p.count
        }
        if !current.isEmpty { buckets.append(Bucket(current)) }
        var index: [ObjectIdentifier: Int] = [:]
        for (b, bucket) in buckets.enumerated() { for p in bucket.members { index[ObjectIdentifier(p)] = b } }
        (self.buckets, bucketOf, wide) = (buckets, index, unique.filter { $0.dtype != .float32 })
    }

    /// A gradient is complete: starts its bucket's allreduce when it was the bucket's last, and
    /// lets the reductions under way progress. Tensors that are not among the parameters are
    /// ignored.
    public func gradientReady(_ t: Tensor) {
        guard Distributed.size > 1 else { return }
        for b in started { Distributed.must { _ = try b.request!.test() } }
        guard let i = bucketOf[ObjectIdentifier(t)] else { return }
        let bucket = buckets[i]
        bucket.ready += 1
        if bucket.ready == bucket.members.count { start(bucket) }
    }

    /// Copies the bucket's gradients (zeros for a parameter without one) into its buffer.
    func pack(_ bucket: Bucket) {
        var offset = 0
        for p in bucket.members {
            let target = UnsafeMutableBufferPointer(rebasing: bucket.buffer[offset..<(offset + p.count)])
            if let g = p.grad {   // a leaf's gradient has the leaf's type (backward checks it)
                g.withScalars(as: Float.self) { target.baseAddress!.update(from: $0.baseAddress!, count: p.count) }
            } else {
                target.initialize(repeating: 0)
            }
            offset += p.count
        }
    }

    func start(_ bucket: Bucket) {
        pack(bucket)
        Distributed.must { bucket.request = try Distributed.world.startAllReduce(bucket.buffer) }
        started.append(bucket)
    }

    /// Reduces the buckets not started during backward (blocking allreduces, in the same order
    /// in every process), waits for the started ones and replaces each gradient with its mean
    /// (new tensors); a parameter without a gradient keeps none.
    public func finish() {
        guard Distributed.size > 1 else { return }
        let waiting = started
        var all = started
        for bucket in buckets where bucket.request == nil {
            pack(bucket)
            Distributed.must { try Distributed.world.allReduce(bucket.buffer, .sum) }
            all.append(bucket)
        }
        for bucket in waiting { Distributed.must { try bucket.request!.wait() } }
        let scale = 1 / Float(Distributed.size)
        for bucket in all {
            var offset = 0
            for p in bucket.members {
                if p.grad != nil {
                    let mean = Tensor.zeros(p.shape, dtype: .float32)
                    mean.withMutableScalars(as: Float.self) { g in
                        for i in 0..<g.count { g[i] = bucket.buffer[offset + i] * scale }
                    }
                    p.grad = mean
                }
                offset += p.count
            }
        }
        // Ready for the next backward (the buffers are kept).
        for bucket in buckets { (bucket.ready, bucket.request) = (0, nil) }
        started = []
        for p in wide {
            guard let g = p.grad else { continue }
            var values = g.scalars(as: Double.self)
            Distributed.allReduce(&values)
            p.grad = Tensor(values.map { $0 / Double(Distributed.size) }, shape: p.shape, dtype: p.dtype)
        }
    }
}

extension Module {
    /// Makes every ``BatchNorm`` in this module synchronized or not (PyTorch's
    /// `convert_sync_batchnorm`): with ``Distributed/world`` of several processes their
    /// batch statistics become those of the whole batch.
    public func synchronizeBatchNorm(_ on: Bool = true) {
        if let bn = self as? BatchNorm { bn.synchronized = on }
        for (_, child) in namedChildren { child.synchronizeBatchNorm(on) }
    }
}
