// The command line of the DINOvMF and iBOTvMF programs: argument parsing and wiring only;
// the methods live in KappaSSL.
//
//     swift run -c release DINOvMF            # DINO-vMF on the built-in shapes dataset
//     swift run -c release iBOTvMF            # iBOT-vMF (ViT with masking)
//     swift run -c release DINOvMF --help
import ArgumentParser
import Foundation
import Kappa
import KappaNN
import KappaSSL
import Synchronization

public struct DataOptions: ParsableArguments {
    public init() {}
    @Option(help: "Dataset: 'builtin' (procedural shapes, no files), or a path to MNIST/Fashion-MNIST IDX files (raw or .gz), CIFAR-10 .bin batches or .npy arrays; the format is detected. A labeled file set is split into training and evaluation images.")
    var data = "builtin"
    @Option(help: "Training images (built-in data: generated; files: the first N). Default: 8000.")
    var trainCount = 8000
    @Option(help: "Evaluation images (built-in data: generated with another seed; files: the last N). Default: 2000.")
    var evalCount = 2000

    /// Whether `--data` is the built-in shapes.
    public var isBuiltin: Bool { data == "builtin" }

    /// The training and evaluation splits. Splits of a file set that do not fit are shrunk,
    /// with a warning line.
    public func load(seed: UInt64) throws -> (train: ImageDataset, test: ImageDataset) {
        guard trainCount >= 1 else { throw ValidationError("--train-count must be at least 1, not \(trainCount)") }
        guard evalCount >= 1 else { throw ValidationError("--eval-count must be at least 1, not \(evalCount)") }
        if isBuiltin {
            guard trainCount <= 200_000 && evalCount <= 200_000 else {
                throw ValidationError("--train-count and --eval-count must lie in 1...200000 for the built-in data (each image is generated in memory)")
            }
            return ShapesDataset.splits(train: trainCount, evaluation: evalCount, seed: seed)
        }
        let all = try DatasetFiles.load(data)
        guard all.labels != nil else { throw FileError(path: data, problem: "evaluation needs labels, and none were found") }
        guard all.count >= 2 else { throw FileError(path: data, problem: "only \(all.count) images; training and evaluation need at least one each") }
        let test = Swift.min(evalCount, all.count / 2)
        let train = Swift.min(trainCount, all.count - test)
        if test < evalCount || train < trainCount {
            warn("\(data) has \(all.count) images: training on the first \(train) (--train-count \(trainCount)) and evaluating on the last \(test) (--eval-count \(evalCount))")
        }
        return (all.subset(0..<train), all.subset((all.count - test)..<all.count))
    }
}

public struct ModelOptions: ParsableArguments {
    public init() {}
    typealias Method = SSLMethod
    enum CenteringChoice: String, ExpressibleByArgument, CaseIterable { case probability, logit, sinkhorn }
    enum AugmentationChoice: String, ExpressibleByArgument, CaseIterable { case small, dino }

    /// The defaults the help texts show: every option overrides a field of this configuration
    /// (or of the preset the method and backbone pick), so no default is written here.
    static let d = DINOConfiguration()
    static let vit = (try? DINOConfiguration.preset(method: .dinoVMF, backbone: .vitMicro)) ?? DINOConfiguration()
    static let stem = (try? DINOConfiguration.preset(method: .dinoVMF, backbone: .vitStem)) ?? DINOConfiguration()
    static let dinoViews = MultiCropAugmentation.dino

    @Option(help: "dino-vmf: learned prototype norms, vMF-normalized logits, probability centering; dino: normalized prototypes, plain logits, logit centering; ibot-vmf / ibot: the same plus masked patch prediction (ViT only). The three switches below override single parts (the paper's ablation). Default: \(KappaCommand.defaultMethod.rawValue).")
    var method: Method?
    var resolvedMethod: Method { method ?? KappaCommand.defaultMethod }
    @Option(help: "Override: add log C_p(‖w_k‖/τ) to the logits (true/false).")
    var vmfNormalization: Bool?
    @Option(help: "Override: L2-normalized prototypes, g fixed at 1 (true/false). With learned norms and no vMF term the mixture is unnormalized and can favour large-norm prototypes.")
    var normalizedPrototypes: Bool?
    @Option(help: "Override: teacher centering: probability (DINO-vMF), logit (DINO; cancels the vMF term per component), sinkhorn (3 Sinkhorn-Knopp iterations).")
    var centering: CenteringChoice?
    @Flag(help: "Use the exact Bessel normalizer instead of the paper's large-order approximation (slower, same results for p ≥ 64).")
    var exactNormalizer = false
    @Option(help: "Backbone: resnet (ResNet-18 layout, --resnet-width), vit-micro (64 wide, 4 deep, 4 heads), vit-tiny (192, 12, 3), vit-small (384, 12, 6), vit-conv (vit-micro's transformer on 4-pixel tokens from a convolutional stem), vit-stem (vit-micro with its patches cut from a 3×3 convolution's 16 feature maps). ViTs use patch 7 on 28-pixel images, 4 on 32-pixel ones. Default: \(SSLMethod.dinoVMF.defaultBackbone.rawValue) for DINO, \(SSLMethod.ibotVMF.defaultBackbone.rawValue) for iBOT (masking needs patches).")
    var backbone: BackbonePreset?
    @Option(help: "ResNet width (64 is ResNet-18's); small values train fast on two cores. Default: 8.")
    var resnetWidth: Int?
    @Option(help: "Prototypes K. Too many for the data leaves most unused; too few merges classes. Default: \(d.prototypes).")
    var prototypes: Int?
    @Option(help: "Bottleneck dimension p (the sphere S^{p-1} of the vMF components). Default: \(d.bottleneck).")
    var bottleneck: Int?
    @Option(help: "Hidden width of the head's MLP. Default: \(d.headHidden).")
    var headHidden: Int?
    @Option(help: "BatchNorm after the head's hidden layers (DINO's --use_bn_in_head; true/false). Default: \(d.headBatchNorm).")
    var headBatchNorm: Bool?
    @Option(help: "ViT: patch size in pixels (DINO's --patch_size; the image side must divide by it, and vit-conv's stem makes 4). Default: 7 on 28-pixel images, 4 on 32-pixel ones.")
    var patchSize: Int?
    @Option(help: "ViT: stochastic depth of the last block, linear from 0 in the first (DINO's --drop_path_rate). Default: \(ViTConfiguration.refMicro.dropPathRate).")
    var dropPath: Double?
    @Option(help: "Epochs. Default: \(d.epochs) with a ResNet, \(stem.epochs) with vit-stem, \(vit.epochs) with the other ViTs.")
    var epochs: Int?
    @Option(help: "Images per batch and per process (each gives 2 global + --local-crops local views); under mpirun -np N a step trains on N × this. Default: \(d.batchSize).")
    var batchSize: Int?
    @Option(help: "With several processes (mpirun): SyncBatchNorm, every BatchNorm normalizing over the whole batch (true/false). Default: true.")
    var syncBatchNorm: Bool?
    @Option(help: "Base learning rate, scaled by batch/256 (AdamW, linear warmup then cosine). Too high makes the loss NaN or collapses the teacher. Default: \(d.baseLearningRate) with a ResNet (BatchNorm throughout), \(vit.baseLearningRate) with a ViT.")
    var lr: Double?
    @Option(help: "Final learning rate of the cosine schedule. Default: \(d.minLearningRate).")
    var minLr: Double?
    @Option(help: "Warmup epochs of the learning rate. Default: \(d.warmupEpochs), or --epochs if fewer.")
    var warmupEpochs: Int?
    @Option(help: "Weight decay at the start (cosine to --weight-decay-end); it also shrinks the learned prototype norms. Default: \(d.weightDecay).")
    var weightDecay: Double?
    @Option(help: "Weight decay at the end. Default: \(d.weightDecayEnd).")
    var weightDecayEnd: Double?
    @Flag(help: "Exempt the prototype norms g from weight decay (DINO decays them: its g has shape [K, 1]).")
    var noDecayOnNorms = false
    @Option(help: "Teacher EMA momentum at the start (cosine to 1). Near 1 the teacher moves slowly; on small data 0.99 learns faster than DINO's 0.996. Default: \(d.teacherMomentum).")
    var teacherMomentum: Double?
    @Option(help: "Student temperature τ_s. Default: \(d.loss.studentTemperature).")
    var studentTemp: Double?
    @Option(help: "Teacher temperature τ_t after warmup (0.04 … 0.07); lower is sharper targets, too high lets the teacher go uniform. Default: \(d.loss.teacherTemperature).")
    var teacherTemp: Double?
    @Option(help: "Teacher temperature at epoch 0. Default: \(d.loss.warmupTeacherTemperature).")
    var warmupTeacherTemp: Double?
    @Option(help: "Epochs of teacher-temperature warmup. Default: \(d.loss.warmupTeacherEpochs).")
    var warmupTeacherEpochs: Int?
    @Option(help: "Center momentum m. Default: \(d.loss.centerMomentum).")
    var centerMomentum: Double?
    @Option(help: "Per-parameter gradient clipping norm (0 disables). Default: \(d.clipGradient).")
    var clipGrad: Double?
    @Option(help: "Epochs during which the last layer's gradient is dropped. Default: \(d.freezeLastLayerEpochs).")
    var freezeLastLayer: Int?
    @Option(help: "Views: small (global crops of \(Int(100 * d.augmentation.globalScale.lowerBound))–100% of the image, local \(Int(100 * d.augmentation.localScale.lowerBound))–\(Int(100 * d.augmentation.localScale.upperBound))%, brightness/contrast jitter \(d.augmentation.brightness), no flip, blur or solarization: what learns on 28–32-pixel images from scratch here) or dino (METHOD.md's: global 40–100%, local 5–40%, flip, color jitter, blur, solarization). --global-crop-min and --local-crop-min override the crop ranges; --rotation, --translation, --invert-probability and --noise add to either. Default: small.")
    var augmentation: AugmentationChoice?
    @Option(help: "Local crops per image. Default: \(d.augmentation.localCrops), \(stem.augmentation.localCrops) with vit-stem (on 28-pixel images its 14-pixel local crops of 4 tokens cost kNN; docs/vit.md).")
    var localCrops: Int?
    @Option(help: "Side of a local crop in pixels (DINO's is 96 for 224-pixel images); with a ViT a multiple of its token size. Default: half the image, rounded down to whole tokens.")
    var localCropSize: Int?
    @Option(help: "Smallest area share of a global crop (local crops span --local-crop-min up to this). Default: \(d.augmentation.globalScale.lowerBound) with small views, \(dinoViews.globalScale.lowerBound) with dino.")
    var globalCropMin: Double?
    @Option(help: "Probability of inverting a view (x → 1 − x); not in DINO. Default: 0.5 with small views on the built-in data, whose images are light on dark or dark on light at random; else 0.")
    var invertProbability: Double?
    @Option(help: "Largest rotation of a view in degrees (uniform in ±this, edges repeated); not in DINO. Default: \(d.augmentation.rotationDegrees).")
    var rotation: Double?
    @Option(help: "Largest shift of a view as a share of the image side (uniform in ±this per axis, edges repeated); not in DINO. Default: \(d.augmentation.translation).")
    var translation: Double?
    @Option(help: "Largest standard deviation of Gaussian pixel noise added to a view (each view draws its own in [0, this]). Default: \(d.augmentation.noiseStd).")
    var noise: Double?
    @Option(help: "Smallest area share of a local crop. Default: \(d.augmentation.localScale.lowerBound) with small views, \(dinoViews.localScale.lowerBound) with dino (on 28-pixel images a 6-pixel patch that may miss the object), at most --global-crop-min.")
    var localCropMin: Double?

    static let ibot = IBOTSettings(following: DINOConfiguration().loss)
    @Option(help: "iBOT: weight λ₂ of the masked-patch term (λ₁ = 1). Default: \(ibot.patchWeight).")
    var patchWeight: Double?
    @Option(help: "iBOT: teacher temperature of the patch term. Default: \(ibot.patch.teacherTemperature).")
    var patchTeacherTemp: Double?
    @Option(help: "iBOT: share of the patches masked in a masked image, drawn from [--mask-ratio-min, --mask-ratio-max]. Default: \(ibot.masking.ratio.lowerBound).")
    var maskRatioMin: Double?
    @Option(help: "iBOT: largest masked share. Default: \(ibot.masking.ratio.upperBound).")
    var maskRatioMax: Double?
    @Option(help: "iBOT: probability that an image is masked at all. Default: \(ibot.masking.probability).")
    var maskProbability: Double?

    /// The run's configuration: the preset of the method and backbone for these images, with
    /// every option given on the command line put over it. `mixedPolarity`: the data draws
    /// light-on-dark and dark-on-light images at random (the built-in shapes), so the small
    /// views invert half of the views. Argument errors are thrown (and printed by
    /// ArgumentParser), never preconditions.
    ///
    /// With `base` (the configuration of a run being resumed) the options are put over it
    /// instead, so that `--resume` needs only the options that change something.
    func configuration(imageSize: Int, channels: Int, seed: UInt64, mixedPolarity: Bool,
                       base: DINOConfiguration? = nil) throws -> DINOConfiguration {
        let views = augmentation ?? .small
        var c: DINOConfiguration
        do {
            let preset = try DINOConfiguration.preset(method: resolvedMethod, backbone: backbone, imageSize: imageSize, channels: channels,
                                                      mixedPolarity: mixedPolarity && views == .small)
            if var b = base {
                if method != nil {
                    (b.normalizedPrototypes, b.loss.vmfNormalization, b.loss.probabilityCentering) =
                        (preset.normalizedPrototypes, preset.loss.vmfNormalization, preset.loss.probabilityCentering)
                    if (b.ibot != nil) != (preset.ibot != nil) { (b.ibot, b.backbone) = (preset.ibot, preset.backbone) }
                }
                if backbone != nil { b.backbone = preset.backbone }
                if augmentation == .small {
                    var a = MultiCropAugmentation.smallImages
                    (a.globalSize, a.localSize, a.localCrops, a.invertProbability) = (b.augmentation.globalSize, b.augmentation.localSize,
                                                                                      b.augmentation.localCrops, b.augmentation.invertProbability)
                    b.augmentation = a
                }
                c = b
            } else {
                c = preset
            }
        } catch {
            throw ValidationError("\(error) (--backbone)")
        }
        if let vmfNormalization { c.loss.vmfNormalization = vmfNormalization }
        if let normalizedPrototypes { c.normalizedPrototypes = normalizedPrototypes }
        switch centering {
        case .probability?: c.loss.probabilityCentering = true
        case .logit?: c.loss.probabilityCentering = false
        case .sinkhorn?: c.loss.sinkhornIterations = 3
        case nil: break
        }
        if exactNormalizer { c.loss.normalizerExact = true }
        if let resnetWidth, case .resnet(_, let ch) = c.backbone { c.backbone = .resnet(width: resnetWidth, channels: ch) }
        if let prototypes { c.prototypes = prototypes }
        if let bottleneck { c.bottleneck = bottleneck }
        c.loss.dimension = c.bottleneck
        if let headHidden { c.headHidden = headHidden }
        if let headBatchNorm { c.headBatchNorm = headBatchNorm }
        if patchSize != nil || dropPath != nil {
            guard case .vit(var v) = c.backbone else { throw ValidationError("--patch-size and --drop-path need a ViT (--backbone)") }
            if let patchSize {
                guard v.convolutionalStem == nil else { throw ValidationError("--patch-size: vit-conv's stem makes 4-pixel tokens; use vit-micro, vit-tiny or vit-small") }
                guard patchSize >= 1 && v.imageSize % patchSize == 0 else {
                    throw ValidationError("--patch-size \(patchSize) does not divide the \(v.imageSize)-pixel images")
                }
                v.patchSize = patchSize
                c.augmentation.localSize = DINOConfiguration.localCropSize(imageSize: v.imageSize, tokenSize: patchSize)
            }
            if let dropPath {
                guard dropPath.isFinite && (0..<1).contains(dropPath) else { throw ValidationError("--drop-path must lie in [0, 1), not \(dropPath)") }
                v.dropPathRate = dropPath
            }
            c.backbone = .vit(v)
        }
        if let epochs { c.epochs = epochs }
        if let batchSize { c.batchSize = batchSize }
        if let syncBatchNorm { c.synchronizeBatchNorm = syncBatchNorm }
        if let lr { c.baseLearningRate = lr }
        if let minLr { c.minLearningRate = minLr }
        c.warmupEpochs = warmupEpochs ?? Swift.min(c.warmupEpochs, Swift.max(c.epochs, 0))
        if let weightDecay { c.weightDecay = weightDecay }
        if let weightDecayEnd { c.weightDecayEnd = weightDecayEnd }
        if noDecayOnNorms { c.decayPrototypeScale = false }
        if let teacherMomentum { c.teacherMomentum = teacherMomentum }
        if let clipGrad { c.clipGradient = clipGrad }
        if let freezeLastLayer { c.freezeLastLayerEpochs = freezeLastLayer }
        if let studentTemp { c.loss.studentTemperature = studentTemp }
        if let teacherTemp { c.loss.teacherTemperature = teacherTemp }
        if let warmupTeacherTemp { c.loss.warmupTeacherTemperature = warmupTeacherTemp }
        if let warmupTeacherEpochs { c.loss.warmupTeacherEpochs = warmupTeacherEpochs }
        if let centerMomentum { c.loss.centerMomentum = centerMomentum }
        if views == .dino {
            var a = MultiCropAugmentation.dino
            (a.globalSize, a.localSize, a.localCrops, a.invertProbability) = (c.augmentation.globalSize, c.augmentation.localSize,
                                                                              c.augmentation.localCrops, c.augmentation.invertProbability)
            c.augmentation = a
        }
        if let localCrops { c.augmentation.localCrops = localCrops }
        if let localCropSize {
            var token = 1
            if case .vit(let v) = c.backbone { token = v.patchSize }
            guard (token...c.augmentation.globalSize).contains(localCropSize) && localCropSize % token == 0 else {
                throw ValidationError("--local-crop-size must lie in \(token)...\(c.augmentation.globalSize) (the image side)"
                                      + (token > 1 ? " and be a multiple of the ViT's \(token)-pixel tokens" : "") + ", not \(localCropSize)")
            }
            c.augmentation.localSize = localCropSize
        }
        if let invertProbability { c.augmentation.invertProbability = invertProbability }
        if let rotation { c.augmentation.rotationDegrees = rotation }
        if let translation { c.augmentation.translation = translation }
        if let noise { c.augmentation.noiseStd = noise }
        let global = globalCropMin ?? c.augmentation.globalScale.lowerBound
        let local = localCropMin ?? Swift.min(global, c.augmentation.localScale.lowerBound)
        if let ibot = c.ibot {
            var s = IBOTSettings(following: c.loss, teacherTemperature: patchTeacherTemp ?? ibot.patch.teacherTemperature)
            s.patchWeight = patchWeight ?? ibot.patchWeight
            let (low, high) = (maskRatioMin ?? ibot.masking.ratio.lowerBound, maskRatioMax ?? ibot.masking.ratio.upperBound)
            guard 0 <= low && low <= high && high < 1 else {
                throw ValidationError("mask ratios must satisfy 0 ≤ --mask-ratio-min ≤ --mask-ratio-max < 1, not \(low) and \(high)")
            }
            s.masking = BlockMasking(ratio: low...high, probability: maskProbability ?? ibot.masking.probability,
                                     minimumBlock: ibot.masking.minimumBlock)
            c.ibot = s
        }
        c.seed = seed
        try validate(c, global: global, local: local)
        c.augmentation.globalScale = global...1
        c.augmentation.localScale = local...global
        return c
    }

    /// Each check names the option that breaks it.
    func validate(_ c: DINOConfiguration, global: Double, local: Double) throws {
        func check(_ ok: Bool, _ message: @autoclosure () -> String) throws { if !ok { throw ValidationError(message()) } }
        func unit(_ x: Double) -> Bool { x >= 0 && x <= 1 }
        // Upper bounds keep a mistyped size from asking for more memory than a machine has.
        func within(_ value: Int, _ range: ClosedRange<Int>, _ option: String) throws {
            try check(range.contains(value), "\(option) must lie in \(range.lowerBound)...\(range.upperBound), not \(value)")
        }
        try within(c.epochs, 1...100_000, "--epochs")
        try check((0...Swift.max(c.epochs, 0)).contains(c.warmupEpochs), "--warmup-epochs must lie in 0...\(c.epochs) (--epochs), not \(c.warmupEpochs)")
        try within(c.loss.warmupTeacherEpochs, 0...100_000, "--warmup-teacher-epochs")
        try within(c.batchSize, 1...4096, "--batch-size")
        try within(c.prototypes, 1...65_536, "--prototypes")
        try within(c.bottleneck, 2...4096, "--bottleneck")
        try within(c.headHidden, 1...16_384, "--head-hidden")
        if case .resnet(let w, _) = c.backbone { try within(w, 1...256, "--resnet-width") }
        try within(c.augmentation.localCrops, 0...32, "--local-crops")
        try within(c.freezeLastLayerEpochs, 0...100_000, "--freeze-last-layer")
        for (value, name) in [(c.baseLearningRate, "--lr"), (c.loss.studentTemperature, "--student-temp"),
                              (c.loss.teacherTemperature, "--teacher-temp"), (c.loss.warmupTeacherTemperature, "--warmup-teacher-temp")] {
            try check(value.isFinite && value > 0, "\(name) must be a positive number, not \(value)")
        }
        for (value, name) in [(c.minLearningRate, "--min-lr"), (c.weightDecay, "--weight-decay"), (c.weightDecayEnd, "--weight-decay-end")] {
            try check(value.isFinite && value >= 0, "\(name) must be a number of at least 0, not \(value)")
        }
        try check(c.clipGradient.isFinite && c.clipGradient >= 0, "--clip-grad must be a number of at least 0 (0 disables clipping), not \(c.clipGradient)")
        for (value, name) in [(c.teacherMomentum, "--teacher-momentum"), (c.loss.centerMomentum, "--center-momentum"),
                              (c.augmentation.invertProbability, "--invert-probability"), (c.augmentation.translation, "--translation"),
                              (c.augmentation.noiseStd, "--noise")] {
            try check(unit(value), "\(name) must lie in [0, 1], not \(value)")
        }
        try check((0...180).contains(c.augmentation.rotationDegrees), "--rotation must lie in [0, 180] degrees")
        try check(0 < global && global <= 1, "--global-crop-min must lie in (0, 1]")
        try check(0 < local && local <= global, "--local-crop-min must lie in (0, --global-crop-min = \(global)]")
        if let s = c.ibot {
            try check(s.patchWeight.isFinite && s.patchWeight >= 0, "--patch-weight must be a number of at least 0")
            try check(s.patch.teacherTemperature.isFinite && s.patch.teacherTemperature > 0, "--patch-teacher-temp must be positive")
            try check(unit(s.masking.probability), "--mask-probability must lie in [0, 1]")
        }
    }
}

/// The system's reason for a failed file operation, without Foundation's dump.
func reason(_ error: Error) -> String {
    let ns = error as NSError
    if let u = ns.userInfo[NSUnderlyingErrorKey] as? NSError, u.domain == NSPOSIXErrorDomain { return String(cString: strerror(Int32(u.code))) }
    if ns.domain == NSPOSIXErrorDomain { return String(cString: strerror(Int32(ns.code))) }
    return ns.localizedDescription
}

/// The command line of this run as `swift run` would repeat it, quoted for a shell.
func reproducingCommand() -> String {
    func quoted(_ a: String) -> String {
        a.allSatisfy { $0.isLetter || $0.isNumber || "-_./=:+,".contains($0) } && !a.isEmpty ? a : "'" + a.replacingOccurrences(of: "'", with: "'\\''") + "'"
    }
    return (["swift", "run", "-c", "release", KappaCommand.name] + CommandLine.arguments.dropFirst()).map(quoted).joined(separator: " ")
}

/// A warning line: legal but surprising (a shrunken split, a clamped warmup).
func warn(_ message: String) {
    print("warning: " + message)
    fflush(stdout)
}

/// Threads, for every subcommand.
public struct ThreadOptions: ParsableArguments {
    public init() {}
    @Option(help: "Threads for kernels and BLAS (default: all cores).")
    var threads: Int?

    func apply() throws {
        if let threads {
            guard (1...1024).contains(threads) else { throw ValidationError("--threads must lie in 1...1024, not \(threads)") }
            Threads.count = threads
        }
    }
}

/// The options of a training run's outputs.
public struct Common: ParsableArguments {
    public init() {}
    @Option(help: "Output folder for metrics.jsonl, plots (SVG) and checkpoint.safetensors (created if missing).")
    var output = "runs/" + (KappaCommand.objectiveName ?? KappaCommand.defaultMethod.rawValue)
    @Option(help: "Random seed: the same seed gives the same run. Default: 0 (with --resume, the run's).")
    var seed: UInt64?
    /// The seed: `--seed`, else (resuming) the run's, else 0.
    func resolvedSeed(_ base: DINOConfiguration?) -> UInt64 { seed ?? base?.seed ?? 0 }
    @OptionGroup var threading: ThreadOptions
    @Option(help: "Evaluate every N epochs (and at the end). Default: \(TrainingSession.defaultEvaluateEvery).")
    var evalEvery: Int?
    @Flag(help: "Under mpirun: start each bucket's gradient allreduce while backward runs (nonblocking MPI) instead of after it. Same results; slower on one machine whose cores all compute, may pay across machines.")
    var overlapAllreduce = false

    /// Checks the options; the output folder must be a folder if it exists.
    func apply() throws {
        if let evalEvery, evalEvery < 1 { throw ValidationError("--eval-every must be at least 1, not \(evalEvery)") }
        try threading.apply()
        var isFolder: ObjCBool = false
        if FileManager.default.fileExists(atPath: output, isDirectory: &isFolder), !isFolder.boolValue {
            throw ValidationError("--output \(output) is a file, not a folder")
        }
    }

    /// Creates the output folder (once everything else is checked) and checks that it is writable.
    func makeOutput() throws {
        do {
            try FileManager.default.createDirectory(atPath: output, withIntermediateDirectories: true)
        } catch {
            throw ValidationError("--output \(output): the folder cannot be made (\(reason(error))); name a writable folder")
        }
        guard FileManager.default.isWritableFile(atPath: output) else { throw ValidationError("--output \(output) is not writable") }
    }
}

/// The program: `DINOvMF` or `iBOTvMF`, which differ only in name and default method, or a
/// program of a new objective (`Examples/KoLeo`), which sets ``makeObjective`` and gets the
/// same command line, progress, metrics, plots, checkpoints, resume and report.
public struct KappaCommand: ParsableCommand {
    nonisolated(unsafe) public static var name = "DINOvMF"
    nonisolated(unsafe) public static var defaultMethod = SSLMethod.dinoVMF
    /// The objective to train for a configuration; nil trains the configuration's own
    /// (``DINOConfiguration/makeObjective()``). Throw `ValidationError` for a configuration
    /// the objective cannot serve.
    nonisolated(unsafe) public static var makeObjective: ((DINOConfiguration) throws -> SelfSupervisedObjective)?
    /// The name runs are reported under; nil is the `--method`'s.
    nonisolated(unsafe) public static var objectiveName: String?
    /// More text for `--help` (a new objective's own options).
    nonisolated(unsafe) public static var discussion = ""

    public static var configuration: CommandConfiguration {
        CommandConfiguration(
            commandName: name,
            abstract: "Self-supervised \(defaultMethod.isIBOT ? "iBOT-vMF / iBOT" : "DINO-vMF / DINO") training and evaluation on a CPU.",
            discussion: (discussion.isEmpty ? "" : discussion + "\n\n")
                + "Exit status: 0 done; 1 a data or checkpoint error (the message names the file); 2 the loss became NaN; 64 a usage error (the message names the option); 130 stopped by Ctrl-C, checkpoint saved (continue with --resume).", subcommands: [Train.self, Eval.self, Ablation.self, Compare.self], defaultSubcommand: Train.self)
    }

    public init() {}
}

/// Set by SIGINT (Ctrl-C) while a command trains: the session saves a checkpoint and stops.
let interruptRequested = Atomic<Bool>(false)

/// Runs `session` with Ctrl-C turned into a clean stop (checkpoint saved), then restores the
/// default handler.
func runStoppable(_ session: TrainingSession, resume: Bool = false) throws -> TrainingSession.Outcome {
    interruptRequested.store(false, ordering: .relaxed)
    signal(SIGINT) { _ in interruptRequested.store(true, ordering: .relaxed) }
    // A parent may have blocked SIGINT (children inherit the mask): unblock it on this thread.
    var set = sigset_t()
    sigemptyset(&set)
    sigaddset(&set, SIGINT)
    pthread_sigmask(SIG_UNBLOCK, &set, nil)
    defer { signal(SIGINT, SIG_DFL) }
    let trainer = session.trainer
    session.shouldStop = {
        interruptRequested.load(ordering: .relaxed)
            || (HostSetup.interruptAtStep.map { Distributed.isMain && trainer.step >= $0 } ?? false)
    }
    return try session.run(resume: resume)
}

/// The trainer for `config` on `train`: a batch larger than the data is a usage error, data
/// the networks cannot take a data error (``TrainerError``, naming the file).
func makeTrainer(_ config: DINOConfiguration, _ train: ImageDataset) throws -> TeacherStudentTrainer {
    guard config.batchSize * Distributed.size <= train.count else {
        throw ValidationError("--batch-size \(config.batchSize)\(Distributed.size > 1 ? " × \(Distributed.size) processes" : "") exceeds the \(train.count) training images of \(train.source)")
    }
    let objective = try KappaCommand.makeObjective?(config)
    return try TeacherStudentTrainer(configuration: config, objective: objective, train: train)
}

struct Train: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Train, then report kNN and linear-probe accuracy next to two baselines (default).")
    @OptionGroup var data: DataOptions
    @OptionGroup var model: ModelOptions
    @OptionGroup var common: Common
    @Flag(help: "Continue the run saved in --output (after Ctrl-C or a crash). Options not given keep the run's values; one that changes the configuration, the objective or the dataset is refused.")
    var resume = false
    @Flag(help: "With --resume: continue a run for more epochs than it was started with (--epochs, larger). The schedules become those of the longer run from the step reached.")
    var extend = false
    @Flag(help: "Skip the final linear probe.")
    var noLinearProbe = false
    @Flag(help: "Check the options, the data and (with --resume) the checkpoint, build the networks, run one step on two images and an evaluation on a few, and stop; nothing is written.")
    var dryRun = false

    func run() throws {
        guard !extend || resume else { throw ValidationError("--extend continues a saved run: use it with --resume") }
        try common.apply()
        // Resuming: the options not given keep the run's values.
        let checkpoint = URL(fileURLWithPath: common.output).appendingPathComponent("checkpoint.safetensors")
        let base = resume && FileManager.default.fileExists(atPath: checkpoint.path) ? try RunCheckpoint.configuration(in: checkpoint) : nil
        let seed = common.resolvedSeed(base)
        let (train, test) = try data.load(seed: seed)
        try DINOConfiguration.checkShape(of: train)
        let config = try model.configuration(imageSize: train.height, channels: train.channels, seed: seed,
                                             mixedPolarity: data.isBuiltin, base: base)
        if base == nil && model.warmupEpochs == nil && config.warmupEpochs < DINOConfiguration().warmupEpochs {
            warn("the learning-rate warmup is \(config.warmupEpochs) epoch\(config.warmupEpochs == 1 ? "" : "s"), clamped to --epochs \(config.epochs)")
        }
        // The run's name: the objective's, the --method given, or (resuming) what the configuration is.
        let inferred = (config.ibot != nil ? "ibot" : "dino") + (config.loss.vmfNormalization ? "-vmf" : "")
        let method = KappaCommand.objectiveName ?? model.method?.rawValue ?? inferred
        print("\(method) on \(train.source): \(train.count) training and \(test.count) evaluation images, \(Threads.count) threads\(Distributed.size > 1 ? " in each of \(Distributed.size) processes (batch \(Distributed.size) × \(config.batchSize))" : "") (OpenBLAS \(HostKernels.openBLASCore), \(HostKernels.kernelSummary))")
        let trainer = try makeTrainer(config, train)
        trainer.overlapsGradientAveraging = common.overlapAllreduce
        let evaluator = try Evaluator(reference: train, test: test)
        if dryRun { return try Self.dryRun(trainer, train, test, resume ? common.output : nil, extend: extend) }
        try common.makeOutput()
        let session = TrainingSession(trainer: trainer, evaluator: evaluator, output: common.output)
        session.allowsLongerRun = extend
        if let every = common.evalEvery { session.evaluateEvery = every }
        session.linearProbe = !noLinearProbe
        session.name = method
        session.command = reproducingCommand()
        let outcome = try runStoppable(session, resume: resume)
        if outcome.interrupted {
            print("stopped; continue with --resume --output \(common.output)")
            throw ExitCode(130)
        }
        if let r = outcome.report {
            print("\n" + TrainingSession.describe(r, name: method, seconds: outcome.seconds))
            print("outputs in \(common.output)/: report.html, metrics.jsonl, TensorBoard events, loss.svg, knn.svg, norms.svg, utilization.svg, checkpoint.safetensors")
        }
        if outcome.diverged { throw ExitCode(2) }
    }

    /// One step on two images and an evaluation on a few, after the checkpoint (if any) is
    /// restored: everything a run would check, in seconds, writing nothing.
    static func dryRun(_ trainer: TeacherStudentTrainer, _ train: ImageDataset, _ test: ImageDataset, _ resumeFrom: String?,
                       extend: Bool) throws {
        if let resumeFrom {
            let url = URL(fileURLWithPath: resumeFrom).appendingPathComponent("checkpoint.safetensors")
            guard FileManager.default.fileExists(atPath: url.path) else { throw FileError(path: url.path, problem: "no checkpoint to resume from") }
            try RunCheckpoint.restore(trainer, from: url, allowingLongerRun: extend)
        }
        let few = train.subset(0..<Swift.min(2, train.count))
        let loader = MultiCropLoader(dataset: few, augmentation: trainer.configuration.augmentation, batchSize: few.count,
                                     seed: trainer.configuration.seed, epoch: trainer.epoch)
        defer { loader.stop() }
        guard let batch = loader.next() else { throw TrainerError("\(train.source): no batch of views could be made") }
        let step = trainer.step(ObjectiveBatch(views: batch.views, globalCount: 2, labels: batch.labels))
        let report = try Evaluator(reference: train.subset(0..<Swift.min(8, train.count)), test: test.subset(0..<Swift.min(4, test.count)))
            .evaluate(trainer, linearProbe: false)
        print(String(format: "dry run: options, data%@ and networks check out; one step on %d images: loss %.4f; kNN on 8 + 4 images %.0f%%; nothing written",
                     resumeFrom == nil ? "" : ", checkpoint", few.count, step.loss, 100 * report.knn))
    }
}

struct Eval: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Evaluate a checkpoint (kNN, linear probe, utilization, norms) on a dataset.")
    @Option(help: "checkpoint.safetensors written by train.")
    var checkpoint: String
    @OptionGroup var data: DataOptions
    @OptionGroup var threading: ThreadOptions

    func run() throws {
        try threading.apply()
        let url = URL(fileURLWithPath: checkpoint)
        let config = try RunCheckpoint.configuration(in: url)
        let (train, test) = try data.load(seed: config.seed)
        for split in [train, test] { try config.check(split) }
        // Evaluation needs the networks only: no batch of training images.
        let trainer = try TeacherStudentTrainer(configuration: config, objective: try KappaCommand.makeObjective?(config),
                                                iterationsPerEpoch: Swift.max(1, train.count / config.batchSize))
        try RunCheckpoint.restore(trainer, from: url, checkingData: false)
        let start = Date()
        let report = try Evaluator(reference: train, test: test).evaluate(trainer)
        print(TrainingSession.describe(report, name: checkpoint, seconds: Date().timeIntervalSince(start)))
    }
}

/// One run of the ablation grid, as its table shows it.
struct AblationCell {
    let knn: Double?
    let probe: Double?
    let utilization: Int
    let norms: Evaluation.Summary?
    let state: String
}

struct Ablation: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "The paper's ablation grid (normalized prototypes × vMF normalization × probability centering) on a short budget, as one table.")
    @OptionGroup var data: DataOptions
    @OptionGroup var model: ModelOptions
    @OptionGroup var common: Common
    @Option(help: "Epochs of each run (the short budget; overrides --epochs).")
    var budgetEpochs = 5
    @Option(parsing: .upToNextOption, help: "Seeds: each cell is trained once per seed (initialization, views, masks) and the table gives each seed's figures, for example --seeds 0 1; the built-in data is generated with the first. Default: --seed.")
    var seeds: [UInt64] = []
    @Flag(help: "Skip the linear probe of each run.")
    var noLinearProbe = false

    func run() throws {
        try common.apply()
        guard budgetEpochs >= 1 else { throw ValidationError("--budget-epochs must be at least 1, not \(budgetEpochs)") }
        guard seeds.isEmpty || common.seed == nil else { throw ValidationError("--seed and --seeds: give one of them") }
        let seedList = seeds.isEmpty ? [common.resolvedSeed(nil)] : seeds
        guard Set(seedList).count == seedList.count else { throw ValidationError("--seeds \(seedList.map(String.init).joined(separator: " ")) names a seed twice") }
        let (train, test) = try data.load(seed: seedList[0])
        try DINOConfiguration.checkShape(of: train)
        let evaluator = try Evaluator(reference: train, test: test)
        try common.makeOutput()
        var records: [RunRecord] = []
        var rows: [String] = []
        let grid = [true, false].flatMap { normalized in [false, true].flatMap { vmf in [false, true].map { (normalized, vmf, $0) } } }
        for (normalized, vmf, probability) in grid {
            var cells: [AblationCell] = []
            for seed in seedList {
                var m = model
                (m.normalizedPrototypes, m.vmfNormalization, m.centering) = (normalized, vmf, probability ? .probability : .logit)
                m.epochs = budgetEpochs
                m.warmupEpochs = m.warmupEpochs.map { Swift.min($0, budgetEpochs) }
                let config = try m.configuration(imageSize: train.height, channels: train.channels, seed: seed,
                                                 mixedPolarity: data.isBuiltin)
                var name = "norm-protos=\(normalized) vmf=\(vmf) prob-center=\(probability)"
                if seedList.count > 1 { name += " seed=\(seed)" }
                print("== \(name)")
                let session = TrainingSession(trainer: try makeTrainer(config, train), evaluator: evaluator,
                                              output: common.output + "/" + name.replacingOccurrences(of: " ", with: "_"))
                session.evaluateEvery = Swift.max(1, budgetEpochs)
                session.linearProbe = !noLinearProbe
                let outcome = try runStoppable(session)
                if outcome.interrupted { throw ExitCode(130) }
                var record = session.record
                record.name = name
                records.append(record)
                let r = outcome.report
                let collapsed = r.map { $0.utilization <= 1 } ?? true
                cells.append(AblationCell(knn: r?.knn, probe: r?.linearProbe, utilization: r?.utilization ?? 0, norms: r?.prototypeNorms,
                                          state: outcome.diverged ? "NaN" : (collapsed ? "collapsed" : "stable")))
            }
            rows.append(Self.row(normalized: normalized, vmf: vmf, probability: probability, cells))
        }
        let seedsNote = seedList.count > 1 ? " (seeds \(seedList.map(String.init).joined(separator: " / ")))" : ""
        print("\n\(budgetEpochs) epochs per run, K = \(model.prototypes ?? DINOConfiguration().prototypes)\(seedsNote):\n")
        print("| normalized prototypes | vMF normalization | probability centering | kNN | linear probe | prototypes used | ‖w_k‖ min–max | run |")
        print("|---|---|---|---:|---:|---:|---:|---|")
        for r in rows { print(r) }
        let report = common.output + "/report.html"
        try HTMLReport.comparison(records, title: "Ablation grid", command: reproducingCommand())
            .write(toFile: report, atomically: true, encoding: .utf8)
        print("cells side by side, with overlaid curves: \(report)")
    }

    /// A Markdown row: each figure once per seed, separated by " / ".
    static func row(normalized: Bool, vmf: Bool, probability: Bool, _ cells: [AblationCell]) -> String {
        func percent(_ x: Double?) -> String { x.map { String(format: "%.2f", 100 * $0) } ?? "–" }
        func each(_ f: (AblationCell) -> String) -> String { cells.map(f).joined(separator: " / ") }
        let knn = each { percent($0.knn) } + "%"
        let probe = cells.contains { $0.probe != nil } ? each { percent($0.probe) } + "%" : "–"
        let used = each { "\($0.utilization)" }
        let norms = each { c in c.norms.map { String(format: "%.2f–%.2f", $0.min, $0.max) } ?? "–" }
        let states = Set(cells.map(\.state)).count == 1 ? cells[0].state : each(\.state)
        return "| \(normalized) | \(vmf) | \(probability) | \(knn) | \(probe) | \(used) | \(norms) | \(states) |"
    }
}

struct Compare: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compare finished or running runs: their final tables side by side, and overlaid kNN, loss and utilization plots.")
    @Argument(help: "Output folders of two or more runs (each with its metrics.jsonl).")
    var runs: [String]
    @Option(help: "Folder for the overlaid plots and report.html (created if missing).")
    var output = "runs/compare"

    func run() throws {
        guard runs.count >= 2 else { throw ValidationError("name two or more run folders to compare, not \(runs.count)") }
        let records = try runs.map { try RunRecord.read(folder: $0) }
        do {
            try FileManager.default.createDirectory(atPath: output, withIntermediateDirectories: true)
        } catch {
            throw ValidationError("--output \(output): the folder cannot be made (\(reason(error)))")
        }
        let width = Swift.max(12, records.map(\.name.count).max() ?? 0)
        func pad(_ s: String) -> String { s.count >= width ? s : s + String(repeating: " ", count: width - s.count) }
        func row(_ label: String, _ f: (EvaluationReport) -> String) {
            print(label.padding(toLength: 26, withPad: " ", startingAt: 0) + records.map { pad($0.evaluations.last.map(f) ?? "–") }.joined(separator: "  "))
        }
        print("".padding(toLength: 26, withPad: " ", startingAt: 0) + records.map { pad($0.name) }.joined(separator: "  "))
        row("epochs") { "\($0.epoch)" }
        row("kNN (k=20, T=0.07)") { String(format: "%.2f%%", 100 * $0.knn) }
        row("linear probe") { $0.linearProbe.map { String(format: "%.2f%%", 100 * $0) } ?? "–" }
        row("kNN raw pixels") { String(format: "%.2f%%", 100 * $0.knnRawPixels) }
        row("kNN random init") { String(format: "%.2f%%", 100 * $0.knnRandomInit) }
        row("prototypes used") { "\($0.utilization) of \($0.prototypes)" }
        row("‖w_k‖ median") { String(format: "%.3f", $0.prototypeNorms.median) }
        try RunPlots.knn(records).write(toFile: output + "/knn.svg", atomically: true, encoding: .utf8)
        try RunPlots.loss(records).write(toFile: output + "/loss.svg", atomically: true, encoding: .utf8)
        try RunPlots.utilization(records).write(toFile: output + "/utilization.svg", atomically: true, encoding: .utf8)
        try HTMLReport.comparison(records, title: "Comparison", command: reproducingCommand())
            .write(toFile: output + "/report.html", atomically: true, encoding: .utf8)
        print("overlaid plots and report.html in \(output)/")
    }
}

extension SSLMethod: ExpressibleByArgument {}
extension BackbonePreset: ExpressibleByArgument {}
