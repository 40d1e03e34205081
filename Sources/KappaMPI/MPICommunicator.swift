import CMPI
import Foundation
import KappaNN

/// An MPI call that failed: the call's name and MPI's message.
public struct MPIError: Error, CustomStringConvertible, Equatable {
    /// The MPI function (`MPI_Allreduce`).
    public let call: String
    /// MPI's error code.
    public let code: Int32
    /// MPI's text for the code.
    public let message: String
    public var description: String { "\(call) failed: \(message) (MPI error \(code))" }
}

/// The processes started by `mpirun` (MPI_COMM_WORLD) as a `Communicator`: the collectives
/// of data-parallel training over an existing MPI (Open MPI on Debian, through pkg-config
/// `ompi-c`), never a transport of Kappa's own. Only the main thread calls MPI.
///
/// ```swift
/// if MPICommunicator.isLaunched { Distributed.world = try MPICommunicator.initialize() }
/// ```
public final class MPICommunicator: Communicator {
    public let rank: Int
    public let size: Int
    /// Where ``abort(_:)`` writes its message (standard error unless a program redirected it).
    public var errorOutput = FileHandle.standardError

    /// Whether Kappa was built with MPI's headers (`bash Scripts/setup.sh` installs Open MPI).
    public static var isAvailable: Bool { kappa_mpi_available() != 0 }

    /// Whether an MPI launcher started this process (`mpirun`/`mpiexec` of Open MPI, MPICH or
    /// Slurm's `srun` with PMI/PMIx): the environment variables they set for each process.
    public static var isLaunched: Bool {
        let env = ProcessInfo.processInfo.environment
        return ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"].contains { env[$0] != nil }
    }

    nonisolated(unsafe) private static var initialized = false

    /// Initializes MPI (once per process) and returns MPI_COMM_WORLD. Errors are returned by
    /// MPI, not fatal, and thrown as ``MPIError``. Finalized when the process exits.
    public static func initialize() throws -> MPICommunicator {
        precondition(!initialized, "MPICommunicator.initialize: MPI is already initialized in this process")
        var rank: Int32 = 0, size: Int32 = 1
        try check("MPI_Init_thread", kappa_mpi_init(&rank, &size))
        initialized = true
        atexit { _ = kappa_mpi_finalize() }
        return MPICommunicator(rank: Int(rank), size: Int(size))
    }

    private init(rank: Int, size: Int) { (self.rank, self.size) = (rank, size) }

    static func check(_ call: String, _ code: Int32) throws {
        guard code != 0 else { return }
        var buffer = [CChar](repeating: 0, count: 256)
        kappa_mpi_error_string(code, &buffer)
        throw MPIError(call: call, code: code, message: String(cString: buffer))
    }

    /// MPI counts are Int32: larger buffers go in chunks.
    private func chunks(_ count: Int, _ body: (Int, Int32) throws -> Void) throws {
        let most = Int(kappa_mpi_max_count())
        var start = 0
        while start < count {
            let n = Swift.min(most, count - start)
            try body(start, Int32(n))
            start += n
        }
    }

    public func allReduce(_ values: UnsafeMutableBufferPointer<Float>, _ operation: ReduceOperation) throws {
        guard let base = values.baseAddress else { return }
        try chunks(values.count) { s, n in try Self.check("MPI_Allreduce", kappa_mpi_allreduce_f32(base + s, n, operation == .max ? 1 : 0)) }
    }

    public func allReduce(_ values: UnsafeMutableBufferPointer<Double>, _ operation: ReduceOperation) throws {
        guard let base = values.baseAddress else { return }
        try chunks(values.count) { s, n in try Self.check("MPI_Allreduce", kappa_mpi_allreduce_f64(base + s, n, operation == .max ? 1 : 0)) }
    }

    public func startAllReduce(_ values: UnsafeMutableBufferPointer<Float>) throws -> PendingReduction {
        guard let base = values.baseAddress, values.count <= Int(kappa_mpi_max_count()) else {
            try allReduce(values, .sum)   // empty, or too long for one MPI call: blocking, in chunks
            return MPIPendingReduction(nil)
        }
        var request: UnsafeMutableRawPointer?
        try Self.check("MPI_Iallreduce", kappa_mpi_iallreduce_f32(base, Int32(values.count), &request))
        return MPIPendingReduction(request)
    }

    public func broadcast(_ bytes: UnsafeMutableRawBufferPointer, root: Int) throws {
        precondition((0..<size).contains(root), "broadcast: root \(root) outside 0..<\(size)")
        guard let base = bytes.baseAddress else { return }
        try chunks(bytes.count) { s, n in try Self.check("MPI_Bcast", kappa_mpi_bcast(base + s, n, Int32(root))) }
    }

    public func allGather(_ bytes: UnsafeRawBufferPointer, into result: UnsafeMutableRawBufferPointer) throws {
        precondition(result.count == bytes.count * size, "allGather: \(result.count) bytes of result for \(size) × \(bytes.count)")
        guard bytes.count > 0 else { return }
        guard bytes.count <= Int(kappa_mpi_max_count()) else {
            throw MPIError(call: "MPI_Allgather", code: -1, message: "\(bytes.count) bytes per process exceed MPI's count")
        }
        try Self.check("MPI_Allgather", kappa_mpi_allgather(bytes.baseAddress!, Int32(bytes.count), result.baseAddress!))
    }

    public func barrier() throws { try Self.check("MPI_Barrier", kappa_mpi_barrier()) }

    public func abort(_ message: String) -> Never {
        errorOutput.write(Data((message + "\n").utf8))
        kappa_mpi_abort(1)
        exit(1)
    }
}

/// An MPI_Iallreduce under way (MPI_Test progresses it, MPI_Wait completes and frees it).
final class MPIPendingReduction: PendingReduction {
    private var request: UnsafeMutableRawPointer?
    init(_ request: UnsafeMutableRawPointer?) { self.request = request }

    func test() throws -> Bool {
        guard let request else { return true }
        var done: Int32 = 0
        try MPICommunicator.check("MPI_Test", kappa_mpi_test(request, &done))
        return done != 0
    }

    func wait() throws {
        guard let r = request else { return }
        request = nil
        try MPICommunicator.check("MPI_Wait", kappa_mpi_wait(r))
    }

    deinit {
        // A reduction dropped unwaited is completed, so that MPI does not write into freed memory.
        if let r = request { _ = kappa_mpi_wait(r) }
    }
}
