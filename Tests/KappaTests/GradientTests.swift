import Foundation
import Kappa
import Testing

/// Every differentiable op against central finite differences in Float64, with broadcast
/// operands and non-contiguous (transposed, sliced) inputs.
@Suite("Gradients of every op (gradcheck, Float64)")
struct GradientTests {
    // MARK: Elementwise

    struct Unary: CustomTestStringConvertible, Sendable {
        let name: String
        let domain: Domain
        let f: @Sendable (Tensor) -> Tensor
        var testDescription: String { name }
        enum Domain { case real, positive, awayFromZero, belowOne }
    }

    static let unaries: [Unary] = [
        .init(name: "neg", domain: .real) { -$0 },
        .init(name: "sqrt", domain: .positive) { $0.sqrt() },
        .init(name: "rsqrt", domain: .positive) { $0.rsqrt() },
        .init(name: "exp", domain: .real) { $0.exp() },
        .init(name: "log", domain: .positive) { $0.log() },
        .init(name: "log1p", domain: .positive) { $0.log1p() },
        .init(name: "expm1", domain: .real) { $0.expm1() },
        .init(name: "abs", domain: .awayFromZero) { $0.abs() },
        .init(name: "sin", domain: .real) { $0.sin() },
        .init(name: "cos", domain: .real) { $0.cos() },
        .init(name: "tanh", domain: .real) { $0.tanh() },
        .init(name: "sigmoid", domain: .real) { $0.sigmoid() },
        .init(name: "relu", domain: .awayFromZero) { $0.relu() },
        .init(name: "gelu", domain: .real) { $0.gelu() },
        .init(name: "gelu_tanh", domain: .real) { $0.gelu(approximate: true) },
        .init(name: "softplus", domain: .real) { $0.softplus() },
        .init(name: "softplus(beta 2)", domain: .real) { $0.softplus(beta: 2) },
        .init(name: "clamp", domain: .awayFromZero) { $0.clamped(min: -0.05, max: 0.05) + $0.clamped(min: -1.1) },
        .init(name: "pow 3", domain: .real) { $0.pow(3) },
        .init(name: "pow -2", domain: .awayFromZero) { $0.pow(-2) },
        .init(name: "pow 0.7", domain: .positive) { $0.pow(0.7) },
        .init(name: "reciprocal", domain: .awayFromZero) { $0.reciprocal() },
        .init(name: "scalar ops", domain: .awayFromZero) { 2 - ($0 + 1) * 3 / 4 + 5 / $0 - $0 * 0.5 },
    ]

    static func input(_ domain: Unary.Domain, _ shape: [Int], seed: UInt64) -> Tensor {
        switch domain {
        case .real: return randn(shape, seed: seed)
        case .positive: return randu(shape, 0.5, 2, seed: seed)
        case .awayFromZero: return awayFromZero(shape, seed: seed)
        case .belowOne: return randu(shape, -0.9, 0.9, seed: seed)
        }
    }

    @Test(arguments: unaries)
    func unary(_ op: Unary) {
        expectGradients([Self.input(op.domain, [3, 4], seed: 1)]) { op.f($0[0]) }
        // Non-contiguous input: a transposed view.
        expectGradients([Self.input(op.domain, [4, 3], seed: 2).transposed()]) { op.f($0[0]) }
    }

    struct Binary: CustomTestStringConvertible, Sendable {
        let name: String
        let f: @Sendable (Tensor, Tensor) -> Tensor
        var testDescription: String { name }
    }

    static let binaries: [Binary] = [
        .init(name: "add") { $0 + $1 },
        .init(name: "sub") { $0 - $1 },
        .init(name: "mul") { $0 * $1 },
        .init(name: "div") { $0 / $1 },
        .init(name: "pow") { $0.abs().pow($1) },
        .init(name: "minimum") { Tensor.minimum($0, $1) },
        .init(name: "maximum") { Tensor.maximum($0, $1) },
    ]

    @Test(arguments: binaries)
    func binary(_ op: Binary) {
        // Same shape, broadcast both ways, and a sliced (strided) operand.
        expectGradients([awayFromZero([2, 3], seed: 3), awayFromZero([2, 3], seed: 4)]) { op.f($0[0], $0[1]) }
        expectGradients([awayFromZero([2, 1, 3], seed: 5), awayFromZero([4, 1], seed: 6)]) { op.f($0[0], $0[1]) }
        expectGradients([awayFromZero([3], seed: 7), awayFromZero([2, 3], seed: 8)]) { op.f($0[0], $0[1]) }
        expectGradients([awayFromZero([4, 6], seed: 9).slice(alongAxis: 1, from: 1, by: 2), awayFromZero([1], seed: 10)]) {
            op.f($0[0], $0[1])
        }
    }

    @Test func minimumMaximumTiesSplitGradient() {
        let a = Tensor([1.0, 2]).requiringGrad(), b = Tensor([1.0, 3]).requiringGrad()
        Tensor.maximum(a, b).sum().backward()
        #expect(a.grad!.doubles == [0.5, 0] && b.grad!.doubles == [0.5, 1])
    }

    @Test func whereAndMaskedFill() {
        let cond = Tensor([1.0, 0, 1, 0, 0, 1], shape: [2, 3])
        expectGradients([randn([2, 3], seed: 11), randn([3], seed: 12)]) { Tensor.where(cond, $0[0], $0[1]) }
        expectGradients([randn([2, 3], seed: 13)]) { $0[0].maskedFill(cond, -5) * $0[0] }
    }

    // MARK: Reductions

    @Test func reductions() {
        let x = randn([3, 4, 5], seed: 20)
        for axes in [[0], [1], [2], [0, 2], [1, 2], [0, 1, 2]] {
            for keep in [false, true] {
                expectGradients([x]) { $0[0].sum(alongAxes: axes, keepingDims: keep) }
                expectGradients([x]) { $0[0].mean(alongAxes: axes, keepingDims: keep) }
                expectGradients([x]) { $0[0].max(alongAxes: axes, keepingDims: keep) }
                expectGradients([x]) { $0[0].min(alongAxes: axes, keepingDims: keep) }
                expectGradients([x]) { $0[0].variance(alongAxes: axes, keepingDims: keep) }
                expectGradients([x]) { $0[0].standardDeviation(alongAxes: axes, keepingDims: keep) }
                expectGradients([x]) { $0[0].logSumExp(alongAxes: axes, keepingDims: keep) }
                expectGradients([x]) { $0[0].norm(2, alongAxes: axes, keepingDims: keep) }
            }
        }
        expectGradients([x]) { $0[0].norm(3, alongAxes: [1]) }
        expectGradients([x]) { $0[0].norm(1.5) }
        expectGradients([x.permuted([2, 0, 1])]) { $0[0].sum(alongAxes: [0]) * $0[0].max(alongAxis: 1, keepingDims: true) }
        expectGradients([x]) { $0[0].variance(alongAxes: [1], correction: 0) }
    }

    @Test func normAtZeroHasZeroGradient() {
        let x = Tensor.zeros([2, 3], dtype: .float64).requiringGrad()
        x.norm(2, alongAxes: [1]).sum().backward()
        #expect(x.grad!.doubles == [0, 0, 0, 0, 0, 0])
    }

    @Test func maxGradientIsSharedAmongTiesOverAllAxes() {
        let x = Tensor([1.0, 5, 5, 2]).requiringGrad()
        x.max().backward()
        #expect(x.grad!.doubles == [0, 0.5, 0.5, 0])
        let y = Tensor([1.0, 5, 5, 2]).requiringGrad()
        y.max(alongAxis: 0).backward()
        #expect(y.grad!.doubles == [0, 1, 0, 0])
    }

    // MARK: Softmax family

    @Test func softmaxFamily() {
        let x = randn([3, 5], seed: 30)
        for axis in [0, 1, -1] {
            expectGradients([x]) { $0[0].softmax(alongAxis: axis) }
            expectGradients([x]) { $0[0].logSoftmax(alongAxis: axis) }
            expectGradients([x]) { $0[0].l2Normalized(alongAxis: axis) }
        }
        let x3 = randn([2, 3, 4], seed: 31)
        expectGradients([x3]) { $0[0].softmax(alongAxis: 1) }
        expectGradients([x3.transposed(0, 2)]) { $0[0].logSoftmax(alongAxis: 1) }
        let targets = randn([3, 5], seed: 32).softmax(alongAxis: 1)
        expectGradients([x, targets]) { Tensor.crossEntropy(logits: $0[0], targetProbabilities: $0[1]) }
        expectGradients([x]) { Tensor.crossEntropy(logits: $0[0], labels: [4, 0, 2]) }
    }

    @Test func layerNorm() {
        let x = randn([3, 5], seed: 33), w = randn([5], seed: 34), b = randn([5], seed: 35)
        expectGradients([x, w, b]) { $0[0].layerNorm(weight: $0[1], bias: $0[2], eps: 1e-5) }
        expectGradients([randn([2, 5, 3], seed: 36).transposed(1, 2)]) { $0[0].layerNorm(weight: nil, bias: nil) }
        expectGradients([x, w]) { $0[0].layerNorm(weight: $0[1], bias: nil) }
        expectGradients([x, b]) { $0[0].layerNorm(weight: nil, bias: $0[1]) }
    }

    // MARK: Linear algebra

    @Test func matmul() {
        expectGradients([randn([3, 4], seed: 40), randn([4, 2], seed: 41)]) { $0[0].matmul($0[1]) }
        // Transposed views go to BLAS with transpose flags.
        expectGradients([randn([4, 3], seed: 42).transposed(), randn([2, 4], seed: 43).transposed()]) { $0[0].matmul($0[1]) }
        expectGradients([randn([4], seed: 44), randn([4], seed: 45)]) { $0[0].matmul($0[1]) }
        expectGradients([randn([4], seed: 46), randn([4, 3], seed: 47)]) { $0[0].matmul($0[1]) }
        expectGradients([randn([3, 4], seed: 48), randn([4], seed: 49)]) { $0[0].matmul($0[1]) }
        // Batched, with broadcast batch dimensions and a shared right operand.
        expectGradients([randn([2, 1, 3, 4], seed: 50), randn([3, 4, 2], seed: 51)]) { $0[0].matmul($0[1]) }
        expectGradients([randn([2, 3, 4], seed: 52), randn([4, 5], seed: 53)]) { $0[0].matmul($0[1]) }
        expectGradients([randn([3, 4], seed: 54), randn([2, 4, 5], seed: 55)]) { $0[0].matmul($0[1]) }
        expectGradients([randn([2, 4, 3], seed: 56).transposed(), randn([2, 5, 4], seed: 57).transposed()]) {
            $0[0].matmul($0[1])
        }
    }

    @Test func linear() {
        // x·Wᵀ + b as one op: rows, a batch of rows, a single row, a transposed view, no bias;
        // and equal to the product plus the broadcast bias.
        let w = randn([3, 4], seed: 70), b = randn([3], seed: 71)
        expectGradients([randn([5, 4], seed: 72), w, b]) { Tensor.linear($0[0], weight: $0[1], bias: $0[2]) }
        expectGradients([randn([2, 3, 4], seed: 73), w, b]) { Tensor.linear($0[0], weight: $0[1], bias: $0[2]) }
        expectGradients([randn([4], seed: 74), w, b]) { Tensor.linear($0[0], weight: $0[1], bias: $0[2]) }
        expectGradients([randn([4, 5], seed: 75).transposed(), randn([4, 3], seed: 76).transposed()]) {
            Tensor.linear($0[0], weight: $0[1])
        }
        for dtype in [DType.float32, .float64] {
            let x = randn([6, 4], seed: 77).to(dtype), wd = w.to(dtype), bd = b.to(dtype)
            let fused = Tensor.linear(x, weight: wd, bias: bd).scalars(as: Double.self)
            let composed = (x.matmul(wd.transposed()) + bd).scalars(as: Double.self)
            #expect(zip(fused, composed).allSatisfy { Swift.abs($0 - $1) <= 1e-6 * Swift.max(1, Swift.abs($1)) })
        }
    }

    // MARK: Shape ops

    @Test func shapeOps() {
        let x = randn([2, 3, 4], seed: 60)
        expectGradients([x]) { $0[0].reshape([4, -1]) * Tensor.arange(0, 6, dtype: .float64) }
        expectGradients([x]) { $0[0].permuted([2, 0, 1]).reshape([4, 6]).matmul(Tensor.arange(0, 6, dtype: .float64)) }
        expectGradients([x]) { $0[0].transposed(0, 1).contiguous() * Tensor.arange(0, 4, dtype: .float64) }
        expectGradients([x]) { $0[0].unsqueezed(axis: 1).squeezed(axis: 1).flattened() * 2 }
        expectGradients([randn([3, 1], seed: 61)]) { $0[0].expanded(to: [2, 3, 4]) * x }
        expectGradients([x]) { $0[0].slice(alongAxis: 2, from: 1, to: 4, by: 2).exp() }
        expectGradients([x]) { $0[0][1, .all, .range(0..<3)] * $0[0][0, .all, .from(1)] }
        expectGradients([x, randn([2, 1, 4], seed: 62)]) { Tensor.concat([$0[0], $0[1], $0[0]], alongAxis: 1).exp() }
        expectGradients([x, randn([2, 3, 4], seed: 63)]) { Tensor.stack([$0[0], $0[1]], alongAxis: 2).sin() }
        expectGradients([x]) { t in
            let parts = t[0].split(sizes: [1, 2, 1], alongAxis: 2)
            return parts[0] * parts[2] + parts[1].sum(alongAxis: 2, keepingDims: true)
        }
        expectGradients([x]) { $0[0].chunk(2, alongAxis: 1)[0].tanh() }
        expectGradients([x]) { $0[0].padded([(0, 0), (1, 2), (2, 0)], value: 3).sin() }
        expectGradients([x]) { $0[0].indexSelect(alongAxis: 1, indices: [2, 0, 2]).exp() }
        let index = Tensor([0.0, 2, 1, 1, 3, 0], shape: [2, 3, 1])
        expectGradients([x]) { $0[0].gather(alongAxis: 2, index: index).exp() }
        expectGradients([x, randn([2, 3, 1], seed: 64)]) { $0[0].scatterAdd(alongAxis: 2, index: index, source: $0[1]).sin() }
        expectGradients([randn([2, 3, 4, 6], seed: 65)]) { $0[0].unfoldPatches(size: 2).sin() }
    }

    @Test func dtypeConversionPassesGradientBack() {
        // Finite differences through Float32 rounding are meaningless; check the VJP directly.
        let x = randn([3], seed: 66).requiringGrad()
        (x.to(.float32) * 2).sum().backward()
        #expect(x.grad!.dtype == .float64 && x.grad!.doubles == [2, 2, 2])
    }

    // MARK: Images

    @Test func convolution() {
        expectGradients([randn([2, 2, 5, 6], seed: 70), randn([3, 2, 3, 2], seed: 71), randn([3], seed: 72)]) {
            $0[0].conv2d(weight: $0[1], bias: $0[2], stride: Size2(2, 1), padding: Size2(1, 2), dilation: Size2(1, 2))
        }
        expectGradients([randn([1, 3, 4, 4], seed: 73), randn([2, 3, 2, 2], seed: 74)]) {
            $0[0].conv2d(weight: $0[1], stride: 2)
        }
    }

    @Test func batchNorm() {
        // Training (batch statistics) on [N, C], [N, C, L] and [N, C, H, W], a transposed
        // input, without γ/β, and with the fused ReLU (inputs kept away from the kink).
        let w = randn([3], seed: 75), b = randn([3], seed: 76)
        for shape in [[5, 3], [4, 3, 2], [3, 3, 2, 3]] {
            expectGradients([randn(shape, seed: 77), w, b]) {
                $0[0].batchNorm(weight: $0[1], bias: $0[2], runningMean: nil, runningVariance: nil, training: true)
            }
        }
        expectGradients([randn([2, 4, 3], seed: 78).transposed(1, 2)]) {
            $0[0].batchNorm(weight: nil, bias: nil, runningMean: nil, runningVariance: nil, training: true, eps: 1e-3)
        }
        // ReLU: the batch is normalized so that no output lies near 0 (β shifts the kink away).
        let x = randn([4, 3, 2, 2], seed: 79)
        let far = Tensor([0.7, -0.6, 0.0], shape: [3])
        expectGradients([x, w, far]) {
            $0[0].batchNorm(weight: $0[1], bias: $0[2], runningMean: nil, runningVariance: nil, training: true,
                            applyingReLU: true)
        }
        // Evaluation: running statistics are constants.
        let mean = randn([3], seed: 81), variance = randu([3], 0.5, 2, seed: 82)
        expectGradients([randn([4, 3, 2], seed: 83), w, b]) {
            $0[0].batchNorm(weight: $0[1], bias: $0[2], runningMean: mean, runningVariance: variance, training: false)
        }
        expectGradients([awayFromZero([5, 3], seed: 84, margin: 0.3), w, b]) {
            $0[0].batchNorm(weight: $0[1], bias: $0[2] * 0, runningMean: mean * 0, runningVariance: variance * 0 + 1,
                            training: false, eps: 0, applyingReLU: true)
        }
    }

    @Test func batchNormEqualsItsComposition() {
        // The fused op against (x − μ)/√(σ² + eps)·γ + β built from reductions, forward and
        // gradients, and the running statistics against PyTorch's update (unbiased variance).
        let x = randn([6, 3, 4, 5], seed: 85), w = randn([3], seed: 86), b = randn([3], seed: 87)
        let g = randn([6, 3, 4, 5], seed: 88)
        func run(_ fused: Bool) -> (y: [Double], gx: [Double], gw: [Double], gb: [Double]) {
            let (xi, wi, bi) = (x.copied().requiringGrad(), w.copied().requiringGrad(), b.copied().requiringGrad())
            let y: Tensor
            if fused {
                y = xi.batchNorm(weight: wi, bias: bi, runningMean: nil, runningVariance: nil, training: true).relu()
            } else {
                let mean = xi.mean(alongAxes: [0, 2, 3], keepingDims: true)
                let variance = xi.variance(alongAxes: [0, 2, 3], correction: 0, keepingDims: true)
                let shape = [1, 3, 1, 1]
                y = ((xi - mean) / (variance + 1e-5).sqrt() * wi.reshape(shape) + bi.reshape(shape)).relu()
            }
            (y * g).sum().backward()
            return (y.doubles, xi.grad!.doubles, wi.grad!.doubles, bi.grad!.doubles)
        }
        let (fused, composed) = (run(true), run(false))
        expectClose(fused.y, composed.y, tol: 1e-12)
        expectClose(fused.gx, composed.gx, tol: 1e-12)
        expectClose(fused.gw, composed.gw, tol: 1e-12)
        expectClose(fused.gb, composed.gb, tol: 1e-12)
        let withReLU = x.batchNorm(weight: w, bias: b, runningMean: nil, runningVariance: nil, training: true, applyingReLU: true)
        expectClose(withReLU.doubles, fused.y, tol: 0)

        let runningMean = Tensor.zeros([3], dtype: .float64), runningVariance = Tensor.ones([3], dtype: .float64)
        _ = x.batchNorm(weight: w, bias: b, runningMean: runningMean, runningVariance: runningVariance, training: true,
                        momentum: 0.25)
        let m = x.mean(alongAxes: [0, 2, 3]).doubles, v = x.variance(alongAxes: [0, 2, 3], correction: 1).doubles
        expectClose(runningMean.doubles, m.map { 0.25 * $0 }, tol: 1e-14)
        expectClose(runningVariance.doubles, v.map { 0.75 + 0.25 * $0 }, tol: 1e-14)
        // Float32 runs the same kernels and agrees with Float64 to Float32 rounding.
        let y32 = x.to(.float32).batchNorm(weight: w.to(.float32), bias: b.to(.float32), runningMean: nil,
                                           runningVariance: nil, training: true)
        let y64 = x.batchNorm(weight: w, bias: b, runningMean: nil, runningVariance: nil, training: true)
        expectClose(y32.doubles, y64.doubles, tol: 2e-6)
    }

    @Test func selfAttention() {
        // The fused op against its composition (the heads' q, k, v cut out of the packed
        // projections, softmax(s·QKᵀ)V, the heads concatenated), forward and gradients, and
        // gradchecked itself; 2 images, 3 tokens, 2 heads of width 2.
        let qkv = randn([2, 3, 12], seed: 92)
        let gout = randn([2, 3, 4], seed: 93)
        func composed(_ x: Tensor) -> (Tensor, Tensor) {
            let parts = x.reshape([2, 3, 3, 2, 2]).permuted([2, 0, 3, 1, 4])  // [3, B, H, N, dh]
            let p = (parts[0].matmul(parts[1].transposed()) * 0.7).softmax(alongAxis: -1)
            return (p.matmul(parts[2]).transposed(1, 2).reshape([2, 3, 4]), p)
        }
        let (a, b) = (qkv.copied().requiringGrad(), qkv.copied().requiringGrad())
        let (fused, attention) = a.selfAttention(heads: 2, scale: 0.7)
        let (plain, probabilities) = composed(b)
        expectClose(fused.doubles, plain.doubles, tol: 1e-14)
        expectClose(attention.doubles, probabilities.doubles, tol: 1e-15)
        (fused * gout).sum().backward()
        (plain * gout).sum().backward()
        expectClose(a.grad!.doubles, b.grad!.doubles, tol: 1e-13)
        expectGradients([qkv]) { $0[0].selfAttention(heads: 2).output }
        expectGradients([randn([1, 4, 6], seed: 94)]) { $0[0].selfAttention(heads: 1, scale: 2).output.sin() }
        // Float32 takes the C softmax kernels and agrees with Float64 to Float32 rounding,
        // forward and backward.
        let q32 = qkv.to(.float32).requiringGrad(), q64 = qkv.copied().requiringGrad()
        let (f32, f64) = (q32.selfAttention(heads: 2).output, q64.selfAttention(heads: 2).output)
        expectClose(f32.doubles, f64.doubles, tol: 1e-6)
        (f32 * gout.to(.float32)).sum().backward()
        (f64 * gout).sum().backward()
        expectClose(q32.grad!.doubles, q64.grad!.doubles, tol: 1e-5)
        // More pairs than one softmax call takes (5 tokens: 51 pairs a call; 17 tokens: 15),
        // so that the pairs go in several groups and the Float32 kernel takes its short-row
        // path: against the composition in Float64 and against Float64 in Float32.
        for (images, tokens) in [(60, 5), (8, 17)] {
            let x = randn([images, tokens, 12], seed: 95)
            let parts = x.reshape([images, tokens, 3, 2, 2]).permuted([2, 0, 3, 1, 4])
            let p = (parts[0].matmul(parts[1].transposed()) * 0.7).softmax(alongAxis: -1)
            let plain = p.matmul(parts[2]).transposed(1, 2).reshape([images, tokens, 4])
            let (fused, attention) = x.selfAttention(heads: 2, scale: 0.7)
            expectClose(fused.doubles, plain.doubles, tol: 1e-14)
            expectClose(attention.doubles, p.doubles, tol: 1e-15)
            let (fused32, attention32) = x.to(.float32).selfAttention(heads: 2, scale: 0.7)
            expectClose(fused32.doubles, plain.doubles, tol: 1e-6)
            expectClose(attention32.doubles, p.doubles, tol: 1e-6)
        }
    }

    @Test func pooling() {
        let x = randn([2, 2, 5, 6], seed: 80)
        expectGradients([x]) { $0[0].maxPool2d(kernel: 2) }
        expectGradients([x]) { $0[0].maxPool2d(kernel: 3, stride: 1, padding: 1) }
        expectGradients([x]) { $0[0].avgPool2d(kernel: 3, stride: 2, padding: 1) }
        expectGradients([x]) { $0[0].adaptiveAvgPool2d(Size2(3, 4)) }
        expectGradients([x.transposed(2, 3)]) { $0[0].adaptiveAvgPool2d(2) }
    }

    @Test func resizing() {
        let x = randn([1, 2, 3, 4], seed: 90)
        expectGradients([x]) { $0[0].resized(height: 5, width: 7, mode: .bilinear) }
        expectGradients([x]) { $0[0].resized(height: 6, width: 3, mode: .bicubic) }
        expectGradients([x]) { $0[0].resized(height: 2, width: 2, mode: .bicubic) }
    }

    @Test func dropout() {
        expectGradients([randn([3, 4], seed: 91)]) { t in
            var g = RandomGenerator(seed: 9)  // the same mask on every evaluation
            return t[0].dropout(probability: 0.3, training: true, using: &g)
        }
    }

    // MARK: Compositions

    @Test func twoLayerMLPWithCrossEntropy() {
        let x = randn([5, 4], seed: 100)
        let w1 = randn([4, 6], seed: 101) * 0.5, b1 = randn([6], seed: 102)
        let w2 = randn([6, 3], seed: 103) * 0.5, b2 = randn([3], seed: 104)
        expectGradients([x, w1, b1, w2, b2]) { p in
            let h = (p[0].matmul(p[1]) + p[2]).gelu()
            let logits = h.matmul(p[3]) + p[4]
            return Tensor.crossEntropy(logits: logits, labels: [0, 2, 1, 1, 0])
        }
        expectGradients([x, w1, b1, w2, b2], mode: .fast) { p in
            let h = (p[0].matmul(p[1]) + p[2]).tanh()
            return Tensor.crossEntropy(logits: h.matmul(p[3]) + p[4], labels: [0, 2, 1, 1, 0])
        }
    }

    @Test func attentionLikeComposition() {
        // softmax(Q Kᵀ/√d) V with a fused-qkv split: the ViT block's core.
        let x = randn([2, 3, 4], seed: 110), wqkv = randn([4, 12], seed: 111) * 0.5
        expectGradients([x, wqkv]) { p in
            let qkv = p[0].matmul(p[1]).reshape([2, 3, 3, 4]).permuted([2, 0, 1, 3])
            let (q, k, v) = (qkv[0], qkv[1], qkv[2])
            let attn = (q.matmul(k.transposed()) / 2).softmax(alongAxis: -1)
            return attn.matmul(v).layerNormLike()
        }
    }
}

extension Tensor {
    /// (x − mean)/√(var + eps) over the last axis, composed of core ops.
    func layerNormLike() -> Tensor {
        let mu = mean(alongAxes: [-1], keepingDims: true)
        let d = self - mu
        return d / ((d * d).mean(alongAxes: [-1], keepingDims: true) + 1e-5).sqrt()
    }
}

/// Subgradients at kinks and ties, as PyTorch 2.15 gives them (values read off
/// `torch.clamp`, `torch.max`, `torch.amax` in Float64 on these inputs).
@Suite("Kinks and ties follow PyTorch")
struct KinkTests {
    func grad(_ x: [Double], shape: [Int]? = nil, _ f: (Tensor) -> Tensor) -> [Double] {
        let t = Tensor(x, shape: shape ?? [x.count]).requiringGrad()
        f(t).sum().backward()
        return t.grad!.scalars(as: Double.self)
    }

    @Test func clampPassesTheGradientOnlyInsideTheInterval() {
        let below: [Double] = grad([0, 1, 2]) { $0.clamped(min: 1) }
        #expect(below == [0, 0, 1])
        let above: [Double] = grad([0, 1, 2]) { $0.clamped(max: 1) }
        #expect(above == [1, 0, 0])
        let both: [Double] = grad([0, 1, 1.2, 1.5, 2]) { $0.clamped(min: 1, max: 1.5) }
        #expect(both == [0, 0, 1, 0, 0])
    }

    @Test func reductionsOverAxesShareTiesAndAlongOneAxisPickTheFirst() {
        let x: [Double] = [1, 3, 3, 0], y: [Double] = [3, 3, 1, 0], z: [Double] = [0, 0, 2, 0]
        let all: [Double] = grad(x, shape: [2, 2]) { $0.max() }                  // torch.max(x), amax
        #expect(all == [0, 0.5, 0.5, 0])
        let both: [Double] = grad(x, shape: [2, 2]) { $0.max(alongAxes: [0, 1]) }
        #expect(both == [0, 0.5, 0.5, 0])
        let rows: [Double] = grad(y, shape: [2, 2]) { $0.max(alongAxes: [1]) }  // amax(dim=1)
        #expect(rows == [0.5, 0.5, 1, 0])
        let first: [Double] = grad(y, shape: [2, 2]) { $0.max(alongAxis: 1) }   // max(dim=1)
        #expect(first == [1, 0, 1, 0])
        let third = 1.0 / 3
        let minima: [Double] = grad(z, shape: [2, 2]) { $0.min(alongAxes: nil) }
        #expect(minima == [third, third, 0, third])
    }
}

/// Pooling and resize options checked against PyTorch 2.15 (values and VJPs in Float64, from
/// `Scripts/torch_reference.py`, committed as `torch_reference.json`).
@Suite("Pooling and resize options as PyTorch")
struct TorchOptionTests {
    struct Reference: Decodable {
        struct Data: Decodable { let shape: [Int]; let values: [Double] }
        struct Case: Decodable {
            let op: String
            let args: [String: Arg]
            let shape: [Int]
            let values: [Double], outputGradient: [Double], inputGradient: [Double]
        }
        enum Arg: Decodable {
            case int(Int), bool(Bool), string(String)
            init(from decoder: Decoder) throws {
                let c = try decoder.singleValueContainer()
                if let b = try? c.decode(Bool.self) { self = .bool(b) } else if let i = try? c.decode(Int.self) { self = .int(i) }
                else { self = .string(try c.decode(String.self)) }
            }
            var int: Int { if case .int(let i) = self { return i }; return -1 }
            var bool: Bool { if case .bool(let b) = self { return b }; return false }
            var string: String { if case .string(let s) = self { return s }; return "" }
        }
        let input: Data
        let cases: [Case]
    }

    @Test func poolingAndResizeOptionsMatchPyTorch() throws {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("torch_reference.json")
        let reference = try JSONDecoder().decode(Reference.self, from: Foundation.Data(contentsOf: url))
        for c in reference.cases {
            let x = Tensor(reference.input.values, shape: reference.input.shape).requiringGrad()
            let a = c.args
            func size(_ key: String) -> Size2 { Size2(a[key]!.int, a[key]!.int) }
            let y: Tensor
            switch c.op {
            case "maxPool2d":
                y = x.maxPool2d(kernel: size("kernel"), stride: size("stride"), padding: size("padding"),
                                ceilMode: a["ceilMode"]!.bool)
            case "avgPool2d":
                y = x.avgPool2d(kernel: size("kernel"), stride: size("stride"), padding: size("padding"),
                                ceilMode: a["ceilMode"]!.bool, countIncludePad: a["countIncludePad"]!.bool)
            default:
                y = x.resized(height: a["height"]!.int, width: a["width"]!.int, mode: a["mode"]!.string == "bicubic" ? .bicubic : .bilinear,
                              alignCorners: a["alignCorners"]!.bool)
            }
            #expect(y.shape == c.shape, "\(c.op) \(a)")
            guard y.shape == c.shape else { continue }
            y.backward(Tensor(c.outputGradient, shape: c.shape))
            let dv = zip(y.scalars(as: Double.self), c.values).map { Swift.abs($0 - $1) }.max() ?? 0
            let dg = zip(x.grad!.scalars(as: Double.self), c.inputGradient).map { Swift.abs($0 - $1) }.max() ?? 0
            #expect(dv <= 1e-15 && dg <= 1e-15, "\(c.op) \(a): values within \(dv), VJP within \(dg)")
        }
    }
}
