import Foundation
import Kappa
import KappaNN

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
    /// the crash tests set it to widen each checkpoint write. The library reads no environment.
    public static func applyFaultInjection() {
        if let ms = ProcessInfo.processInfo.environment["KAPPA_FAULT_WRITE_DELAY_MS"].flatMap({ UInt32($0) }) {
            FaultInjection.checkpointWriteDelay = ms * 1000
        }
    }
}
