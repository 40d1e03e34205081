import CKappaKernels
import Dispatch
import Foundation
import Synchronization

/// The threads that run Kappa's parallel kernels: one persistent worker per extra core that
/// spins briefly between jobs and then sleeps, as OpenMP runtimes do. Dispatch's
/// `concurrentPerform` woke its worker too late for Kappa's jobs, which last 10–500 µs: on
/// the development machine two halves of a 90 µs loop took 101 µs with it and 46 µs here.
///
/// A job is `chunks` calls of one body; the caller and the workers claim chunk indices from
/// one atomic ticket (generation in the high bits, next index in the low bits) and the caller
/// returns when every chunk is done. A job posted while another runs (a kernel called from
/// inside a chunk, or from a second thread) runs on its caller's thread.
final class WorkerPool: @unchecked Sendable {
    static let shared = WorkerPool()

    private let ticket = Atomic<Int>(0)
    /// The current job's generation and chunk count, (generation << 32) | chunks, published
    /// before its ticket: a claim counts only if its generation is the job's.
    private let job = Atomic<Int>(0)
    private let completed = Atomic<Int>(0)
    private let busy = Atomic<Bool>(false)
    /// Workers that take part in the current job (``Threads/count`` − 1; more may exist if
    /// the count was higher before).
    private let participants = Atomic<Int>(0)
    /// The current job's body: written by the poster before it publishes the job, read by a
    /// worker only after it claimed a chunk of that job (so the job cannot finish, and the
    /// body cannot change, before the worker is done with it).
    private nonisolated(unsafe) var body: ((Int) -> Void)?
    private var workers: [Worker] = []
    private let lock = NSLock()

    private final class Worker: @unchecked Sendable {
        let index: Int
        let parked = Atomic<Bool>(false)
        let wake = DispatchSemaphore(value: 0)
        init(index: Int) { self.index = index }
    }

    private static let indexBits = 32
    private static let indexMask = (1 << indexBits) - 1
    /// How long a worker spins between jobs before it sleeps: long enough to bridge the
    /// serial work between two parallel ops, short enough not to hold a core for nothing.
    private static let spinNanoseconds: UInt64 = 100_000

    /// Runs `body(0..<chunks)` on up to `threads` threads (the caller included).
    func run(_ chunks: Int, threads: Int, _ body: (Int) -> Void) {
        if chunks <= 1 || threads <= 1 || !busy.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged {
            for c in 0..<chunks { body(c) }
            return
        }
        defer { busy.store(false, ordering: .releasing) }
        ensureWorkers(threads - 1)
        withoutActuallyEscaping(body) { body in
            self.body = body
            completed.store(0, ordering: .relaxed)
            participants.store(threads - 1, ordering: .relaxed)
            let generation = (ticket.load(ordering: .relaxed) >> Self.indexBits) + 1
            job.store(generation << Self.indexBits | chunks, ordering: .releasing)
            ticket.store(generation << Self.indexBits, ordering: .sequentiallyConsistent)
            for w in workers where w.index < threads - 1 && w.parked.load(ordering: .sequentiallyConsistent) {
                w.wake.signal()
            }
            work()
            while completed.load(ordering: .acquiring) < chunks { kappa_spin_pause() }
            self.body = nil
        }
    }

    /// Claims and runs chunks of the current job until none is left.
    private func work() {
        while true {
            let t = ticket.add(1, ordering: .acquiringAndReleasing).oldValue
            let current = job.load(ordering: .acquiring)
            let index = t & Self.indexMask
            guard t >> Self.indexBits == current >> Self.indexBits, index < current & Self.indexMask else { return }
            runChunk(index)
            completed.add(1, ordering: .releasing)
        }
    }

    /// Calls the body on one chunk; its reference to the body ends here, before the chunk is
    /// counted as done (the poster's `withoutActuallyEscaping` checks that none is left).
    @inline(never)
    private func runChunk(_ index: Int) {
        let b = body!
        b(index)
    }

    private func ensureWorkers(_ count: Int) {
        lock.lock()
        defer { lock.unlock() }
        while workers.count < count {
            let w = Worker(index: workers.count)
            workers.append(w)
            let thread = Thread { [unowned self] in self.loop(w) }
            thread.name = "kappa.worker.\(w.index)"
            thread.stackSize = 1 << 22
            thread.start()
        }
    }

    private func loop(_ w: Worker) {
        var seen = ticket.load(ordering: .acquiring) >> Self.indexBits
        while true {
            var spins = 0
            var start = DispatchTime.now().uptimeNanoseconds
            var generation = ticket.load(ordering: .acquiring) >> Self.indexBits
            while generation == seen {
                spins += 1
                kappa_spin_pause()
                if spins % 64 != 0 || DispatchTime.now().uptimeNanoseconds - start < Self.spinNanoseconds {
                    // keep spinning
                } else {
                    // Sleep; the poster signals parked workers after publishing a job (and a
                    // job published between the store and the check is seen by the check).
                    w.parked.store(true, ordering: .sequentiallyConsistent)
                    if ticket.load(ordering: .sequentiallyConsistent) >> Self.indexBits == seen { w.wake.wait() }
                    w.parked.store(false, ordering: .sequentiallyConsistent)
                    spins = 0
                    start = DispatchTime.now().uptimeNanoseconds
                }
                generation = ticket.load(ordering: .acquiring) >> Self.indexBits
            }
            seen = generation
            if w.index < participants.load(ordering: .relaxed) { work() }
        }
    }
}
