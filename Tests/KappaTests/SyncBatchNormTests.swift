import Foundation
import Kappa
import Testing

/// An allreduce (sum) between `parties` threads of this process: what MPI does between
/// processes, for checking the synchronized BatchNorm without MPI.
final class ThreadSum: @unchecked Sendable {
    let parties: Int
    private let condition = NSCondition()
    private var pending: [[Double]] = []
    private var results: [Int: [Double]] = [:]
    private var generation = 0

    init(parties: Int) { self.parties = parties }

    func sum(_ p: UnsafeMutableBufferPointer<Double>) {
        condition.lock()
        defer { condition.unlock() }
        let mine = generation
        pending.append(Array(p))
        if pending.count == parties {
            results[mine] = pending.dropFirst().reduce(pending[0]) { zip($0, $1).map { $0 + $1 } }
            pending = []
            generation += 1
            condition.broadcast()
        } else {
            while generation == mine { condition.wait() }
        }
        for (i, v) in results[mine]!.enumerated() { p[i] = v }
    }
}

@Suite("SyncBatchNorm (the batch split over processes)")
struct SyncBatchNormTests {
    /// BatchNorm of `x` with γ = w, β = b and fresh running statistics; the leaves for their gradients.
    static func bn(_ x: Tensor, _ w: Tensor, _ b: Tensor, relu: Bool, _ sync: ((UnsafeMutableBufferPointer<Double>) -> Void)?)
        -> (y: Tensor, xi: Tensor, wi: Tensor, bi: Tensor, rm: Tensor, rv: Tensor) {
        let (xi, wi, bi) = (x.copied().requiringGrad(), w.copied().requiringGrad(), b.copied().requiringGrad())
        let c = x.shape[1]
        let rm = Tensor.zeros([c], dtype: .float64), rv = Tensor.ones([c], dtype: .float64)
        let y = xi.batchNorm(weight: wi, bias: bi, runningMean: rm, runningVariance: rv, training: true, applyingReLU: relu,
                             synchronizing: sync)
        return (y, xi, wi, bi, rm, rv)
    }

    /// The batch normalized by `parts` threads, each with its shard and the synchronizing
    /// sum, against one BatchNorm of the whole batch: outputs, running statistics, the input
    /// gradient, and γ's and β's gradients summed over the shards (each process's part of the
    /// whole batch's loss), all in Float64.
    func split(_ shape: [Int], parts: Int, relu: Bool) throws {
        let x = randn(shape, seed: 301), w = randn([shape[1]], seed: 302), b = randn([shape[1]], seed: 303) * 0.1
        let g = randn(shape, seed: 304)
        let n = shape[0], per = n / parts
        // The whole batch.
        let whole = Self.bn(x, w, b, relu: relu, nil)
        (whole.y * g).sum().backward()
        // The shards, one thread each, meeting in the sum.
        let group = ThreadSum(parties: parts)
        nonisolated(unsafe) var shards: [(y: [Double], gx: [Double], gw: [Double], gb: [Double], rm: [Double], rv: [Double])?] =
            Array(repeating: nil, count: parts)
        let threads = (0..<parts).map { r in
            Thread {
                let xr = x[(r * per)..<((r + 1) * per)].contiguous(), gr = g[(r * per)..<((r + 1) * per)].contiguous()
                let s = Self.bn(xr, w, b, relu: relu, group.sum)
                (s.y * gr).sum().backward()
                shards[r] = (s.y.scalars(), s.xi.grad!.scalars(), s.wi.grad!.scalars(), s.bi.grad!.scalars(), s.rm.scalars(), s.rv.scalars())
            }
        }
        threads.forEach { $0.start() }
        while threads.contains(where: { !$0.isFinished }) { usleep(1000) }
        let parts = try shards.map { try #require($0) }
        func close(_ a: [Double], _ b: [Double], _ what: String) {
            let worst = zip(a, b).map { Swift.abs($0 - $1) }.max() ?? 0
            #expect(a.count == b.count && worst < 1e-12, "\(what): largest difference \(worst)")
        }
        close(parts.flatMap(\.y), whole.y.scalars(), "output")
        close(parts.flatMap(\.gx), whole.xi.grad!.scalars(), "input gradient")
        close(parts.map(\.gw).reduce(Array(repeating: 0, count: shape[1])) { zip($0, $1).map(+) }, whole.wi.grad!.scalars(), "γ gradient")
        close(parts.map(\.gb).reduce(Array(repeating: 0, count: shape[1])) { zip($0, $1).map(+) }, whole.bi.grad!.scalars(), "β gradient")
        for p in parts {
            close(p.rm, whole.rm.scalars(), "running mean")
            close(p.rv, whole.rv.scalars(), "running variance")
        }
    }

    @Test("two and four shards equal the whole batch (2-D, 3-D, 4-D, with ReLU)")
    func shardsEqualWholeBatch() throws {
        try split([8, 3], parts: 2, relu: false)
        try split([8, 3, 5], parts: 4, relu: false)
        try split([6, 4, 3, 3], parts: 2, relu: true)
    }

    @Test("the synchronized op's gradients against finite differences (one process)")
    func gradcheck() {
        let w = randn([3], seed: 305), b = randn([3], seed: 306)
        expectGradients([randn([4, 3, 2, 2], seed: 307), w, b]) {
            $0[0].batchNorm(weight: $0[1], bias: $0[2], runningMean: nil, runningVariance: nil, training: true, synchronizing: { _ in })
        }
    }
}
