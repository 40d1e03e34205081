import Kappa

/// ResNet's basic block: 3×3 conv–BN–ReLU–3×3 conv–BN plus a shortcut (1×1 conv–BN when
/// the stride or width changes), then ReLU.
public final class BasicBlock: Module {
    /// The two 3×3 convolutions and their BatchNorms.
    public let conv1: Conv2d, bn1: BatchNorm2d, conv2: Conv2d, bn2: BatchNorm2d
    /// The 1×1 projection of the shortcut, when the shape changes.
    public let shortcut: Conv2d?, shortcutNorm: BatchNorm2d?

    /// A block from `inChannels` to `outChannels` at `stride`.
    public init(_ inChannels: Int, _ outChannels: Int, stride: Int, dtype: DType, using g: inout RandomGenerator) {
        conv1 = Conv2d(inChannels, outChannels, kernel: 3, stride: Size2(stride, stride), padding: 1, bias: false, dtype: dtype, using: &g)
        bn1 = BatchNorm2d(outChannels, dtype: dtype)
        conv2 = Conv2d(outChannels, outChannels, kernel: 3, padding: 1, bias: false, dtype: dtype, using: &g)
        bn2 = BatchNorm2d(outChannels, dtype: dtype)
        if stride != 1 || inChannels != outChannels {
            shortcut = Conv2d(inChannels, outChannels, kernel: 1, stride: Size2(stride, stride), bias: false, dtype: dtype, using: &g)
            shortcutNorm = BatchNorm2d(outChannels, dtype: dtype)
        } else {
            shortcut = nil
            shortcutNorm = nil
        }
        super.init()
    }

    /// ReLU(branch(x) + shortcut(x)).
    public func callAsFunction(_ x: Tensor) -> Tensor {
        let h = bn2(conv2(bn1(conv1(x), applyingReLU: true)))
        let s = shortcut.map { shortcutNorm!($0(x)) } ?? x
        return (h + s).relu()
    }
}

/// A ResNet-18 layout (four stages of two basic blocks, widths w, 2w, 4w, 8w) with a stem
/// for 28–32 pixel images (one 3×3 convolution, no max pooling), ending in global average
/// pooling: features [B, 8w]. `width: 64` is ResNet-18's own width.
public final class ResNet: Module {
    /// The 3×3 stem and its BatchNorm (no max-pool: small images).
    public let stem: Conv2d, stemNorm: BatchNorm2d
    /// The basic blocks of the four stages.
    public let blocks: [BasicBlock]
    /// The width of the pooled features (8 × `width`).
    public let featureCount: Int

    /// A ResNet of `width` (64 is ResNet-18) with `blocksPerStage` blocks per stage.
    public init(channels: Int = 3, width: Int = 64, blocksPerStage: [Int] = [2, 2, 2, 2], dtype: DType = .float32,
                using g: inout RandomGenerator) {
        stem = Conv2d(channels, width, kernel: 3, padding: 1, bias: false, dtype: dtype, using: &g)
        stemNorm = BatchNorm2d(width, dtype: dtype)
        var blocks: [BasicBlock] = []
        var c = width
        for (stage, count) in blocksPerStage.enumerated() {
            let out = width << stage
            for i in 0..<count {
                blocks.append(BasicBlock(c, out, stride: stage > 0 && i == 0 ? 2 : 1, dtype: dtype, using: &g))
                c = out
            }
        }
        self.blocks = blocks
        featureCount = c
        super.init()
    }

    /// Globally pooled features [B, featureCount] of images [B, C, H, W].
    public func callAsFunction(_ x: Tensor) -> Tensor {
        var h = stemNorm(stem(x), applyingReLU: true)
        for b in blocks { h = b(h) }
        return h.adaptiveAvgPool2d(1).reshape([x.shape[0], featureCount])
    }
}
