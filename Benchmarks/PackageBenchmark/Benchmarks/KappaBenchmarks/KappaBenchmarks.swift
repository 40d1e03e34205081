import Benchmark
import CBLASBench
import Kappa
import KappaNN
import KappaSSL

// BENCHMARKS.md's workloads. Setup happens before `startMeasurement()`; every figure is a
// distribution over iterations (package-benchmark reports percentiles, p50 is the median).
let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(metrics: [.wallClock, .cpuTotal, .peakMemoryResident, .mallocCountTotal],
                                           warmupIterations: 1, maxDuration: .seconds(10), maxIterations: 200)

    for w in [ReferenceStep.Workload.refMicro, .refTiny, .refResNet, .refIBOTMicro] {
        Benchmark("\(w.name) training step", configuration: .init(maxDuration: .seconds(30), maxIterations: w.name == "ref-tiny" ? 6 : 50)) { b in
            let step = ReferenceStep(w)
            b.startMeasurement()
            for _ in b.scaledIterations { blackHole(step.step()) }
        }
    }

    for n in [64, 256, 1024] {
        Benchmark("matmul \(n)³ through the framework (tape on)") { b in
            var g = RandomGenerator(seed: 1)
            let x = Tensor.randomNormal([n, n], using: &g).requiringGrad(), y = Tensor.randomNormal([n, n], using: &g)
            b.startMeasurement()
            for _ in b.scaledIterations { blackHole(x.matmul(y)) }
        }
        Benchmark("sgemm \(n)³ (bare cblas_sgemm)") { b in
            var g = RandomGenerator(seed: 1)
            let x = Tensor.randomNormal([n, n], using: &g).scalars(as: Float.self), y = Tensor.randomNormal([n, n], using: &g).scalars(as: Float.self)
            var z = [Float](repeating: 0, count: n * n)
            b.startMeasurement()
            for _ in b.scaledIterations {
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(n), Int32(n), Int32(n), 1, x, Int32(n), y, Int32(n), 0, &z, Int32(n))
            }
            blackHole(z)
        }
    }

    Benchmark("matmul batched 192 × (65×64 · 64×65)") { b in
        var g = RandomGenerator(seed: 1)
        let q = Tensor.randomNormal([64, 3, 65, 64], using: &g), k = Tensor.randomNormal([64, 3, 65, 64], using: &g)
        b.startMeasurement()
        for _ in b.scaledIterations { blackHole(q.matmul(k.transposed())) }
    }

    for (n, label) in [(1 << 20, "1M"), (1 << 24, "16M")] {
        Benchmark("add \(label)") { b in
            var g = RandomGenerator(seed: 1)
            let x = Tensor.randomNormal([n], using: &g), y = Tensor.randomNormal([n], using: &g)
            b.startMeasurement()
            for _ in b.scaledIterations { blackHole(x + y) }
        }
        Benchmark("gelu \(label)") { b in
            var g = RandomGenerator(seed: 1)
            let x = Tensor.randomNormal([n], using: &g)
            b.startMeasurement()
            for _ in b.scaledIterations { blackHole(x.gelu()) }
        }
        Benchmark("softmax forward+backward \(label) (rows of 1024)") { b in
            var g = RandomGenerator(seed: 1)
            let x = Tensor.randomNormal([n / 1024, 1024], using: &g).requiringGrad(), go = Tensor.randomNormal([n / 1024, 1024], using: &g)
            b.startMeasurement()
            for _ in b.scaledIterations { (x.softmax(alongAxis: 1) * go).sum().backward() }
        }
        Benchmark("layerNorm forward+backward \(label) (rows of 1024)") { b in
            var g = RandomGenerator(seed: 1)
            let x = Tensor.randomNormal([n / 1024, 1024], using: &g).requiringGrad(), go = Tensor.randomNormal([n / 1024, 1024], using: &g)
            let w = Tensor.ones([1024]).requiringGrad(), bias = Tensor.zeros([1024]).requiringGrad()
            b.startMeasurement()
            for _ in b.scaledIterations { (x.layerNorm(weight: w, bias: bias, eps: 1e-6) * go).sum().backward() }
        }
    }

    Benchmark("per-op overhead: 1,000 chained ops on 16 elements, forward+backward") { b in
        var g = RandomGenerator(seed: 1)
        let x = Tensor.randomNormal([16], using: &g).requiringGrad()
        b.startMeasurement()
        for _ in b.scaledIterations {
            var y = x
            for i in 0..<1000 { y = i % 2 == 0 ? y * 1.0001 : y + 0.5 }
            y.sum().backward()
        }
    }

    for mode in [VMFNormalizerApproximation.largeOrder, .exact] {
        Benchmark("vMF log C_p \(mode == .exact ? "exact" : "approximate"), 65,536 κ, p = 256, forward+backward") { b in
            var g = RandomGenerator(seed: 1)
            let kappa = (Tensor.randomUniform([65536], low: -2, high: 4, using: &g) * 2.302585).exp().requiringGrad()
            b.startMeasurement()
            for _ in b.scaledIterations { kappa.vmfLogNormalizer(dimension: 256, approximation: mode).sum().backward() }
        }
    }
}
