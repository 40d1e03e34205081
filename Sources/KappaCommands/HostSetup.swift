import Foundation
import Kappa
import KappaNN
import KappaMPI

/// Start-up of the command-line programs (not of the library, which reads no environment
/// variables): the BLAS kernels for this CPU.
public enum HostSetup {
    /// When OpenBLAS fell back to generic SSE kernels on a CPU it does not recognize (see
    /// ``HostKernels/suggestedOpenBLASCore``), runs this program again, with the same
    /// arguments, with `OPENBLAS_CORETYPE` naming the kernels the CPU supports: OpenBLAS
    /// reads the variable only when it is loaded. Does nothing when the variable is already
    /// set (by the user, or by the first run), so it runs at most once. Call it first in
    /// `main`, before any output.
    public static func useFastestBLASKernels() {
        guard ProcessInfo.processInfo.environment["OPENBLAS_CORETYPE"] == nil,
              let core = HostKernels.suggestedOpenBLASCore else { return }
        setenv("OPENBLAS_CORETYPE", core, 1)
        fflush(stdout)
        execv("/proc/self/exe", CommandLine.unsafeArgv)
        // execv returns only on failure: go on with the kernels OpenBLAS chose.
        unsetenv("OPENBLAS_CORETYPE")
    }

    /// Reads `KAPPA_FAULT_WRITE_DELAY_MS` (milliseconds) into ``FaultInjection/checkpointWriteDelay``:
    /// the crash tests set it to widen each checkpoint write; and `KAPPA_FAULT_INTERRUPT_AT_STEP`
    /// (a Ctrl-C on rank 0 before that step). The library reads no environment.
    public static func applyFaultInjection() {
        if let ms = ProcessInfo.processInfo.environment["KAPPA_FAULT_WRITE_DELAY_MS"].flatMap({ UInt32($0) }) {
            FaultInjection.checkpointWriteDelay = ms * 1000
        }
        interruptAtStep = ProcessInfo.processInfo.environment["KAPPA_FAULT_INTERRUPT_AT_STEP"].flatMap { Int($0) }
    }

    /// From `KAPPA_FAULT_INTERRUPT_AT_STEP`: rank 0 acts as if Ctrl-C arrived before this
    /// step (the distributed tests stop a run at an exact step, on one process only).
    nonisolated(unsafe) static var interruptAtStep: Int?

    /// Joins the run's processes when an MPI launcher started this program
    /// (`mpirun -np N DINOvMF ...`): initializes MPI, makes its processes
    /// ``Distributed/world``, gives each process its share of this machine's cores as the
    /// default `--threads` (the cores over the processes started on the machine), and sends
    /// the standard output and error of every process but rank 0 to /dev/null (rank 0 prints
    /// for the run; a failing collective still reports on the original standard error).
    /// Does nothing in a program started without a launcher. Call it after
    /// ``useFastestBLASKernels()`` and before any work.
    public static func joinProcesses() {
        guard MPICommunicator.isLaunched else { return }
        guard MPICommunicator.isAvailable else {
            FileHandle.standardError.write(Data("error: started by an MPI launcher, but this build has no MPI: install Open MPI (bash Scripts/setup.sh) and rebuild\n".utf8))
            exit(1)
        }
        let world: MPICommunicator
        do {
            world = try MPICommunicator.initialize()
        } catch {
            FileHandle.standardError.write(Data("error: \(error)\n".utf8))
            exit(1)
        }
        Distributed.world = world
        if let local = ProcessInfo.processInfo.environment["OMPI_COMM_WORLD_LOCAL_SIZE"].flatMap({ Int($0) }), local > 1 {
            Threads.count = Swift.max(1, Threads.count / local)
        }
        if world.rank != 0 {
            world.errorOutput = FileHandle(fileDescriptor: dup(STDERR_FILENO), closeOnDealloc: true)
            let null = open("/dev/null", O_WRONLY)
            if null >= 0 {
                dup2(null, STDOUT_FILENO)
                dup2(null, STDERR_FILENO)
                close(null)
            }
        }
    }
}
