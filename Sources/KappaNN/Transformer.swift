import Kappa

/// Multi-head self-attention with a fused qkv projection and scaled dot products:
/// softmax(QKᵀ/√d_h)·V per head (one fused op, `Tensor.selfAttention(heads:scale:)`), then an
/// output projection.
public final class Attention: Module {
    /// Attention heads.
    public let heads: Int
    /// The fused q, k, v projection and the output projection.
    public let qkv: Linear, proj: Linear
    /// When true, the next forward keeps its attention maps [B, heads, N, N] in
    /// ``lastAttention`` (detached), for visualization.
    public var keepsAttention = false
    /// The last call's attention probabilities [B, heads, N, N], when ``keepsAttention``.
    public private(set) var lastAttention: Tensor?

    /// Attention over `dim` features in `heads` heads.
    public init(_ dim: Int, heads: Int, qkvBias: Bool = true, dtype: DType = .float32, using g: inout RandomGenerator) {
        precondition(dim % heads == 0, "Attention: width \(dim) is not divisible by \(heads) heads")
        self.heads = heads
        qkv = Linear(dim, 3 * dim, bias: qkvBias, dtype: dtype, using: &g)
        proj = Linear(dim, dim, dtype: dtype, using: &g)
        super.init()
    }

    /// Self-attention of tokens [B, N, dim].
    public func callAsFunction(_ x: Tensor) -> Tensor {
        // One fused op on the packed projections (Tensor.selfAttention): no permuted copies of
        // q, k, v, and only the attention probabilities kept for backward.
        let (out, attention) = self.qkv(x).selfAttention(heads: heads)
        if keepsAttention { lastAttention = attention }
        return proj(out)
    }
}

/// Pre-norm Transformer block: x + drop(attn(norm(x))), then x + drop(mlp(norm(x))).
public final class TransformerBlock: Module {
    /// Pre-norm attention and MLP.
    public let norm1: LayerNorm, attn: Attention, norm2: LayerNorm, mlp: MLP
    /// Stochastic depth on both residual branches, or nil.
    public let dropPath: DropPath?

    /// A block of `dim` features, `heads` heads and an MLP `mlpRatio` times as wide.
    public init(_ dim: Int, heads: Int, mlpRatio: Double = 4, eps: Double = 1e-6, dropPath: Double = 0,
                dtype: DType = .float32, using g: inout RandomGenerator) {
        norm1 = LayerNorm(dim, eps: eps, dtype: dtype)
        attn = Attention(dim, heads: heads, dtype: dtype, using: &g)
        norm2 = LayerNorm(dim, eps: eps, dtype: dtype)
        mlp = MLP(dim, hidden: Int(Double(dim) * mlpRatio), dtype: dtype, using: &g)
        self.dropPath = dropPath > 0 ? DropPath(dropPath, seed: g.next()) : nil
        super.init()
    }

    /// x + attn(norm1(x)), then + mlp(norm2(·)).
    public func callAsFunction(_ x: Tensor) -> Tensor {
        let drop = { (t: Tensor) in self.dropPath.map { $0(t) } ?? t }
        let h = x + drop(attn(norm1(x)))
        return h + drop(mlp(norm2(h)))
    }
}

/// The sizes of a ``VisionTransformer``.
public struct ViTConfiguration: Sendable, Equatable, Codable {
    /// The input images and their patches.
    public var imageSize: Int, patchSize: Int, channels: Int
    /// Token width, blocks, heads.
    public var width: Int, depth: Int, heads: Int
    /// The MLP's width over the token width.
    public var mlpRatio: Double = 4
    /// The LayerNorms' ε.
    public var eps: Double = 1e-6
    /// Stochastic depth of the last block (linear from 0 in the first).
    public var dropPathRate: Double = 0
    /// A learned mask token that replaces masked patch embeddings (iBOT).
    public var maskToken: Bool = false
    /// A convolutional stem instead of the patch projection (Xiao et al. 2021, "Early
    /// convolutions help transformers see better"): one 3×3 convolution of stride 2 with
    /// BatchNorm and ReLU per entry, of that many output channels, then a 1×1 projection to
    /// the token width. The strides multiply to the patch size (two entries for patch 4).
    /// nil: the patch projection.
    public var convolutionalStem: [Int]?
    /// 3×3 convolutions of stride 1 (each with BatchNorm and ReLU), of these output channels,
    /// before the patch projection, which then cuts its patches out of their feature maps:
    /// the same tokens as without, each made from local features instead of raw pixels. nil:
    /// none. Not with ``convolutionalStem``. Under iBOT's masking a masked patch's token is
    /// replaced whole, but its neighbours' tokens see one pixel of it per convolution.
    public var patchStem: [Int]?

    /// A configuration (mask token off unless `maskToken`).
    public init(imageSize: Int, patchSize: Int, channels: Int, width: Int, depth: Int, heads: Int,
                mlpRatio: Double = 4, eps: Double = 1e-6, dropPathRate: Double = 0, maskToken: Bool = false,
                convolutionalStem: [Int]? = nil, patchStem: [Int]? = nil) {
        (self.imageSize, self.patchSize, self.channels) = (imageSize, patchSize, channels)
        (self.width, self.depth, self.heads) = (width, depth, heads)
        (self.mlpRatio, self.eps, self.dropPathRate, self.maskToken) = (mlpRatio, eps, dropPathRate, maskToken)
        (self.convolutionalStem, self.patchStem) = (convolutionalStem, patchStem)
    }

    /// ViT-Tiny (192 wide, 12 deep, 3 heads) for `imageSize` images with `patchSize` patches.
    public static func tiny(imageSize: Int = 224, patchSize: Int = 16, channels: Int = 3) -> Self {
        Self(imageSize: imageSize, patchSize: patchSize, channels: channels, width: 192, depth: 12, heads: 3)
    }
    /// ViT-Small (384, 12, 6).
    public static func small(imageSize: Int = 224, patchSize: Int = 16, channels: Int = 3) -> Self {
        Self(imageSize: imageSize, patchSize: patchSize, channels: channels, width: 384, depth: 12, heads: 6)
    }
    /// BENCHMARKS.md's `ref-tiny`: 32×32×3 images, patch 4, 192 wide, 6 deep, 3 heads.
    public static let refTiny = Self(imageSize: 32, patchSize: 4, channels: 3, width: 192, depth: 6, heads: 3)
    /// BENCHMARKS.md's `ref-micro`: 28×28×1 images, patch 7, 64 wide, 4 deep, 4 heads.
    public static let refMicro = Self(imageSize: 28, patchSize: 7, channels: 1, width: 64, depth: 4, heads: 4)
    /// A ViT for small images: ref-micro's transformer (64 wide, 4 deep, 4 heads) on 4-pixel
    /// tokens made by a convolutional stem of 16 and 32 channels (49 tokens on 28 pixels).
    public static func convMicro(imageSize: Int = 28, channels: Int = 1) -> Self {
        Self(imageSize: imageSize, patchSize: 4, channels: channels, width: 64, depth: 4, heads: 4, convolutionalStem: [16, 32])
    }
    /// ref-micro's ViT (64 wide, 4 deep, 4 heads, patch 7 on 28 pixels: 16 tokens) with its
    /// patches cut from the feature map of one 3×3 convolution of 16 channels (``patchStem``)
    /// instead of the raw pixels. `patchSize` 7 needs images of a multiple of 7 pixels.
    public static func stemMicro(imageSize: Int = 28, patchSize: Int = 7, channels: Int = 1) -> Self {
        Self(imageSize: imageSize, patchSize: patchSize, channels: channels, width: 64, depth: 4, heads: 4, patchStem: [16])
    }
}

/// A Vision Transformer (DINO's `VisionTransformer`): patch embedding as one product,
/// a [CLS] token, a learned positional embedding interpolated bicubically when a crop has
/// another number of patches, pre-norm blocks, a final LayerNorm; optionally a mask token.
public final class VisionTransformer: Module {
    /// The sizes.
    public let configuration: ViTConfiguration
    /// The patch embedding as a convolution's weight [D, C, P, P] and bias, applied as
    /// unfold + one matrix product.
    /// (With a convolutional stem, the 1×1 projection's weight [D, C′, 1, 1]; with a patch stem,
    /// C is its last convolution's channels.)
    @Parameter public var patchWeight: Tensor
    /// The patch embedding's bias [D].
    @Parameter public var patchBias: Tensor
    /// The convolutional stem's 3×3 convolutions (stride 2 for ``ViTConfiguration/convolutionalStem``,
    /// 1 for ``ViTConfiguration/patchStem``) and their BatchNorms (empty without a stem).
    public let stem: [Conv2d], stemNorms: [BatchNorm2d]
    @Parameter public var clsToken: Tensor
    @Parameter public var positionEmbedding: Tensor
    @Parameter public var maskToken: Tensor?
    public let blocks: [TransformerBlock]
    /// The final LayerNorm.
    public let norm: LayerNorm

    /// A ViT initialized as DINO's (truncated normal, std 0.02).
    public init(_ c: ViTConfiguration, dtype: DType = .float32, using g: inout RandomGenerator) {
        precondition(c.imageSize % c.patchSize == 0, "VisionTransformer: image size \(c.imageSize) is not a multiple of patch \(c.patchSize)")
        if let widths = c.convolutionalStem {
            precondition(!widths.isEmpty && 1 << widths.count == c.patchSize && widths.allSatisfy { $0 > 0 },
                         "VisionTransformer: a stem of \(widths.count) stride-2 convolutions \(widths) makes patches of \(1 << widths.count), not \(c.patchSize)")
            precondition(c.patchStem == nil, "VisionTransformer: a convolutional stem \(widths) and a patch stem \(c.patchStem!) together")
        }
        if let widths = c.patchStem {
            precondition(!widths.isEmpty && widths.allSatisfy { $0 > 0 }, "VisionTransformer: patch stem \(widths) needs at least one positive width")
        }
        configuration = c
        let grid = c.imageSize / c.patchSize
        var convs: [Conv2d] = [], norms: [BatchNorm2d] = []
        var inChannels = c.channels
        let stride: Size2 = c.convolutionalStem == nil ? 1 : 2
        for width in c.convolutionalStem ?? c.patchStem ?? [] {
            convs.append(Conv2d(inChannels, width, kernel: 3, stride: stride, padding: 1, bias: false, dtype: dtype, using: &g))
            norms.append(BatchNorm2d(width, dtype: dtype))
            inChannels = width
        }
        (stem, stemNorms) = (convs, norms)
        let kernel = c.convolutionalStem == nil ? c.patchSize : 1
        let fanIn = inChannels * kernel * kernel
        patchWeight = Initializer.fanInUniform([c.width, inChannels, kernel, kernel], fanIn: fanIn, dtype: dtype, using: &g)
        patchBias = Initializer.fanInUniform([c.width], fanIn: fanIn, dtype: dtype, using: &g)
        clsToken = Initializer.truncatedNormal([1, 1, c.width], dtype: dtype, using: &g)
        positionEmbedding = Initializer.truncatedNormal([1, 1 + grid * grid, c.width], dtype: dtype, using: &g)
        maskToken = c.maskToken ? Tensor.zeros([1, 1, c.width], dtype: dtype) : nil
        blocks = (0..<c.depth).map { i in
            // Stochastic depth grows linearly with depth (DINO).
            let rate = c.depth > 1 ? c.dropPathRate * Double(i) / Double(c.depth - 1) : c.dropPathRate
            return TransformerBlock(c.width, heads: c.heads, mlpRatio: c.mlpRatio, eps: c.eps, dropPath: rate, dtype: dtype, using: &g)
        }
        norm = LayerNorm(c.width, eps: c.eps, dtype: dtype)
        super.init()
    }

    /// The positional embedding for an h×w grid of patches: the learned grid resized
    /// bicubically to exactly h×w when it differs, as `interpolate(size=(h, w))` (DINOv2's and
    /// timm's form of `interpolate_pos_encoding`). DINO v1 passes
    /// `scale_factor=(h + 0.1)/√N` instead, whose sampling positions differ from these by up
    /// to about 5% of a patch (at 4 → 7 patches); Kappa does not reproduce that offset.
    public func positionEmbedding(gridHeight h: Int, gridWidth w: Int) -> Tensor {
        let n = positionEmbedding.shape[1] - 1, g0 = configuration.imageSize / configuration.patchSize
        if h == g0 && w == g0 { return positionEmbedding }
        let cls = positionEmbedding[.all, .range(0..<1)]
        let grid = positionEmbedding[.all, .range(1..<(n + 1))].reshape([1, g0, g0, configuration.width]).permuted([0, 3, 1, 2])
        let resized = grid.resized(height: h, width: w, mode: .bicubic).permuted([0, 2, 3, 1]).reshape([1, h * w, configuration.width])
        return Tensor.concat([cls, resized], alongAxis: 1)
    }

    /// Encodes images [B, C, H, W] (H, W multiples of the patch size). `mask` [B, N] with
    /// 1 at masked patches replaces their embeddings by the mask token (requires
    /// `maskToken`). Returns the normalized [CLS] output [B, D] and patch outputs [B, N, D].
    public func callAsFunction(_ images: Tensor, mask: Tensor? = nil) -> (cls: Tensor, patches: Tensor) {
        let c = configuration
        precondition(images.rank == 4 && images.shape[1] == c.channels,
                     "VisionTransformer: expected [B, \(c.channels), H, W], got \(images.shape)")
        let (b, gh, gw) = (images.shape[0], images.shape[2] / c.patchSize, images.shape[3] / c.patchSize)
        if c.convolutionalStem != nil {
            precondition(images.shape[2] % c.patchSize == 0 && images.shape[3] % c.patchSize == 0,
                         "VisionTransformer: images \(images.shape) are not multiples of the stem's \(c.patchSize)-pixel tokens")
        }
        var h = images  // the stem's feature maps (the images without a stem)
        for (conv, bn) in zip(stem, stemNorms) { h = bn(conv(h), applyingReLU: true) }
        var x: Tensor
        if c.convolutionalStem == nil {
            let w = patchWeight.reshape([c.width, h.shape[1] * c.patchSize * c.patchSize])
            x = h.unfoldPatches(size: c.patchSize).matmul(w.transposed()) + patchBias  // [B, N, D]
        } else {
            // Every position of the strided stem's output is a token: a 1×1 projection.
            let channels = h.shape[1]
            let tokens = h.reshape([b, channels, gh * gw]).transposed()                   // [B, N, C′]
            x = tokens.matmul(patchWeight.reshape([c.width, channels]).transposed()) + patchBias
        }
        if let mask {
            guard let token = maskToken else { preconditionFailure("VisionTransformer: a mask was given but the model has no mask token") }
            precondition(mask.shape == [b, gh * gw], "VisionTransformer: mask \(mask.shape) does not match [\(b), \(gh * gw)] patches")
            x = Tensor.where(mask.unsqueezed(axis: -1), token, x)
        }
        x = Tensor.concat([clsToken.expanded(to: [b, 1, c.width]), x], alongAxis: 1) + positionEmbedding(gridHeight: gh, gridWidth: gw)
        for block in blocks { x = block(x) }
        x = norm(x)
        return (x.select(alongAxis: 1, index: 0), x.slice(alongAxis: 1, from: 1))
    }

    /// The attention maps of the last block for `images`: [B, heads, N + 1, N + 1].
    public func lastSelfAttention(_ images: Tensor) -> Tensor {
        let last = blocks[blocks.count - 1].attn
        last.keepsAttention = true
        defer { last.keepsAttention = false }
        _ = withoutGradients { self(images) }
        return last.lastAttention!
    }
}
