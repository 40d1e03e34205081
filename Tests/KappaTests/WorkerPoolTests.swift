@testable import Kappa
import Foundation
import Synchronization
import Testing

/// The worker pool behind every parallel kernel runs each chunk of a job exactly once, with
/// any chunk count, from inside a chunk (nested: run on the caller) and from two threads at
/// once (the second job runs on its caller), and a kernel split over it equals the serial sum.
@Suite("Worker pool")
struct WorkerPoolTests {
    @Test func everyChunkRunsExactlyOnce() {
        let pool = WorkerPool.shared
        for chunks in [1, 2, 3, 7, 64, 1000] {
            let counts = UnsafeMutablePointer<Int>.allocate(capacity: chunks)
            defer { counts.deallocate() }
            for _ in 0..<50 {
                counts.initialize(repeating: 0, count: chunks)
                pool.run(chunks, threads: 2) { c in counts[c] += 1 }  // distinct chunks, distinct slots
                #expect((0..<chunks).allSatisfy { counts[$0] == 1 }, "\(chunks) chunks")
            }
        }
    }

    final class Counter: Sendable {
        let value = Atomic<Int>(0)
        func add() { value.add(1, ordering: .relaxed) }
        var count: Int { value.load(ordering: .relaxed) }
    }

    @Test func nestedAndConcurrentJobsComplete() async {
        let total = Counter()
        WorkerPool.shared.run(4, threads: 2) { _ in
            WorkerPool.shared.run(5, threads: 2) { _ in total.add() }
        }
        #expect(total.count == 20)
        let concurrent = Counter()
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<4 {
                group.addTask {
                    for _ in 0..<200 { WorkerPool.shared.run(3, threads: 2) { _ in concurrent.add() } }
                }
            }
        }
        #expect(concurrent.count == 4 * 200 * 3)
    }

    @Test func parallelKernelEqualsSerial() {
        // 2²¹ elements are split over the pool; slices of 2¹² run on the calling thread alone.
        let x = randn([1 << 21], seed: 31, dtype: .float32)
        let whole = (x * 3 + 1).exp().scalars(as: Float.self)
        var pieces: [Float] = []
        for start in stride(from: 0, to: 1 << 21, by: 1 << 12) {
            pieces += (x[start..<(start + (1 << 12))] * 3 + 1).exp().scalars(as: Float.self)
        }
        #expect(whole == pieces)
    }
}
