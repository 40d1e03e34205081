import Kappa

/// DINO's projection head: an MLP (`layers` linear layers with GELU, optional BatchNorm)
/// to a bottleneck z ∈ R^p, y = z/‖z‖, then a weight-normalized linear layer without bias
/// whose rows are the prototypes w_k = g_k · v_k/‖v_k‖. With `normLastLayer` the scales g_k
/// are fixed at 1 (DINO's default); otherwise they are learned (DINO-vMF).
public final class DINOHead: Module {
    /// The projection MLP: linear layers with GELU (and BatchNorm with `batchNorm`), ending in the bottleneck.
    public let mlp: [Module]
    /// v, the prototype directions [K, p] (PyTorch's `last_layer.weight_v`).
    @Parameter public var lastLayerDirection: Tensor
    /// g, the prototype norms [K, 1] (PyTorch's `last_layer.weight_g`).
    @Parameter public var lastLayerScale: Tensor
    public let normLastLayer: Bool

    /// What the head returns for a batch.
    public struct Output {
        /// ⟨w_k, y⟩ for every sample and prototype: [B, K].
        public let logits: Tensor
        /// ‖w_k‖ = |g_k|: [K].
        public let prototypeNorms: Tensor
        /// The normalized bottleneck y: [B, p].
        public let embedding: Tensor
    }

    /// A head from `inFeatures` to `prototypes` logits through `layers` linear layers of width
    /// `hidden` and a bottleneck of `bottleneck`; with `normLastLayer` the prototype norms stay 1.
    public init(inFeatures: Int, prototypes: Int, layers: Int = 3, hidden: Int = 2048, bottleneck: Int = 256,
                batchNorm: Bool = false, normLastLayer: Bool = true, dtype: DType = .float32,
                using g: inout RandomGenerator) {
        precondition(layers >= 1, "DINOHead: layers = \(layers)")
        var mlp: [Module] = []
        if layers == 1 {
            mlp.append(Linear(inFeatures, bottleneck, dtype: dtype, using: &g))
        } else {
            mlp.append(Linear(inFeatures, hidden, dtype: dtype, using: &g))
            if batchNorm { mlp.append(BatchNorm1d(hidden, dtype: dtype)) }
            mlp.append(GELU())
            for _ in 0..<(layers - 2) {
                mlp.append(Linear(hidden, hidden, dtype: dtype, using: &g))
                if batchNorm { mlp.append(BatchNorm1d(hidden, dtype: dtype)) }
                mlp.append(GELU())
            }
            mlp.append(Linear(hidden, bottleneck, dtype: dtype, using: &g))
        }
        self.mlp = mlp
        lastLayerDirection = Initializer.fanInUniform([prototypes, bottleneck], fanIn: bottleneck, dtype: dtype, using: &g)
        lastLayerScale = Tensor.ones([prototypes, 1], dtype: dtype)
        self.normLastLayer = normLastLayer
        super.init()
        if normLastLayer { lastLayerScale.requiresGrad = false }
    }

    /// The logits ⟨w_k, y⟩, the prototype norms and the normalized bottleneck of features `x` [B, D].
    public func callAsFunction(_ x: Tensor) -> Output {
        var h = x
        for layer in mlp {
            switch layer {
            case let l as Linear: h = l(h)
            case let l as BatchNorm: h = l(h)
            case let l as GELU: h = l(h)
            default: preconditionFailure("DINOHead: unexpected layer \(type(of: layer))")
            }
        }
        let y = h.l2Normalized(alongAxis: -1)
        let directions = lastLayerDirection.l2Normalized(alongAxis: 1)
        let logits = y.matmul(directions.transposed()) * lastLayerScale.reshape([lastLayerScale.shape[0]])
        return Output(logits: logits, prototypeNorms: prototypeNorms, embedding: y)
    }

    /// ‖w_k‖ = |g_k| of every prototype: [K].
    public var prototypeNorms: Tensor { lastLayerScale.reshape([lastLayerScale.shape[0]]).abs() }

    /// DINO's `cancel_gradients_last_layer`: drops the gradients of the prototypes (v and g),
    /// so that the last layer stays put while the rest of the network settles.
    public func cancelLastLayerGradients() {
        lastLayerDirection.grad = nil
        lastLayerScale.grad = nil
    }
}
