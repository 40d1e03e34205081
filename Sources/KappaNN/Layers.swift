import Kappa

/// Initializers used by the layers (DINO's choices).
public enum Initializer {
    /// Truncated normal with std 0.02 in [−2, 2] (timm/DINO `trunc_normal_`).
    public static func truncatedNormal(_ shape: [Int], std: Double = 0.02, dtype: DType,
                                       using g: inout RandomGenerator) -> Tensor {
        Tensor.truncatedNormal(shape, std: std, lower: -2, upper: 2, dtype: dtype, using: &g)
    }

    /// Uniform in ±1/√fanIn (PyTorch's default for convolutions and its `kaiming_uniform_(a=√5)`).
    public static func fanInUniform(_ shape: [Int], fanIn: Int, dtype: DType, using g: inout RandomGenerator) -> Tensor {
        let bound = 1 / Double(fanIn).squareRoot()
        return Tensor.randomUniform(shape, low: -bound, high: bound, dtype: dtype, using: &g)
    }
}

/// y = x Wᵀ + b over the last axis; W is [out, in] (PyTorch's layout), initialized
/// truncated-normal with std 0.02, b zero (DINO's `_init_weights`).
public final class Linear: Module {
    /// The weight [out, in].
    @Parameter public var weight: Tensor
    /// The bias [out], or nil.
    @Parameter public var bias: Tensor?

    /// A layer from `inFeatures` to `outFeatures`, initialized as PyTorch's `nn.Linear`.
    public init(_ inFeatures: Int, _ outFeatures: Int, bias: Bool = true, dtype: DType = .float32,
                using g: inout RandomGenerator) {
        weight = Initializer.truncatedNormal([outFeatures, inFeatures], dtype: dtype, using: &g)
        self.bias = bias ? Tensor.zeros([outFeatures], dtype: dtype) : nil
        super.init()
    }

    /// x·Wᵀ + b over the last axis.
    public func callAsFunction(_ x: Tensor) -> Tensor {
        precondition(x.shape.last == weight.shape[1],
                     "Linear: input \(x.shape) does not end in \(weight.shape[1]) features (weight \(weight.shape))")
        // One op: batch dimensions merged into rows, so that forward and both gradients are one
        // BLAS product each, and the bias written before the product is added to it.
        return Tensor.linear(x, weight: weight, bias: bias)
    }
}

/// Layer normalization over the last axis (fused kernel), weight 1, bias 0.
public final class LayerNorm: Module {
    /// γ [features], initialized to 1.
    @Parameter public var weight: Tensor
    /// β [features], initialized to 0.
    @Parameter public var bias: Tensor
    /// Added to the variance.
    public let eps: Double

    /// Normalization over a last axis of `features`.
    public init(_ features: Int, eps: Double = 1e-5, dtype: DType = .float32) {
        weight = Tensor.ones([features], dtype: dtype)
        bias = Tensor.zeros([features], dtype: dtype)
        self.eps = eps
        super.init()
    }

    /// The normalized x (one fused op).
    public func callAsFunction(_ x: Tensor) -> Tensor { x.layerNorm(weight: weight, bias: bias, eps: eps) }
}

/// Batch normalization over the channel axis 1 of [N, C] or [N, C, L] (`BatchNorm1d`) or
/// [N, C, H, W] (`BatchNorm2d`): batch statistics in training (running statistics updated
/// with `momentum`, variance unbiased as PyTorch), running statistics in evaluation.
public class BatchNorm: Module {
    /// γ [C], initialized to 1.
    @Parameter public var weight: Tensor
    /// β [C], initialized to 0.
    @Parameter public var bias: Tensor
    /// The running mean [C], used in evaluation mode.
    @Buffer public var runningMean: Tensor
    /// The running (unbiased) variance [C], used in evaluation mode.
    @Buffer public var runningVar: Tensor
    /// Added to the variance; the running statistics' update weight (PyTorch's convention).
    public let eps: Double, momentum: Double
    /// SyncBatchNorm: in training, the statistics are those of the batch over every process
    /// of ``Distributed/world`` (each process holds a shard of it), as PyTorch's
    /// `SyncBatchNorm`. Nothing changes with one process. Set it with
    /// ``Module/synchronizeBatchNorm(_:)``; KappaSSL's trainer does when it runs on several.
    public var synchronized = false
    let spatialRanks: Set<Int>

    init(_ channels: Int, eps: Double, momentum: Double, dtype: DType, ranks: Set<Int>) {
        weight = Tensor.ones([channels], dtype: dtype)
        bias = Tensor.zeros([channels], dtype: dtype)
        runningMean = Tensor.zeros([channels], dtype: dtype)
        runningVar = Tensor.ones([channels], dtype: dtype)
        (self.eps, self.momentum, spatialRanks) = (eps, momentum, ranks)
        super.init()
    }

    /// Normalizes `x` (one fused op, `Tensor.batchNorm(weight:bias:runningMean:runningVariance:training:momentum:eps:applyingReLU:)`);
    /// with `applyingReLU` returns max(·, 0) in the same passes.
    public func callAsFunction(_ x: Tensor, applyingReLU: Bool = false) -> Tensor {
        let c = weight.shape[0]
        precondition(spatialRanks.contains(x.rank) && x.shape[1] == c,
                     "\(type(of: self)): input \(x.shape) does not have \(c) channels on axis 1 (rank \(spatialRanks.sorted()))")
        return x.batchNorm(weight: weight, bias: bias, runningMean: runningMean, runningVariance: runningVar,
                           training: isTraining, momentum: momentum, eps: eps, applyingReLU: applyingReLU,
                           synchronizing: synchronized && Distributed.size > 1 ? Distributed.sum : nil)
    }
}

/// ``BatchNorm`` for [N, C] and [N, C, L].
public final class BatchNorm1d: BatchNorm {
    /// BatchNorm over [N, C] inputs of `channels` features.
    public init(_ channels: Int, eps: Double = 1e-5, momentum: Double = 0.1, dtype: DType = .float32) {
        super.init(channels, eps: eps, momentum: momentum, dtype: dtype, ranks: [2, 3])
    }
}

/// ``BatchNorm`` for [N, C, H, W].
public final class BatchNorm2d: BatchNorm {
    /// BatchNorm over [N, C, H, W] inputs of `channels` channels.
    public init(_ channels: Int, eps: Double = 1e-5, momentum: Double = 0.1, dtype: DType = .float32) {
        super.init(channels, eps: eps, momentum: momentum, dtype: dtype, ranks: [4])
    }
}

/// 2-D convolution layer; weight [O, C, kh, kw] and bias uniform in ±1/√(C·kh·kw) (PyTorch).
public final class Conv2d: Module {
    /// The kernel [out, in, kh, kw].
    @Parameter public var weight: Tensor
    /// The bias [out], or nil.
    @Parameter public var bias: Tensor?
    /// As PyTorch's `Conv2d`.
    public let stride: Size2, padding: Size2, dilation: Size2

    /// A convolution initialized as PyTorch's `nn.Conv2d`.
    public init(_ inChannels: Int, _ outChannels: Int, kernel: Size2, stride: Size2 = 1, padding: Size2 = 0,
                dilation: Size2 = 1, bias: Bool = true, dtype: DType = .float32, using g: inout RandomGenerator) {
        let fanIn = inChannels * kernel.height * kernel.width
        weight = Initializer.fanInUniform([outChannels, inChannels, kernel.height, kernel.width], fanIn: fanIn, dtype: dtype, using: &g)
        self.bias = bias ? Initializer.fanInUniform([outChannels], fanIn: fanIn, dtype: dtype, using: &g) : nil
        (self.stride, self.padding, self.dilation) = (stride, padding, dilation)
        super.init()
    }

    /// The cross-correlation of images [B, C, H, W].
    public func callAsFunction(_ x: Tensor) -> Tensor {
        x.conv2d(weight: weight, bias: bias, stride: stride, padding: padding, dilation: dilation)
    }
}

/// GELU activation (exact erf form, or the tanh approximation).
public final class GELU: Module {
    /// The tanh form instead of the erf form.
    public let approximate: Bool
    /// GELU, erf form unless `approximate`.
    public init(approximate: Bool = false) { self.approximate = approximate; super.init() }
    /// x·Φ(x) elementwise.
    public func callAsFunction(_ x: Tensor) -> Tensor { x.gelu(approximate: approximate) }
}

/// Dropout with its own seeded generator; the identity in evaluation mode.
public final class Dropout: Module {
    /// The share of elements zeroed in training.
    public let probability: Double
    /// The masks' generator.
    public var generator: RandomGenerator
    /// Dropout with drop `probability`.
    public init(_ probability: Double, seed: UInt64 = 0) {
        self.probability = probability
        generator = RandomGenerator(seed: seed)
        super.init()
    }
    /// In training, x with elements zeroed at random and the rest scaled by 1/(1 − p); x in evaluation.
    public func callAsFunction(_ x: Tensor) -> Tensor {
        x.dropout(probability: probability, training: isTraining, using: &generator)
    }
}

/// Stochastic depth: drops whole samples of a residual branch with probability
/// `probability` in training and scales the kept ones by 1/(1 − probability).
public final class DropPath: Module {
    /// The probability that a sample's residual branch is dropped.
    public let probability: Double
    /// The masks' generator.
    public var generator: RandomGenerator
    /// Drop-path with drop `probability`.
    public init(_ probability: Double, seed: UInt64 = 0) {
        self.probability = probability
        generator = RandomGenerator(seed: seed)
        super.init()
    }
    /// In training, x with whole samples zeroed at random and the rest scaled by 1/(1 − p).
    public func callAsFunction(_ x: Tensor) -> Tensor {
        guard isTraining && probability > 0 else { return x }
        var maskShape = [Int](repeating: 1, count: x.rank)
        maskShape[0] = x.shape[0]
        let keep = Tensor.bernoulli(maskShape, probability: 1 - probability, dtype: x.dtype, using: &generator)
        return x * (keep / (1 - probability))
    }
}

/// Linear → GELU → Linear (timm's `Mlp`), with optional dropout after each.
public final class MLP: Module {
    /// The two layers and the activation between them.
    public let fc1: Linear, act: GELU, fc2: Linear
    /// Dropout after each layer, or nil.
    public let drop: Dropout?

    /// An MLP `inFeatures` → `hidden` → `out` (default `inFeatures`).
    public init(_ inFeatures: Int, hidden: Int, out: Int? = nil, dropout: Double = 0, dtype: DType = .float32,
                using g: inout RandomGenerator) {
        fc1 = Linear(inFeatures, hidden, dtype: dtype, using: &g)
        act = GELU()
        fc2 = Linear(hidden, out ?? inFeatures, dtype: dtype, using: &g)
        drop = dropout > 0 ? Dropout(dropout, seed: g.next()) : nil
        super.init()
    }

    /// fc2(GELU(fc1(x))).
    public func callAsFunction(_ x: Tensor) -> Tensor {
        var h = act(fc1(x))
        if let drop { h = drop(h) }
        h = fc2(h)
        return drop.map { $0(h) } ?? h
    }
}
