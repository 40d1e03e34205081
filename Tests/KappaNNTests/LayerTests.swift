import Foundation
import Kappa
import KappaNN
import Testing

func randn(_ shape: [Int], seed: UInt64) -> Tensor {
    var g = RandomGenerator(seed: seed)
    return Tensor.randomNormal(shape, dtype: .float64, using: &g)
}

/// gradcheck of `f` with respect to the input and every parameter of `module`.
func expectLayerGradients(_ module: Module, _ x: Tensor, mode: GradcheckMode = .full,
                          sourceLocation: SourceLocation = #_sourceLocation, _ f: @escaping (Tensor) -> Tensor) {
    let params = module.parameters.filter(\.requiresGrad)
    let report = gradcheck([x] + params, mode: mode) { f($0[0]) }
    #expect(report.passed, "\(report)", sourceLocation: sourceLocation)
    #expect(report.entries.count == 1 + params.count, sourceLocation: sourceLocation)
}

@Suite("KappaNN layers: names, modes, gradients (Float64)")
struct LayerTests {
    @Test func parameterNamesFollowThePath() {
        var g = RandomGenerator(seed: 0)
        let vit = VisionTransformer(.refMicro, using: &g)
        let names = vit.namedParameters().map(\.name)
        #expect(names.first == "patchWeight")
        #expect(names.contains("blocks.3.attn.qkv.weight"))
        #expect(names.contains("blocks.0.mlp.fc2.bias"))
        #expect(names.last == "norm.bias")
        #expect(!names.contains { $0.contains("maskToken") })
        // ref-micro: patch embed 64·49 + 64, cls 64, pos 17·64, 4 blocks of (2·128 LN + qkv 64·192+192 + proj 64·64+64
        // + fc1 64·256+256 + fc2 256·64+64), final LN 128.
        let block = 2 * 128 + (64 * 192 + 192) + (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64)
        #expect(vit.parameterCount == 64 * 49 + 64 + 64 + 17 * 64 + 4 * block + 128)
        let bn = BatchNorm1d(4)
        #expect(bn.namedBuffers().map(\.name) == ["runningMean", "runningVar"])
        let head = DINOHead(inFeatures: 8, prototypes: 16, hidden: 12, bottleneck: 4, using: &g)
        #expect(head.namedParameters().map(\.name).suffix(2) == ["lastLayerDirection", "lastLayerScale"])
        #expect(!head.lastLayerScale.requiresGrad, "normLastLayer fixes g")
    }

    @Test func trainEvalAndCopy() {
        var g = RandomGenerator(seed: 1)
        let a = MLP(4, hidden: 8, dropout: 0.5, using: &g), b = MLP(4, hidden: 8, dropout: 0.5, using: &g)
        a.eval()
        #expect(!a.isTraining && !a.fc1.isTraining && !(a.drop!.isTraining))
        b.copyParameters(from: a)
        for (p, q) in zip(a.parameters, b.parameters) { #expect(p.scalars(as: Float.self) == q.scalars(as: Float.self)) }
        let x = Tensor.randomNormal([3, 4], using: &g)
        b.eval()
        #expect(a(x).scalars(as: Float.self) == b(x).scalars(as: Float.self))
        a.setRequiresGrad(false) { $0.hasPrefix("fc1") }
        #expect(!a.fc1.weight.requiresGrad && a.fc2.weight.requiresGrad)
    }

    @Test func linearLayerNormConv() {
        var g = RandomGenerator(seed: 2)
        let lin = Linear(4, 3, dtype: .float64, using: &g)
        expectLayerGradients(lin, randn([2, 5, 4], seed: 1)) { lin($0) }
        let noBias = Linear(4, 3, bias: false, dtype: .float64, using: &g)
        expectLayerGradients(noBias, randn([4], seed: 2)) { noBias($0) }
        let ln = LayerNorm(6, dtype: .float64)
        ln.weight.assign(randn([6], seed: 3))
        ln.bias.assign(randn([6], seed: 4))
        expectLayerGradients(ln, randn([3, 6], seed: 5)) { ln($0) }
        let conv = Conv2d(2, 3, kernel: Size2(3, 2), stride: 2, padding: 1, dtype: .float64, using: &g)
        expectLayerGradients(conv, randn([2, 2, 5, 4], seed: 6)) { conv($0) }
    }

    @Test func layerNormMatchesDefinition() {
        let x = randn([4, 7], seed: 10)
        let ln = LayerNorm(7, eps: 1e-6, dtype: .float64)
        let mu = x.mean(alongAxes: [1], keepingDims: true)
        let ref = (x - mu) / (x.variance(alongAxes: [1], correction: 0, keepingDims: true) + 1e-6).sqrt()
        let diff = (ln(x) - ref).abs().max().item()
        #expect(diff < 1e-12)
    }

    @Test func batchNorm() {
        let bn1 = BatchNorm1d(3, dtype: .float64)
        bn1.weight.assign(randn([3], seed: 11))
        expectLayerGradients(bn1, randn([5, 3], seed: 12)) { bn1($0) }
        expectLayerGradients(bn1, randn([4, 3, 2], seed: 13)) { bn1($0) }
        let bn2 = BatchNorm2d(2, dtype: .float64)
        expectLayerGradients(bn2, randn([3, 2, 2, 3], seed: 14)) { bn2($0) }
        // Running statistics: momentum 0.1 towards the batch mean and unbiased variance.
        let fresh = BatchNorm1d(2, dtype: .float64)
        let x = Tensor(rows: [[1.0, 10], [3, 20]])
        _ = fresh(x)
        #expect(fresh.runningMean.scalars(as: Double.self) == [0.2, 1.5])
        let v = fresh.runningVar.scalars(as: Double.self)
        #expect(Swift.abs(v[0] - (0.9 + 0.1 * 2)) < 1e-12 && Swift.abs(v[1] - (0.9 + 0.1 * 50)) < 1e-12)
        fresh.eval()
        expectLayerGradients(fresh, randn([4, 2], seed: 15)) { fresh($0) }
    }

    @Test func dropoutAndDropPath() {
        let drop = Dropout(0.3, seed: 7)
        expectLayerGradients(drop, randn([3, 4], seed: 16)) { x in
            drop.generator = RandomGenerator(seed: 7)  // the same mask on every evaluation
            return drop(x)
        }
        let path = DropPath(0.5, seed: 8)
        expectLayerGradients(path, randn([6, 2, 3], seed: 17)) { x in
            path.generator = RandomGenerator(seed: 8)
            return path(x)
        }
        let y = path(Tensor.ones([1000, 2], dtype: .float64)).scalars(as: Double.self)
        #expect(y.allSatisfy { $0 == 0 || $0 == 2 })
        let rows = stride(from: 0, to: y.count, by: 2).map { y[$0] == y[$0 + 1] }
        #expect(rows.allSatisfy { $0 }, "DropPath drops whole samples")
        path.eval()
        #expect(path(Tensor.ones([3])).scalars(as: Float.self) == [1, 1, 1])
    }

    @Test func mlpAttentionBlock() {
        var g = RandomGenerator(seed: 3)
        let gelu = GELU(), geluTanh = GELU(approximate: true)
        expectLayerGradients(gelu, randn([2, 3], seed: 19)) { gelu($0) }
        expectLayerGradients(geluTanh, randn([2, 3], seed: 18)) { geluTanh($0) }
        let mlp = MLP(4, hidden: 6, dtype: .float64, using: &g)
        expectLayerGradients(mlp, randn([2, 4], seed: 20)) { mlp($0) }
        let attn = Attention(6, heads: 2, dtype: .float64, using: &g)
        expectLayerGradients(attn, randn([2, 3, 6], seed: 21)) { attn($0) }
        let block = TransformerBlock(4, heads: 2, mlpRatio: 2, dtype: .float64, using: &g)
        expectLayerGradients(block, randn([2, 3, 4], seed: 22), mode: .fast) { block($0) }
    }

    @Test func visionTransformerWithAConvolutionalStem() {
        var g = RandomGenerator(seed: 5)
        let config = ViTConfiguration(imageSize: 8, patchSize: 4, channels: 2, width: 8, depth: 1, heads: 2, mlpRatio: 2,
                                      maskToken: true, convolutionalStem: [3, 4])
        let vit = VisionTransformer(config, dtype: .float64, using: &g)
        #expect(vit.namedParameters().map(\.name).prefix(4) == ["patchWeight", "patchBias", "stem.0.weight", "stem.1.weight"])
        #expect(vit.patchWeight.shape == [8, 4, 1, 1] && vit.stem.count == 2)
        vit.maskToken!.assign(randn([1, 1, 8], seed: 40))
        let images = randn([3, 2, 8, 8], seed: 41)
        let (cls, patches) = vit(images)
        #expect(cls.shape == [3, 8] && patches.shape == [3, 4, 8])
        // Gradients through the stem's convolutions, BatchNorms (batch statistics) and the projection.
        expectLayerGradients(vit, images, mode: .fast) { vit($0).cls }
        let mask = Tensor([1.0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1, 0], shape: [3, 4])
        expectLayerGradients(vit, images, mode: .fast) { vit($0, mask: mask).patches }
        // A 12×12 crop: 3×3 tokens, the positional embedding resized.
        #expect(vit(randn([2, 2, 12, 12], seed: 42)).patches.shape == [2, 9, 8])
    }

    @Test func visionTransformerWithAPatchStem() {
        var g = RandomGenerator(seed: 6)
        let config = ViTConfiguration(imageSize: 8, patchSize: 4, channels: 2, width: 8, depth: 1, heads: 2, mlpRatio: 2,
                                      maskToken: true, patchStem: [3])
        let vit = VisionTransformer(config, dtype: .float64, using: &g)
        #expect(vit.patchWeight.shape == [8, 3, 4, 4] && vit.stem.count == 1 && vit.stem[0].weight.shape == [3, 2, 3, 3])
        vit.maskToken!.assign(randn([1, 1, 8], seed: 43))
        let images = randn([3, 2, 8, 8], seed: 44)
        let (cls, patches) = vit(images)
        #expect(cls.shape == [3, 8] && patches.shape == [3, 4, 8])
        // The tokens are the patch projection of the stem's feature maps.
        let features = withoutGradients { vit.stemNorms[0](vit.stem[0](images), applyingReLU: true) }
        let tokens = features.unfoldPatches(size: 4).matmul(vit.patchWeight.reshape([8, 48]).transposed()) + vit.patchBias
        let fromTokens = withoutGradients {
            var x = Tensor.concat([vit.clsToken.expanded(to: [3, 1, 8]), tokens], alongAxis: 1) + vit.positionEmbedding
            for block in vit.blocks { x = block(x) }
            return vit.norm(x).select(alongAxis: 1, index: 0)
        }
        let difference = zip(cls.scalars(as: Double.self), fromTokens.scalars(as: Double.self)).map { Swift.abs($0 - $1) }.max()!
        #expect(difference < 1e-14, "[CLS] from the stem's tokens differs by \(difference)")
        // Gradients through the stride-1 convolution, its BatchNorm and the patch projection.
        expectLayerGradients(vit, images, mode: .fast) { vit($0).cls }
        let mask = Tensor([1.0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1, 0], shape: [3, 4])
        expectLayerGradients(vit, images, mode: .fast) { vit($0, mask: mask).patches }
        #expect(vit(randn([2, 2, 12, 12], seed: 45)).patches.shape == [2, 9, 8])
    }

    @Test func visionTransformer() {
        var g = RandomGenerator(seed: 4)
        let config = ViTConfiguration(imageSize: 8, patchSize: 4, channels: 2, width: 8, depth: 2, heads: 2, mlpRatio: 2,
                                      maskToken: true)
        let vit = VisionTransformer(config, dtype: .float64, using: &g)
        vit.maskToken!.assign(randn([1, 1, 8], seed: 30))
        let images = randn([2, 2, 8, 8], seed: 31)
        let (cls, patches) = vit(images)
        #expect(cls.shape == [2, 8] && patches.shape == [2, 4, 8])
        expectLayerGradients(vit, images, mode: .fast) { vit($0).cls }
        // A 12×12 crop has 9 patches: the positional embedding is resized bicubically.
        let local = randn([1, 2, 12, 12], seed: 32)
        #expect(vit(local).patches.shape == [1, 9, 8])
        expectLayerGradients(vit, local, mode: .fast) { vit($0).patches.sum(alongAxis: 1) }
        // Masked patches see the mask token instead of their embedding.
        let mask = Tensor([1.0, 0, 0, 1, 0, 0, 0, 0], shape: [2, 4])
        expectLayerGradients(vit, images, mode: .fast) { vit($0, mask: mask).patches }
        let changed = vit(images, mask: mask).patches, plain = vit(images).patches
        #expect((changed - plain).abs().sum().item() > 0)
        let maps = vit.lastSelfAttention(images)
        #expect(maps.shape == [2, 2, 5, 5])
        let rowSums = maps.sum(alongAxis: -1).scalars(as: Double.self)
        #expect(rowSums.allSatisfy { Swift.abs($0 - 1) < 1e-12 })
    }

    @Test func refMicroStepAllocatesFromThePoolAfterTheFirst() async {
        // In a child process, so that no other test shares the buffer pool.
        await #expect(processExitsWith: .success) {
            var g = RandomGenerator(seed: 6)
            let vit = VisionTransformer(.refMicro, using: &g)
            let head = DINOHead(inFeatures: 64, prototypes: 512, hidden: 256, bottleneck: 64, normLastLayer: false, using: &g)
            let images = Tensor.randomNormal([8, 1, 28, 28], using: &g), local = Tensor.randomNormal([8, 1, 14, 14], using: &g)
            func step() {
                vit.zeroGrad(); head.zeroGrad()
                let out = head(vit(images).cls).logits.logSoftmax().mean() + head(vit(local).cls).logits.logSoftmax().mean()
                out.backward()
            }
            step()
            step()
            let misses = BufferPool.shared.misses
            for _ in 0..<3 { step() }
            exit(BufferPool.shared.misses == misses ? 0 : 1)
        }
    }

    /// The default DINOvMF backbone (ResNet-8 on 28² and 14² crops: every convolution a kind the
    /// direct AVX-512 kernels run) gives the same features and parameter gradients through
    /// the direct kernels as through im2col and BLAS, to Float32 rounding.
    @Test func resNetThroughTheDirectConvolution() throws {
        try #require(HostKernels.hasDirectConvolution, "the direct kernels need AVX-512 (this CPU: \(HostKernels.vectorLevel))")
        for size in [28, 14] {
            func run(direct: Bool) -> (features: [Float], gradients: [[Float]]) {
                HostKernels.withDirectConvolution(direct) {
                    var g = RandomGenerator(seed: 7)
                    let resnet = ResNet(channels: 1, width: 8, using: &g)
                    let x = Tensor.randomNormal([6, 1, size, size], using: &g)
                    let y = resnet(x)
                    (y * Tensor.randomNormal(y.shape, using: &g)).sum().backward()
                    return (y.scalars(as: Float.self), resnet.parameters.map { $0.grad!.scalars(as: Float.self) })
                }
            }
            let (direct, blas) = (run(direct: true), run(direct: false))
            func worst(_ a: [Float], _ e: [Float]) -> Float {
                zip(a, e).map { abs($0 - $1) }.max()! / max(e.map(abs).max()!, 1e-30)
            }
            #expect(worst(direct.features, blas.features) < 1e-4, "features at \(size)²")
            for (i, (a, e)) in zip(direct.gradients, blas.gradients).enumerated() {
                #expect(worst(a, e) < 1e-3, "gradient of parameter \(i) at \(size)²")
            }
        }
    }

    @Test func resNetAndHead() {
        var g = RandomGenerator(seed: 5)
        let resnet = ResNet(channels: 1, width: 2, blocksPerStage: [1, 1], dtype: .float64, using: &g)
        let x = randn([2, 1, 6, 6], seed: 40)
        #expect(resnet(x).shape == [2, 4])
        expectLayerGradients(resnet, x, mode: .fast) { resnet($0) }
        let head = DINOHead(inFeatures: 4, prototypes: 5, hidden: 6, bottleneck: 3, batchNorm: true, normLastLayer: false,
                            dtype: .float64, using: &g)
        head.lastLayerScale.assign(randn([5, 1], seed: 41).abs() + 0.5)
        let h = randn([3, 4], seed: 42)
        expectLayerGradients(head, h) { head($0).logits }
        // ⟨w_k, y⟩ with ‖w_k‖ = g_k and ‖y‖ = 1: |logit| ≤ norm.
        let out = head(h)
        let norms = out.prototypeNorms.scalars(as: Double.self)
        #expect(norms == head.lastLayerScale.scalars(as: Double.self).map { Swift.abs($0) })
        let logits = out.logits.scalars(as: Double.self)
        for (i, l) in logits.enumerated() { #expect(Swift.abs(l) <= norms[i % 5] + 1e-12) }
        let y = out.embedding.norm(2, alongAxes: [1]).scalars(as: Double.self)
        #expect(y.allSatisfy { Swift.abs($0 - 1) < 1e-12 })
    }
}
