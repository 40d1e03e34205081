import CBLAS
import CKappaKernels
import Dispatch
import Foundation

/// Work splitting for elementwise and reduction kernels on large tensors.
enum Parallel {
    /// Cores available to kernels (see ``Threads``). OpenBLAS itself always runs on one
    /// thread: Kappa splits large products over the cores (``gemm``) and runs many small ones
    /// side by side, so that no OpenBLAS worker thread spins waiting for work between ops (in
    /// a ResNet-8 DINO step, OpenBLAS's idle threads yielding took a tenth of the time).
    nonisolated(unsafe) static var cores: Int = {
        openblas_set_num_threads(1)
        return max(1, ProcessInfo.processInfo.activeProcessorCount)
    }()

    /// Below this many elements of work a kernel runs on the calling thread: handing a chunk to
    /// another core costs about a microsecond (``WorkerPool``).
    static let grain = 1 << 16

    /// Runs `body` over `0..<count` split into contiguous chunks, one per core when the work
    /// (`count × costPerItem`) is large enough, else on the calling thread.
    @inline(__always)
    static func forEach(_ count: Int, costPerItem: Int = 1, _ body: (Range<Int>) -> Void) {
        let chunks = min(cores, count * costPerItem / grain)
        if chunks <= 1 {
            body(0..<count)
            return
        }
        WorkerPool.shared.run(chunks, threads: cores) { c in
            let lo = count * c / chunks, hi = count * (c + 1) / chunks
            body(lo..<hi)
        }
    }
}

extension Parallel {
    /// Runs `body(chunk)` for every chunk in 0..<chunks, one per core; each chunk may call
    /// BLAS (which runs on the chunk's thread).
    static func forEachChunk(_ chunks: Int, _ body: (Int) -> Void) {
        WorkerPool.shared.run(chunks, threads: cores, body)
    }
}

/// The number of threads Kappa's kernels and matrix products use.
public enum Threads {
    /// Threads for Kappa's kernels and products (each BLAS call runs on one of them); defaults
    /// to the number of active cores. Set it before starting work.
    public static var count: Int {
        get { Parallel.cores }
        set {
            precondition(newValue >= 1, "Threads.count: \(newValue) threads")
            Parallel.cores = newValue
        }
    }
}

/// What the host's BLAS and Kappa's own C kernels run on.
public enum HostKernels {
    /// The kernel family OpenBLAS chose for this CPU at load time (`openblas_get_corename`),
    /// for example "SkylakeX", "Haswell", "Zen" or "Prescott".
    public static var openBLASCore: String { String(cString: openblas_get_corename()) }

    /// The vector level Kappa's C kernels run at on this CPU: "AVX-512", "AVX2" or "baseline".
    public static var vectorLevel: String {
        switch kappa_cpu_vector_level() {
        case 3: return "AVX-512"
        case 2: return "AVX2"
        default: return "baseline"
        }
    }

    /// ``vectorLevel``, followed by the direct kernels that are on (``usesDirectConvolution``,
    /// ``usesDirectMatmul``): what a run's header names.
    public static var kernelSummary: String {
        let direct = [usesDirectConvolution ? "convolutions" : nil, usesDirectMatmul ? "matrix products" : nil].compactMap { $0 }
        return vectorLevel + (direct.isEmpty ? "" : ", direct " + direct.joined(separator: " and "))
    }

    /// Whether the host can run the direct convolution kernels (AVX-512).
    public static let hasDirectConvolution = kappa_conv_direct_available() != 0

    /// Whether Float32 convolutions of the kinds a ResNet uses (3×3 with padding 1 at stride 1
    /// or 2, 1×1 at stride 2) run the direct AVX-512 kernels instead of im2col and shifted
    /// products through BLAS (as PyTorch's `torch.backends.mkldnn.enabled`). On by default
    /// where the CPU has AVX-512 and the kernels were compiled with optimization (a release
    /// build; a debug build's unoptimized kernels are slower than the BLAS path); the
    /// environment variable `KAPPA_CONV_DIRECT=0` or `1` sets it at start-up. Turning it on
    /// without AVX-512 is a programmer error. The two paths sum in different orders, so a run's
    /// last digits depend on it.
    public static var usesDirectConvolution: Bool {
        get { directConvolution.isOn }
        set { directConvolution.set(newValue, "usesDirectConvolution") }
    }
    /// Runs `body` with the direct convolution on or off for the current task only (as
    /// PyTorch's `torch.backends.mkldnn.flags(enabled=...)`): concurrent work elsewhere keeps
    /// ``usesDirectConvolution``.
    public static func withDirectConvolution<R>(_ on: Bool, _ body: () throws -> R) rethrows -> R {
        try directConvolution.with(on, "withDirectConvolution", body)
    }
    private static let directConvolution = DirectKernelSwitch(variable: "KAPPA_CONV_DIRECT", available: hasDirectConvolution)

    /// Whether the host can run the direct matrix-product kernel (AVX-512).
    public static let hasDirectMatmul = kappa_gemm_direct_available() != 0

    /// Whether Float32 matrix products of ``Tensor/matmul(_:)`` and
    /// ``Tensor/linear(_:weight:bias:)`` (forward and both gradients) run Kappa's AVX-512 kernel
    /// instead of OpenBLAS's `sgemm`: a product of at least 2²⁰ multiply-adds whose output rows
    /// are at least 32 wide (attention's per-head products stay with OpenBLAS's small-matrix
    /// kernels). It reads A where it lies, packs B, and writes C once with the bias added,
    /// where OpenBLAS packs both operands and clears C first: it takes a tenth off a small
    /// ViT's training step (`ref-micro`) and is on a par with OpenBLAS on large products. On
    /// by default where the CPU has AVX-512 in optimized builds, as ``usesDirectConvolution``;
    /// `KAPPA_MATMUL_DIRECT=0` or `1` sets it at start-up.
    /// Each element sums k in increasing order (in blocks of 256), so the results do not depend
    /// on the thread count, but they differ from OpenBLAS's in the last digits. A linear
    /// layer's bias gradient comes from the weight gradient's pass over G, with the separate
    /// sum's bits. `KAPPA_MATMUL_TRACE=1` at start-up prints each shape's time and rate at exit.
    public static var usesDirectMatmul: Bool {
        get { directMatmul.isOn }
        set { directMatmul.set(newValue, "usesDirectMatmul") }
    }
    /// Runs `body` with the direct matrix products on or off for the current task only.
    public static func withDirectMatmul<R>(_ on: Bool, _ body: () throws -> R) rethrows -> R {
        try directMatmul.with(on, "withDirectMatmul", body)
    }
    private static let directMatmul = DirectKernelSwitch(variable: "KAPPA_MATMUL_DIRECT", available: hasDirectMatmul)

    /// OpenBLAS kernel families of the SSE era. An OpenBLAS older than the CPU it runs on
    /// (Debian 12's 0.3.21 on Sapphire or Emerald Rapids, for example) does not recognize its
    /// model number and falls back to one of these, whose `sgemm` is 4–5× slower there.
    static let genericCores: Set<String> = ["prescott", "core2", "penryn", "dunnington", "nehalem", "atom", "katmai",
                                            "coppermine", "northwood", "banias", "opteron", "opteron_sse3", "barcelona",
                                            "bobcat", "sandybridge"]

    /// The `OPENBLAS_CORETYPE` that would give this CPU the kernels its vector units support,
    /// when OpenBLAS fell back to a generic family: "SkylakeX" with AVX-512, "Haswell" with
    /// AVX2 and FMA; `nil` when OpenBLAS chose well (or the CPU has neither). OpenBLAS reads
    /// the variable once, when it is loaded, so a program that wants it must set it before
    /// it starts (the command-line programs re-run themselves with it).
    public static var suggestedOpenBLASCore: String? {
        guard genericCores.contains(openBLASCore.lowercased()) else { return nil }
        switch kappa_cpu_vector_level() {
        case 3: return "SkylakeX"
        case 2: return "Haswell"
        default: return nil
        }
    }
}

/// The switch of one of Kappa's direct AVX-512 kernels: a process-wide setting and a per-task
/// override. The setting starts on where the CPU can run the kernel and the kernels were
/// compiled with optimization, unless the environment variable says `0` (or `1`: on even
/// without optimization). Turning it on without AVX-512 is a programmer error.
private final class DirectKernelSwitch: @unchecked Sendable {
    let available: Bool
    nonisolated(unsafe) var setting: Bool
    let override = TaskLocal<Bool?>(wrappedValue: nil)

    init(variable: String, available: Bool) {
        self.available = available
        switch ProcessInfo.processInfo.environment[variable] {
        case "0": setting = false
        case "1": setting = available
        default: setting = available && kappa_conv_direct_optimized() != 0
        }
    }

    var isOn: Bool { override.get() ?? setting }

    func set(_ on: Bool, _ name: String) {
        require(on, name)
        setting = on
    }

    func with<R>(_ on: Bool, _ name: String, _ body: () throws -> R) rethrows -> R {
        require(on, name)
        return try override.withValue(on, operation: body)
    }

    private func require(_ on: Bool, _ name: String) {
        precondition(!on || available, "HostKernels.\(name): this CPU lacks AVX-512 (vector level \(HostKernels.vectorLevel))")
    }
}
