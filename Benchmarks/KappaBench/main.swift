// Kernel benchmarks of the Kappa core. Run in release:
//
//     swift run -c release KappaBench
//
// Each figure is the median of repeated runs after a warm-up. Matrix products through the
// framework (tape recording on) are compared with a bare cblas_sgemm of the same shape.
import CBLAS
import CKappaKernels
import Foundation
import Kappa
import KappaCommands
import KappaNN
import KappaSSL

// The same BLAS kernels as the programs it measures (DINOvMF re-runs itself with them too).
HostSetup.useFastestBLASKernels()
// Under mpirun (the allreduce section), one process per rank; rank 0 prints.
HostSetup.joinProcesses()

func median(_ xs: [Double]) -> Double { xs.sorted()[xs.count / 2] }

/// Median seconds per call of `body` over `reps` timed runs after one warm-up.
func time(reps: Int, _ body: () -> Void) -> Double {
    body()
    var samples: [Double] = []
    for _ in 0..<reps {
        let start = DispatchTime.now().uptimeNanoseconds
        body()
        samples.append(Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9)
    }
    return median(samples)
}

/// With KAPPA_BENCH_RESULTS=file, each workload's median seconds are appended as
/// `name<TAB>seconds` lines (Benchmarks/peers/compare.py joins them with PyTorch's).
let resultsPath = ProcessInfo.processInfo.environment["KAPPA_BENCH_RESULTS"]
func record(_ workload: String, _ seconds: Double) {
    guard let resultsPath else { return }
    let line = "\(workload)\t\(seconds)\n"
    if let h = FileHandle(forWritingAtPath: resultsPath) {
        h.seekToEndOfFile(); h.write(Data(line.utf8)); try? h.close()
    } else {
        if !FileManager.default.createFile(atPath: resultsPath, contents: Data(line.utf8)) { print("cannot write \(resultsPath)") }
    }
}

var rng = RandomGenerator(seed: 1)
// THREADS (set by Benchmarks/peers/compare.sh) sets the threads of Kappa's kernels and OpenBLAS.
if let t = ProcessInfo.processInfo.environment["THREADS"].flatMap({ Int($0) }), t >= 1 { Threads.count = t }
let sections = Set(CommandLine.arguments.dropFirst())
func wants(_ name: String) -> Bool { sections.isEmpty || sections.contains(name) }
print("Kappa core benchmarks (\(ProcessInfo.processInfo.activeProcessorCount) cores, \(Threads.count) threads; OpenBLAS \(HostKernels.openBLASCore) kernels, Kappa's C kernels \(HostKernels.kernelSummary)); sections: matmul elementwise overhead vmf vit step (or ref-micro ref-tiny ref-resnet ref-ibot-micro) memory, and allreduce, ddp-step (under mpirun)\n")

if wants("matmul") {

print("matmul, Float32: framework (with tape) vs bare cblas_sgemm")
for n in [64, 256, 1024] {
    let a = Tensor.randomNormal([n, n], using: &rng).requiringGrad()
    let b = Tensor.randomNormal([n, n], using: &rng)
    let reps = n >= 1024 ? 15 : 200
    let framework = time(reps: reps) { _ = a.matmul(b) }
    let pa = a.scalars(as: Float.self), pb = b.scalars(as: Float.self)
    var pc = [Float](repeating: 0, count: n * n)
    // OpenBLAS threaded as it comes (Kappa runs it on one thread and splits products itself).
    openblas_set_num_threads(Int32(Threads.count))
    let bare = time(reps: reps) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(n), Int32(n), Int32(n), 1, pa, Int32(n), pb,
                    Int32(n), 0, &pc, Int32(n))
    }
    openblas_set_num_threads(1)
    let flop = 2 * Double(n * n * n)
    record("matmul \(n)³", framework)
    record("sgemm \(n)³ (bare BLAS)", bare)
    print(String(format: "  %4d³: framework %8.1f µs (%6.1f GFLOP/s), sgemm %8.1f µs (%6.1f GFLOP/s), ratio %.3f",
                 n, framework * 1e6, flop / framework * 1e-9, bare * 1e6, flop / bare * 1e-9, framework / bare))
}
do {
    // ref-tiny attention scores: 64 images × 3 heads, 65 tokens, head width 64.
    let q = Tensor.randomNormal([64, 3, 65, 64], using: &rng), k = Tensor.randomNormal([64, 3, 65, 64], using: &rng)
    let t = time(reps: 50) { _ = q.matmul(k.transposed()) }
    let flop = 2 * 192 * 65 * 65 * 64.0
    record("matmul batched 192×65×64×65", t)
    print(String(format: "  batched 192 × (65×64 · 64×65), Kᵀ as a view: %.1f µs (%.1f GFLOP/s)", t * 1e6, flop / t * 1e-9))
}
if HostKernels.hasDirectMatmul {
    // The linear layers' products of ref-micro (global crops: 1,088 tokens of width 64) and
    // ref-tiny (8,320 tokens of width 192), forward x·Wᵀ, input gradient G·W and weight
    // gradient Gᵀ·x, on one thread: Kappa's direct kernel against a bare cblas_sgemm, the two
    // alternating call by call so that both see the same machine.
    print("  Linear layers' products on one thread, direct kernel vs bare cblas_sgemm (median of alternating calls):")
    for (tokens, width, hidden) in [(1088, 64, 256), (8320, 192, 768)] {
        for (kind, m, n, k, ta, tb) in [("x·Wᵀ", tokens, hidden, width, false, true), ("G·W", tokens, width, hidden, false, false),
                                        ("Gᵀ·x", hidden, width, tokens, true, false)] {
            let a = Tensor.randomNormal([m * k], using: &rng).scalars(as: Float.self)
            let b = Tensor.randomNormal([k * n], using: &rng).scalars(as: Float.self)
            var c = [Float](repeating: 0, count: m * n)
            let (lda, ldb) = (ta ? m : k, tb ? k : n)
            var direct: [Double] = [], blas: [Double] = []
            for rep in 0..<(tokens > 2000 ? 12 : 200) {
                let start = DispatchTime.now().uptimeNanoseconds
                if rep % 2 == 0 {
                    kappa_gemm_f32(ta ? 1 : 0, tb ? 1 : 0, m, n, k, 1, a, lda, b, ldb, 0, &c, n, nil)
                } else {
                    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, Int32(m), Int32(n),
                                Int32(k), 1, a, Int32(lda), b, Int32(ldb), 0, &c, Int32(n))
                }
                let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9
                if rep >= 2 { if rep % 2 == 0 { direct.append(seconds) } else { blas.append(seconds) } }
            }
            let name = "\(kind) \(m)×\(n)×\(k)"
            record("direct product \(name)", median(direct))
            record("sgemm \(name) (bare BLAS)", median(blas))
            print(String(format: "    %@ %@: direct %8.1f µs (%5.1f GFLOP/s), sgemm %8.1f µs (%5.1f GFLOP/s), ratio %.2f", kind,
                         "\(m)×\(n)×\(k)", median(direct) * 1e6, 2 * Double(m * n * k) / median(direct) * 1e-9,
                         median(blas) * 1e6, 2 * Double(m * n * k) / median(blas) * 1e-9, median(direct) / median(blas)))
        }
    }
}

}

if wants("elementwise") {
print("\nelementwise and softmax, Float32 (GB/s counts bytes read + written)")
for n in [1 << 20, 1 << 24] {
    let x = Tensor.randomNormal([n], using: &rng), y = Tensor.randomNormal([n], using: &rng)
    let reps = n > 1 << 20 ? 10 : 100
    let bytes = Double(n * 4)
    let add = time(reps: reps) { _ = x + y }
    let mul = time(reps: reps) { _ = x * y }
    let gelu = time(reps: reps) { _ = x.gelu() }
    let exp = time(reps: reps) { _ = x.exp() }
    let rows = x.reshape([n / 1024, 1024])
    let soft = time(reps: reps) { _ = rows.softmax(alongAxis: 1) }
    let xg = rows.detached().requiringGrad()
    let gradOut = Tensor.randomNormal([n / 1024, 1024], using: &rng)
    let softBoth = time(reps: reps) { (xg.softmax(alongAxis: 1) * gradOut).sum().backward() }
    let lnWeight = Tensor.ones([1024]).requiringGrad(), lnBias = Tensor.zeros([1024]).requiringGrad()
    let lnBoth = time(reps: reps) { (xg.layerNorm(weight: lnWeight, bias: lnBias, eps: 1e-6) * gradOut).sum().backward() }
    // BatchNorm in training mode on [N, 16, 32, 32] images, running statistics updated.
    let images = Tensor.randomNormal([n / (16 * 1024), 16, 32, 32], using: &rng).requiringGrad()
    let imageGrad = gradOut.reshape([n / (16 * 1024), 16, 32, 32])
    let bnWeight = Tensor.ones([16]).requiringGrad(), bnBias = Tensor.zeros([16]).requiringGrad()
    let runningMean = Tensor.zeros([16]), runningVariance = Tensor.ones([16])
    let bnBoth = time(reps: reps) {
        (images.batchNorm(weight: bnWeight, bias: bnBias, runningMean: runningMean, runningVariance: runningVariance,
                          training: true) * imageGrad).sum().backward()
    }
    let label = n == 1 << 20 ? "1M" : "16M"
    for (name, t) in [("add", add), ("mul", mul), ("gelu", gelu), ("exp", exp), ("softmax", soft),
                      ("softmax fwd+bwd", softBoth), ("layerNorm fwd+bwd", lnBoth), ("batchNorm fwd+bwd", bnBoth)] {
        record("\(name) \(label)", t)
    }
    print(String(format: "  %8d: softmax forward + backward %.2f ms, LayerNorm (rows of 1024) forward + backward %.2f ms",
                 n, softBoth * 1e3, lnBoth * 1e3))
    print(String(format: "  %8d: add %6.1f GB/s, mul %6.1f GB/s, exp %6.1f GB/s, gelu %6.1f GB/s (%.2f ns/elem), softmax rows of 1024 %6.1f GB/s",
                 n, 3 * bytes / add * 1e-9, 3 * bytes / mul * 1e-9, 2 * bytes / exp * 1e-9, 2 * bytes / gelu * 1e-9,
                 gelu / Double(n) * 1e9, 2 * bytes / soft * 1e-9))
}

}

if wants("overhead") {
print("\nper-op overhead: chain of 1,000 elementwise ops on 16 elements, tape recording")
do {
    let x = Tensor.randomNormal([16], using: &rng).requiringGrad()
    let t = time(reps: 20) {
        var y = x
        for i in 0..<1000 { y = i % 2 == 0 ? y * 1.0001 : y + 0.5 }
        _ = y
    }
    let tb = time(reps: 20) {
        var y = x
        for i in 0..<1000 { y = i % 2 == 0 ? y * 1.0001 : y + 0.5 }
        y.sum().backward()
    }
    record("per-op overhead forward (per op)", t / 1000)
    record("per-op overhead forward+backward (per op)", tb / 1000)
    print(String(format: "  forward %.2f µs/op, forward + backward %.2f µs/op", t * 1e3, tb * 1e3))
}
}

if wants("vmf") {
    print("\nvMF normalizer log C_p(κ): the large-order approximation against the exact form, κ ∈ [1, 1e4]")
    print("(2,001 log-spaced κ; value error after removing the best constant; derivative error absolute)")
    print("|    p | max value error | max derivative error |")
    print("|-----:|----------------:|---------------------:|")
    for p in [16, 64, 256, 1024] {
        let kappas = (0...2000).map { Foundation.pow(10, 4 * Double($0) / 2000) }
        let d = kappas.map { vmfLogNormalizer(dimension: p, kappa: $0) - vmfLogNormalizer(dimension: p, kappa: $0, approximation: .exact) }
        let dd = kappas.map {
            Swift.abs(vmfLogNormalizerDerivative(dimension: p, kappa: $0) - vmfLogNormalizerDerivative(dimension: p, kappa: $0, approximation: .exact))
        }
        print(String(format: "| %4d | %15.3e | %20.3e |", p, (d.max()! - d.min()!) / 2, dd.max()!))
    }
    print("\nvMF normalizer speed: K = 65,536 values of κ (log-uniform in [1e-2, 1e4]), p = 256, Float32 tensor op")
    let kappa = Tensor.randomUniform([65536], low: -2, high: 4, dtype: .float64, using: &rng)
        .mapValues { Foundation.pow(10, $0) }.to(.float32).requiringGrad()
    for (name, mode) in [("approximate", VMFNormalizerApproximation.largeOrder), ("exact", .exact)] {
        let forward = time(reps: 50) { _ = kappa.vmfLogNormalizer(dimension: 256, approximation: mode) }
        let both = time(reps: 50) { kappa.vmfLogNormalizer(dimension: 256, approximation: mode).sum().backward() }
        record("vMF log C_p \(name) fwd (65,536 κ)", forward)
        record("vMF log C_p \(name) fwd+bwd (65,536 κ)", both)
        print(String(format: "  %@: forward %.3f ms (%.1f ns/value), forward + backward %.3f ms",
                     name, forward * 1e3, forward / 65536 * 1e9, both * 1e3))
    }
}

if wants("vit") {
    print("\nViT student forward + backward with a DINO head (no teacher, no optimizer), Float32, median of 5 after 1 warm-up")
    for (name, config, batch, globalSize, localSize, locals, head) in [
        ("ref-micro", ViTConfiguration.refMicro, 32, 28, 14, 4, (256, 64, 512)),
        ("ref-tiny", ViTConfiguration.refTiny, 64, 32, 16, 6, (1024, 256, 4096)),
    ] {
        var g = RandomGenerator(seed: 3)
        let vit = VisionTransformer(config, using: &g)
        let dino = DINOHead(inFeatures: config.width, prototypes: head.2, hidden: head.0, bottleneck: head.1, normLastLayer: false, using: &g)
        let globals = Tensor.randomNormal([2 * batch, config.channels, globalSize, globalSize], using: &g)
        let localCrops = Tensor.randomNormal([locals * batch, config.channels, localSize, localSize], using: &g)
        let t = time(reps: 5) {
            vit.zeroGrad(); dino.zeroGrad()
            let a = dino(vit(globals).cls).logits.logSoftmax().mean()
            let b = dino(vit(localCrops).cls).logits.logSoftmax().mean()
            (a + b).backward()
        }
        print(String(format: "  %@: %.1f ms per step (batch %d, 2 global + %d local crops)", name, t * 1e3, batch, locals))
    }
}

if wants("step") || sections.contains(where: { $0.hasPrefix("ref-") }) {
    print("\nReference training steps of BENCHMARKS.md (teacher, student fwd+bwd, DINO-vMF loss, clipping, AdamW, EMA), median of 5 after 1 warm-up")
    for w in [ReferenceStep.Workload.refMicro, .refTiny, .refResNet, .refIBOTMicro] where wants("step") || sections.contains(w.name) {
        let step = ReferenceStep(w)
        let t = time(reps: w.name == "ref-tiny" ? 5 : 9) { step.step() }
        record("\(w.name) training step", t)
        if w.name == "ref-micro" || w.name == "ref-tiny" {
            record("\(w.name) peak resident MB", Double(ProcessMemory.peakResidentBytes) / 1_048_576)
        }
        print(String(format: "  %@ (%d student parameters): %.1f ms per step, %.0f images/s, peak resident %.0f MB", w.name,
                     step.parameterCount, t * 1e3, Double(w.batch) / t, Double(ProcessMemory.peakResidentBytes) / 1_048_576))
    }
}

if sections.contains("allreduce") {
    // The gradient allreduce of data-parallel training (Distributed.averageGradients, what the
    // trainer calls after backward) on the student of DINO's ViT-S/16 and ViT-B/16 at 224 px
    // with DINO's head (hidden 2048, bottleneck 256, 65,536 prototypes): timed over the ranks
    // of this mpirun, and estimated for a network with a ring allreduce, which sends and
    // receives 2(N − 1)/N times the gradients' bytes per rank and step.
    let n = Distributed.size
    print("Gradient allreduce (Distributed.averageGradients), \(n) process\(n == 1 ? "" : "es") on this machine; ring estimates for N = 8 ranks")
    if n == 1 { print("  (run under mpirun -np 2 to time the allreduce here; the estimates below need no MPI)") }
    for (name, width, depth, heads) in [("ViT-S/16", 384, 12, 6), ("ViT-B/16", 768, 12, 12)] {
        var g = RandomGenerator(seed: 4)
        let vit = VisionTransformer(ViTConfiguration(imageSize: 224, patchSize: 16, channels: 3, width: width, depth: depth, heads: heads), using: &g)
        let head = DINOHead(inFeatures: width, prototypes: 65536, hidden: 2048, bottleneck: 256, normLastLayer: false, using: &g)
        let parameters = vit.parameters + head.parameters
        let count = parameters.reduce(0) { $0 + $1.count }
        let bytes = Double(count * 4)
        var measured = ""
        if n > 1 {
            for p in parameters { p.grad = Tensor.full(p.shape, 1, dtype: p.dtype) }
            // As the trainer does: one averager kept across steps (its buckets allocated once);
            // timed: packing, the allreduces and the means, after one warm-up.
            let averager = GradientAverager(parameters: parameters)
            var samples: [Double] = []
            for rep in 0..<6 {
                for p in parameters { p.grad = Tensor.full(p.shape, 1, dtype: p.dtype) }
                let start = DispatchTime.now().uptimeNanoseconds
                averager.finish()
                if rep > 0 { samples.append(Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9) }
            }
            let t = median(samples)
            record("\(name) gradient allreduce, \(n) ranks", t)
            measured = String(format: "; measured here: %.0f ms per step (%.1f GB/s of gradients)", t * 1e3, bytes / t / 1e9)
        }
        let ring = 2 * 7.0 / 8 * bytes
        print(String(format: "  %@ + DINO head: %.1f M parameters, %.0f MB of Float32 gradients%@", name, Double(count) / 1e6, bytes / 1e6, measured))
        print(String(format: "    ring allreduce per step: %.0f ms at 10 Gb/s, %.0f ms at 100 Gb/s", ring / (10e9 / 8) * 1e3, ring / (100e9 / 8) * 1e3))
    }
}

if sections.contains("ddp-step") {
    // A DINO-vMF training step of ViT-S/16 at 224 pixels with DINO's head (hidden 2048,
    // bottleneck 256, 65,536 prototypes), 2 global 224² + 10 local 96² crops of random images,
    // `KAPPA_DDP_BATCH` images per process (default 1), through the trainer: with the gradient
    // allreduce started bucket by bucket during backward, and after it.
    let batch = ProcessInfo.processInfo.environment["KAPPA_DDP_BATCH"].flatMap { Int($0) } ?? 1
    var c = DINOConfiguration()
    c.backbone = .vit(ViTConfiguration(imageSize: 224, patchSize: 16, channels: 3, width: 384, depth: 12, heads: 6))
    (c.prototypes, c.headHidden, c.bottleneck, c.batchSize) = (65536, 2048, 256, batch)
    c.loss.dimension = 256
    (c.augmentation.globalSize, c.augmentation.localSize, c.augmentation.localCrops) = (224, 96, 10)
    let trainer = try! TeacherStudentTrainer(configuration: c, iterationsPerEpoch: 100)
    var g = RandomGenerator(seed: 5)
    let views = (0..<12).map { v in Tensor.randomUniform([batch, 3, v < 2 ? 224 : 96, v < 2 ? 224 : 96], using: &g) }
    print("ViT-S/16 DINO-vMF step through the trainer, \(Distributed.size) process(es) × \(batch) image(s), \(Threads.count) thread(s) each, median of 3 after 1 warm-up")
    for overlap in [true, false] {
        trainer.overlapsGradientAveraging = overlap
        let t = time(reps: 3) { trainer.step(ObjectiveBatch(views: views)) }
        record("ViT-S/16 step, \(Distributed.size) ranks, overlap \(overlap)", t)
        print(String(format: "  allreduce %@: %.2f s per step", overlap ? "during backward" : "after backward ", t))
    }
}

if wants("memory") {
    // Memory flatness: 2,000 ref-micro steps; resident memory after warm-up must not grow.
    let steps = Int(ProcessInfo.processInfo.environment["KAPPA_MEMORY_STEPS"] ?? "") ?? 2000
    print("\nResident memory over \(steps) ref-micro training steps")
    let step = ReferenceStep(.refMicro)
    var samples: [(Int, Double)] = []
    let start = Date()
    for i in 1...steps {
        step.step()
        if i == 1 || i % (steps / 10) == 0 {
            samples.append((i, Double(ProcessMemory.residentBytes) / 1_048_576))
            print(String(format: "  step %5d: resident %.1f MB (%.0f s)", i, samples.last!.1, Date().timeIntervalSince(start)))
        }
    }
    let afterWarmup = samples.filter { $0.0 >= steps / 10 }.map(\.1)
    print(String(format: "  after warm-up (step %d on): min %.1f MB, max %.1f MB, growth %.1f MB; buffer pool %d hits, %d misses",
                 steps / 10, afterWarmup.min()!, afterWarmup.max()!, afterWarmup.last! - afterWarmup.first!,
                 BufferPool.shared.hits, BufferPool.shared.misses))
}

extension Tensor {
    func mapValues(_ f: (Double) -> Double) -> Tensor { Tensor(scalars(as: Double.self).map(f), shape: shape, dtype: dtype) }
}
