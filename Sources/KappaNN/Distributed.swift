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
    /// Waits until every process has called it.
    func barrier() throws
    /// Ends every process of the run with `message` (a collective that failed where no error
    /// can be thrown: the others would wait for this process forever).
    func abort(_ message: String) -> Never
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
        let c = withoutGradients { t.contiguous().copied() }
        let out = Tensor.zeros([c.shape[0] * size] + c.shape.dropFirst(), dtype: c.dtype)
        func gather<T: TensorScalar>(_: T.Type) {
            c.withScalars(as: T.self) { src in
                out.withMutableScalars(as: T.self) { dst in
                    must { try world.allGather(UnsafeRawBufferPointer(src), into: UnsafeMutableRawBufferPointer(dst)) }
                }
            }
        }
        switch c.dtype {
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
    /// PyTorch's DistributedDataParallel does after backward): the gradients are packed into
    /// flat buckets of about `bucketBytes` and each bucket is one allreduce. A parameter
    /// without a gradient must have none in every process (the processes run the same graph).
    public static func averageGradients(of parameters: [Tensor], bucketBytes: Int = 4 << 20) {
        guard size > 1 else { return }
        let withGrad = parameters.filter { $0.grad != nil }
        for p in withGrad where p.grad!.dtype != p.dtype { p.grad = withoutGradients { p.grad!.to(p.dtype) } }
        func average<T: TensorScalar>(_ group: [Tensor], _: T.Type, _ reduce: (UnsafeMutableBufferPointer<T>) throws -> Void) {
            let perBucket = Swift.max(1, bucketBytes / MemoryLayout<T>.stride)
            let flat = UnsafeMutableBufferPointer<T>.allocate(capacity: perBucket)   // a larger gradient gets a bucket of its own
            defer { flat.deallocate() }
            let scale = 1 / T(size)
            var start = 0
            while start < group.count {
                var end = start, count = 0
                while end < group.count && (count == 0 || count + group[end].count <= perBucket) { count += group[end].count; end += 1 }
                let bucket = count <= flat.count ? UnsafeMutableBufferPointer(rebasing: flat[0..<count])
                                                 : UnsafeMutableBufferPointer<T>.allocate(capacity: count)
                defer { if count > flat.count { bucket.deallocate() } }
                var offset = 0
                for p in group[start..<end] {
                    p.grad!.withScalars(as: T.self) { g in (bucket.baseAddress! + offset).update(from: g.baseAddress!, count: g.count) }
                    offset += p.count
                }
                must { try reduce(bucket) }
                offset = 0
                // Each mean into a new tensor: backward may hand one gradient buffer to several
                // parameters, which must not be scaled twice.
                for p in group[start..<end] {
                    let mean = Tensor.zeros(p.shape, dtype: p.dtype)
                    mean.withMutableScalars(as: T.self) { g in
                        for i in 0..<g.count { g[i] = bucket[offset + i] * scale }
                    }
                    p.grad = mean
                    offset += p.count
                }
                start = end
            }
        }
        average(withGrad.filter { $0.dtype == .float32 }, Float.self) { try world.allReduce($0, .sum) }
        average(withGrad.filter { $0.dtype == .float64 }, Double.self) { try world.allReduce($0, .sum) }
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
