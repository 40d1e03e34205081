import Dispatch
import Foundation

/// Work splitting for elementwise and reduction kernels on large tensors.
enum Parallel {
    /// Cores available to kernels.
    static let cores = max(1, ProcessInfo.processInfo.activeProcessorCount)

    /// Below this many elements of work a kernel runs on the calling thread: dispatching to
    /// another core costs a few microseconds.
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
        withoutActuallyEscaping(body) { body in
            DispatchQueue.concurrentPerform(iterations: chunks) { c in
                let lo = count * c / chunks, hi = count * (c + 1) / chunks
                body(lo..<hi)
            }
        }
    }
}
