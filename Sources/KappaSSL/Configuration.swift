import Kappa
import KappaNN

/// Which backbone to train.
public enum BackboneChoice: Codable, Sendable, Equatable {
    case vit(ViTConfiguration)
    case resnet(width: Int, channels: Int)

    /// A freshly initialized backbone of this kind.
    public func make(using g: inout RandomGenerator) -> FeatureEncoder {
        switch self {
        case .vit(let c): return VisionTransformer(c, using: &g)
        case .resnet(let w, let c): return ResNet(channels: c, width: w, using: &g)
        }
    }

    /// The width of the features the backbone returns (a ResNet-18 layout doubles its width
    /// three times: 8 → 64).
    public var featureCount: Int {
        switch self {
        case .vit(let c): return c.width
        case .resnet(let w, _): return w << 3
        }
    }

    /// Whether this is a Vision Transformer.
    public var isViT: Bool { if case .vit = self { return true } else { return false } }
}

/// Everything a teacher–student run is made of: the networks, the views, the optimizer's
/// schedules and the DINO-family loss. This type is the one place where a default is
/// written: the commands' options override its fields and print its values in their help,
/// and ``preset(method:backbone:imageSize:channels:mixedPolarity:)`` holds the decisions that
/// depend on the method, the backbone or the images. The defaults are tuned for 28–32-pixel
/// images on two cores; docs/defaults.md has the runs behind them.
public struct DINOConfiguration: Codable, Sendable, Equatable {
    /// The backbone. Default: a ResNet-18 layout of width 8, which on the built-in shapes and
    /// on MNIST learns faster than ViT-micro in the same time; iBOT needs a ViT.
    public var backbone = BackboneChoice.resnet(width: 8, channels: 1)
    /// K, the prototypes of the head's last layer (1…; 256). Too many for the data leaves
    /// most unused; too few merges classes (64 cost 5 points of kNN on the shapes).
    public var prototypes = 256
    /// Hidden width of the head's MLP (DINO: 2048; 256 fits two cores).
    public var headHidden = 256
    /// p, the bottleneck dimension: the vMF components live on S^{p−1} (2…; 64). The large-order
    /// normalizer is accurate from p ≈ 64 on.
    public var bottleneck = 64
    /// Linear layers of the head's MLP before the bottleneck (DINO: 3).
    public var headLayers = 3
    /// BatchNorm after the head's hidden layers (DINO's `use_bn_in_head`; default on). At
    /// initialization a small backbone maps all images to nearly the same output; standardizing
    /// over the batch makes the head see their differences, which small data needs.
    public var headBatchNorm = true
    /// L2-normalized prototypes (g fixed at 1), DINO's default; DINO-vMF (false) learns the norms.
    public var normalizedPrototypes = false
    /// Decay the prototype scale g as DINO's parameter groups do (its g has shape [K, 1]).
    public var decayPrototypeScale = true
    /// The loss: temperatures, centering, the vMF switches.
    public var loss = DINOLossConfiguration()
    /// The views. Default: ``MultiCropAugmentation/smallImages`` (mild crops, as small images
    /// need); DINO's are ``MultiCropAugmentation/dino``.
    public var augmentation = MultiCropAugmentation.smallImages
    /// Epochs (10 with the ResNet, about four minutes on 8,000 images and two cores; 20 with a ViT).
    public var epochs = 10
    /// Images per step and per process; each gives two global and `augmentation.localCrops`
    /// local views (64). With N processes (`mpirun -np N`) a step trains on N · batchSize
    /// images, as DINO's `batch_size_per_gpu`.
    public var batchSize = 64
    /// SyncBatchNorm when the run has several processes: every BatchNorm of the backbones
    /// and heads normalizes with the statistics of the whole batch, so that N processes train
    /// as one process with N times the batch (DINO converts its ResNets to SyncBatchNorm).
    /// nil is on; false lets each process normalize its own shard (less communication, another
    /// result). No effect with one process.
    public var synchronizeBatchNorm: Bool?
    /// lr = baseLearningRate · (N · batch)/256 after the warmup, then cosine to ``minLearningRate``.
    /// 1e-2 suits the ResNet (BatchNorm throughout); 2e-3 suits the ViTs. Too high makes the
    /// loss NaN or collapses the teacher.
    public var baseLearningRate = 1e-2
    /// The cosine schedule's final learning rate (DINO: 1e-6; 1e-5).
    public var minLearningRate = 1e-5
    /// Epochs of linear learning-rate warmup (0…epochs; 2, at most ``epochs``).
    public var warmupEpochs = 2
    /// AdamW weight decay at the start and at the end of its cosine schedule (DINO's 0.04 → 0.4);
    /// it also shrinks the learned prototype norms.
    public var weightDecay = 0.04, weightDecayEnd = 0.4
    /// Teacher EMA momentum at the start of its cosine schedule (0…1). Near 1 the teacher moves
    /// slowly; on small data 0.99 learns faster than DINO's 0.996.
    public var teacherMomentum = 0.99
    /// The momentum the cosine schedule ends at; nil is DINO's 1. Equal to ``teacherMomentum``
    /// for a constant EMA (the benchmark steps).
    public var teacherMomentumEnd: Double?
    /// Per-parameter gradient clipping norm (DINO: 3; 0 disables, as DINO's `--clip_grad 0`).
    /// A finite number, so that the configuration saved with a run is valid JSON.
    public var clipGradient = 3.0
    /// Epochs during which the head's last layer gets no gradient (DINO's `freeze_last_layer`, 1).
    public var freezeLastLayerEpochs = 1
    /// The seed of the initialization, the views and iBOT's masks: the same seed gives the
    /// same run.
    public var seed: UInt64 = 0
    /// iBOT: masked patch prediction added to the [CLS] loss (needs a ViT with a mask token).
    public var ibot: IBOTSettings?

    /// The defaults of every field.
    public init() {
        loss.dimension = bottleneck
    }

    /// DINO as published: normalized prototypes, no vMF term, logit centering.
    public mutating func useDINO() {
        normalizedPrototypes = true
        loss.vmfNormalization = false
        loss.probabilityCentering = false
    }

    /// The image channels the backbone takes.
    public var channels: Int {
        switch backbone {
        case .vit(let v): return v.channels
        case .resnet(_, let c): return c
        }
    }

    /// Throws ``TrainerError`` when no configuration can take `images`: not square (the views
    /// are square crops) or smaller than 4 pixels (local crops of half the size).
    public static func checkShape(of images: ImageDataset) throws {
        guard images.height == images.width else {
            throw TrainerError("\(images.source): images of \(images.height)×\(images.width) pixels; the views are square crops, so the images must be square")
        }
        guard images.height >= 4 else {
            throw TrainerError("\(images.source): images of \(images.height)×\(images.width) pixels; at least 4×4 are needed (local crops of half the size)")
        }
    }

    /// Throws ``TrainerError`` when `images` cannot go through this configuration's networks:
    /// another number of channels, images that are not square (the views are square crops) or
    /// smaller than 4 pixels, or (ViT) a side that does not divide into patches.
    public func check(_ images: ImageDataset) throws {
        guard images.channels == channels else {
            throw TrainerError("\(images.source): images of \(images.channels) channels, but the backbone takes \(channels)")
        }
        try Self.checkShape(of: images)
        if case .vit(let v) = backbone, images.height % v.patchSize != 0 {
            throw TrainerError("\(images.source): images of \(images.height) pixels do not divide into the ViT's \(v.patchSize)-pixel patches")
        }
    }

    /// The objective this configuration describes: ``IBOTObjective`` with ``ibot``, else
    /// ``DINOObjective``.
    public func makeObjective() -> SelfSupervisedObjective {
        var cls = loss
        cls.dimension = bottleneck
        if var settings = ibot {
            settings.patch.dimension = bottleneck
            return IBOTObjective(prototypes: prototypes, cls: cls, settings: settings)
        }
        return DINOObjective(prototypes: prototypes, configuration: cls)
    }
}

/// The methods of the paper, as the commands name them.
public enum SSLMethod: String, Codable, Sendable, CaseIterable {
    /// Learned prototype norms, vMF-normalized logits, probability centering.
    case dinoVMF = "dino-vmf"
    /// Normalized prototypes, plain logits, logit centering.
    case dino
    /// DINO-vMF's [CLS] term plus masked patch prediction (ViT only).
    case ibotVMF = "ibot-vmf"
    /// DINO's [CLS] term plus masked patch prediction (ViT only).
    case ibot

    /// Whether the method adds iBOT's masked-patch term.
    public var isIBOT: Bool { self == .ibotVMF || self == .ibot }
    /// Whether the method is a vMF variant.
    public var isVMF: Bool { self == .dinoVMF || self == .ibotVMF }
    /// The backbone a method trains when none is named: a ResNet for DINO, `vit-stem` for iBOT
    /// (masking needs patches; docs/vit.md compares the ViTs).
    public var defaultBackbone: BackbonePreset { isIBOT ? .vitStem : .resnet }
}

/// The backbones the commands offer.
public enum BackbonePreset: String, Codable, Sendable, CaseIterable {
    /// ResNet-18 layout of width 8.
    case resnet
    /// ViT 64 wide, 4 deep, 4 heads.
    case vitMicro = "vit-micro"
    /// ViT-Tiny: 192 wide, 12 deep, 3 heads.
    case vitTiny = "vit-tiny"
    /// ViT-Small: 384 wide, 12 deep, 6 heads.
    case vitSmall = "vit-small"
    /// ViT-micro's transformer on 4-pixel tokens from a convolutional stem
    /// (`ViTConfiguration.convMicro(imageSize:channels:)`; images of a multiple of 4 pixels).
    case vitConv = "vit-conv"
    /// ViT-micro with its patches cut from the feature map of one 3×3 convolution of 16
    /// channels (`ViTConfiguration.stemMicro(imageSize:patchSize:channels:)`): the same 16 tokens
    /// on 28 pixels, made from local features.
    case vitStem = "vit-stem"
}

extension DINOConfiguration {
    /// The configuration `DINOvMF` and `iBOTvMF` start from, before their options override
    /// single fields: the method's switches, the backbone for images of `imageSize` pixels and
    /// `channels` channels (ViTs take patches of 7 where the size divides by 7, else 4; epochs 20,
    /// 30 for `vit-stem`, and base learning rate 2e-3 instead of the ResNet's 10 and 1e-2; 30
    /// epochs of iBOT-vMF on `vit-stem` took 5.9 minutes on this machine's two cores), views of that size
    /// (local crops half the size, a multiple of the patch; none for `vit-stem`, which learns
    /// more from the two global crops alone on MNIST and on the built-in shapes, docs/vit.md), and iBOT's patch term. With
    /// `mixedPolarity` (data that draws light-on-dark and dark-on-light images at random, as the
    /// built-in shapes) half of the views are inverted.
    public static func preset(method: SSLMethod = .dinoVMF, backbone: BackbonePreset? = nil, imageSize: Int = 28, channels: Int = 1,
                              mixedPolarity: Bool = false) throws -> DINOConfiguration {
        guard imageSize >= 4, channels >= 1 else {
            throw TrainerError("images of \(imageSize) pixels and \(channels) channels: at least 4 pixels and one channel are needed")
        }
        var c = DINOConfiguration()
        if !method.isVMF { c.useDINO() }
        let kind = backbone ?? method.defaultBackbone
        let patch = imageSize % 7 == 0 ? 7 : (imageSize % 4 == 0 ? 4 : 0)
        switch kind {
        case .resnet:
            c.backbone = .resnet(width: 8, channels: channels)
        case .vitMicro, .vitTiny, .vitSmall, .vitConv, .vitStem:
            let tokenSize = kind == .vitConv ? 4 : patch
            guard tokenSize > 0, imageSize % tokenSize == 0 else {
                throw TrainerError("images of \(imageSize) pixels do not divide into \(kind == .vitConv ? "4" : "7- or 4")-pixel patches; use a ResNet")
            }
            var v = kind == .vitMicro ? ViTConfiguration.refMicro
                : kind == .vitTiny ? ViTConfiguration.tiny(imageSize: imageSize, patchSize: patch, channels: channels)
                : kind == .vitConv ? ViTConfiguration.convMicro(imageSize: imageSize, channels: channels)
                : kind == .vitStem ? ViTConfiguration.stemMicro(imageSize: imageSize, patchSize: patch, channels: channels)
                : ViTConfiguration.small(imageSize: imageSize, patchSize: patch, channels: channels)
            (v.imageSize, v.patchSize, v.channels) = (imageSize, tokenSize, channels)
            v.maskToken = method.isIBOT
            c.backbone = .vit(v)
            c.baseLearningRate = 2e-3
            c.epochs = 20
            if kind == .vitStem { (c.epochs, c.augmentation.localCrops) = (30, 0) }
        }
        if method.isIBOT {
            guard c.backbone.isViT else { throw TrainerError("iBOT needs a ViT backbone") }
            c.ibot = IBOTSettings(following: c.loss)
        }
        c.augmentation.globalSize = imageSize
        let tokenSize = kind == .vitConv ? 4 : (kind == .resnet ? 0 : patch)
        c.augmentation.localSize = localCropSize(imageSize: imageSize, tokenSize: tokenSize)
        c.augmentation.invertProbability = mixedPolarity ? 0.5 : 0
        return c
    }
}

extension DINOConfiguration {
    /// The side of a local crop: half the image, rounded down to a whole number of ViT tokens
    /// of `tokenSize` pixels (at least one token); half the image for a ResNet (`tokenSize` 0).
    public static func localCropSize(imageSize: Int, tokenSize: Int) -> Int {
        tokenSize > 0 ? Swift.max(tokenSize, (imageSize / 2) / tokenSize * tokenSize) : imageSize / 2
    }
}

/// The iBOT part of a run: the masked student's patch outputs predict the teacher's for the
/// same global view; the shared head maps patch tokens too.
public struct IBOTSettings: Codable, Sendable, Equatable {
    /// λ₂, the weight of the patch term (λ₁ = 1 for the [CLS] term; iBOT: 1).
    public var patchWeight = 1.0
    /// The patch term's loss settings: its own teacher temperature and center; the other
    /// fields normally equal the [CLS] term's (``init(following:teacherTemperature:)``).
    public var patch = DINOLossConfiguration()
    /// Which patches the student sees masked.
    public var masking = BlockMasking()

    public init() {}

    /// The patch term with the [CLS] term's settings but its own teacher temperature (iBOT:
    /// 0.04 here; its warmup temperature is the lower of the two).
    public init(following cls: DINOLossConfiguration, teacherTemperature: Double = 0.04) {
        patch = cls
        patch.teacherTemperature = teacherTemperature
        patch.warmupTeacherTemperature = Swift.min(cls.warmupTeacherTemperature, teacherTemperature)
    }
}
