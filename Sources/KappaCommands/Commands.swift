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

public struct DataOptions: ParsableArguments {
    public init() {}
    @Option(help: "Dataset: 'builtin' (procedural shapes, no files), or a path to MNIST/Fashion-MNIST IDX files (raw or .gz), CIFAR-10 .bin batches or .npy arrays; the format is detected. A labeled file set is split into training and evaluation images.")
    var data = "builtin"
    @Option(help: "Training images (built-in data: generated; files: the first N). Default: 8000.")
    var trainCount = 8000
    @Option(help: "Evaluation images (built-in data: generated with another seed; files: the last N). Default: 2000.")
    var evalCount = 2000

    var isBuiltin: Bool { data == "builtin" }

    func load(seed: UInt64) throws -> (train: ImageDataset, test: ImageDataset) {
        if isBuiltin {
            return ShapesDataset.splits(train: trainCount, evaluation: evalCount, seed: seed)
        }
        let all = try DatasetFiles.load(data)
        guard all.labels != nil else { throw ValidationError("\(data): evaluation needs labels, and none were found") }
        guard all.count >= 2 else { throw ValidationError("\(data): only \(all.count) images") }
        let test = Swift.min(evalCount, all.count / 2)
        let train = Swift.min(trainCount, all.count - test)
        return (all.subset(0..<train), all.subset((all.count - test)..<all.count))
    }
}

public struct ModelOptions: ParsableArguments {
    public init() {}
    public enum Method: String, ExpressibleByArgument, CaseIterable {
        case dinoVMF = "dino-vmf", dino, ibotVMF = "ibot-vmf", ibot
        var isIBOT: Bool { self == .ibotVMF || self == .ibot }
        var isVMF: Bool { self == .dinoVMF || self == .ibotVMF }
    }
    enum CenteringChoice: String, ExpressibleByArgument, CaseIterable { case probability, logit, sinkhorn }
    enum AugmentationChoice: String, ExpressibleByArgument, CaseIterable { case small, dino }
    enum Backbone: String, ExpressibleByArgument, CaseIterable { case vitMicro = "vit-micro", vitTiny = "vit-tiny", vitSmall = "vit-small", resnet }

    @Option(help: "dino-vmf: learned prototype norms, vMF-normalized logits, probability centering; dino: normalized prototypes, plain logits, logit centering; ibot-vmf / ibot: the same plus masked patch prediction (ViT only). The three switches below override single parts (the paper's ablation).")
    var method: Method = KappaCommand.defaultMethod
    @Option(help: "Override: add log C_p(‖w_k‖/τ) to the logits (true/false).")
    var vmfNormalization: Bool?
    @Option(help: "Override: L2-normalized prototypes, g fixed at 1 (true/false). With learned norms and no vMF term the mixture is unnormalized and can favour large-norm prototypes.")
    var normalizedPrototypes: Bool?
    @Option(help: "Override: teacher centering: probability (DINO-vMF), logit (DINO; cancels the vMF term per component), sinkhorn (3 Sinkhorn-Knopp iterations).")
    var centering: CenteringChoice?
    @Flag(help: "Use the exact Bessel normalizer instead of the paper's large-order approximation (slower, same results for p ≥ 64).")
    var exactNormalizer = false
    @Option(help: "Backbone: resnet (ResNet-18 layout, --resnet-width; the default of DINOvMF), vit-micro (64 wide, 4 deep, 4 heads; the default of iBOTvMF, which needs a ViT), vit-tiny (192, 12, 3), vit-small (384, 12, 6). ViTs use patch 7 on 28-pixel images, 4 on 32-pixel ones.")
    var backbone: Backbone?
    /// The backbone: `--backbone`, else a ResNet for DINO and ViT-micro for iBOT (masking needs patches).
    var resolvedBackbone: Backbone { backbone ?? (method.isIBOT ? .vitMicro : .resnet) }
    @Option(help: "ResNet width (64 is ResNet-18's); small values train fast on two cores. Default 8.")
    var resnetWidth = 8
    @Option(help: "Prototypes K. Too many for the data leaves most unused; too few merges classes. Default 256.")
    var prototypes = 256
    @Option(help: "Bottleneck dimension p (the sphere S^{p-1} of the vMF components). Default 64.")
    var bottleneck = 64
    @Option(help: "Hidden width of the head's MLP. Default 256.")
    var headHidden = 256
    @Option(help: "Epochs. Default: 10 with a ResNet, 20 with a ViT (about nine and seven minutes on 8,000 images and two cores).")
    var epochs: Int?
    var resolvedEpochs: Int { epochs ?? (resolvedBackbone == .resnet ? 10 : 20) }
    @Option(help: "Images per batch (each gives 2 global + --local-crops local views).")
    var batchSize = 64
    @Option(help: "Base learning rate, scaled by batch/256 (AdamW, linear warmup then cosine). Too high makes the loss NaN or collapses the teacher. Default: 1e-2 with a ResNet (BatchNorm throughout), 2e-3 with a ViT.")
    var lr: Double?
    var resolvedLearningRate: Double { lr ?? (resolvedBackbone == .resnet ? 1e-2 : 2e-3) }
    @Option(help: "Final learning rate of the cosine schedule.")
    var minLr = 1e-5
    @Option(help: "Warmup epochs of the learning rate.")
    var warmupEpochs = 2
    @Option(help: "Weight decay at the start (cosine to --weight-decay-end); it also shrinks the learned prototype norms.")
    var weightDecay = 0.04
    @Option(help: "Weight decay at the end.")
    var weightDecayEnd = 0.4
    @Flag(help: "Exempt the prototype norms g from weight decay (DINO decays them: its g has shape [K, 1]).")
    var noDecayOnNorms = false
    @Option(help: "Teacher EMA momentum at the start (cosine to 1). Near 1 the teacher moves slowly; on small data 0.99 learns faster than DINO's 0.996.")
    var teacherMomentum = 0.99
    @Option(help: "Student temperature τ_s.")
    var studentTemp = 0.1
    @Option(help: "Teacher temperature τ_t after warmup (0.04 … 0.07); lower is sharper targets, too high lets the teacher go uniform.")
    var teacherTemp = 0.04
    @Option(help: "Teacher temperature at epoch 0.")
    var warmupTeacherTemp = 0.04
    @Option(help: "Epochs of teacher-temperature warmup.")
    var warmupTeacherEpochs = 0
    @Option(help: "Center momentum m.")
    var centerMomentum = 0.9
    @Option(help: "Per-parameter gradient clipping norm (0 disables).")
    var clipGrad = 3.0
    @Option(help: "Epochs during which the last layer's gradient is dropped.")
    var freezeLastLayer = 1
    @Option(help: "Views: small (global crops of 90–100% of the image, local 70–90%, brightness/contrast jitter 0.2, no flip, blur or solarization: what learns on 28–32-pixel images from scratch here) or dino (METHOD.md's: global 40–100%, local 5–40%, flip, color jitter, blur, solarization). --global-crop-min and --local-crop-min override the crop ranges; --rotation, --translation, --invert-probability and --noise add to either.")
    var augmentation: AugmentationChoice = .small
    @Option(help: "Local crops per image.")
    var localCrops = 4
    @Option(help: "Smallest area share of a global crop (local crops span --local-crop-min up to this). small: 0.9; DINO: 0.4.")
    var globalCropMin: Double?
    @Option(help: "Probability of inverting a view (x → 1 − x); not in DINO. Default: 0.5 with --augmentation small on the built-in data, whose images are light on dark or dark on light at random; else 0.")
    var invertProbability: Double?
    @Option(help: "Largest rotation of a view in degrees (uniform in ±this, edges repeated); not in DINO.")
    var rotation = 0.0
    @Option(help: "Largest shift of a view as a share of the image side (uniform in ±this per axis, edges repeated); not in DINO.")
    var translation = 0.0
    @Option(help: "Largest standard deviation of Gaussian pixel noise added to a view (each view draws its own in [0, this]).")
    var noise = 0.0
    @Option(help: "Smallest area share of a local crop. small: 0.7; DINO: 0.05 (on 28-pixel images a 6-pixel patch that may miss the object).")
    var localCropMin: Double?

    var cropScales: (global: Double, local: Double) {
        let global = globalCropMin ?? (augmentation == .small ? 0.9 : 0.4)
        return (global, localCropMin ?? Swift.min(global, augmentation == .small ? 0.7 : 0.05))
    }

    @Option(help: "iBOT: weight λ₂ of the masked-patch term (λ₁ = 1).")
    var patchWeight = 1.0
    @Option(help: "iBOT: teacher temperature of the patch term.")
    var patchTeacherTemp = 0.04
    @Option(help: "iBOT: share of the patches masked in a masked image, drawn from [--mask-ratio-min, --mask-ratio-max].")
    var maskRatioMin = 0.1
    @Option(help: "iBOT: largest masked share.")
    var maskRatioMax = 0.5
    @Option(help: "iBOT: probability that an image is masked at all.")
    var maskProbability = 0.5

    /// Argument errors are thrown (and printed by ArgumentParser), never preconditions.
    func validated() throws {
        let epochs = resolvedEpochs
        guard epochs >= 1 else { throw ValidationError("--epochs must be at least 1") }
        guard warmupEpochs >= 0 && warmupEpochs <= epochs else { throw ValidationError("--warmup-epochs must lie in 0...\(epochs) (--epochs)") }
        guard warmupTeacherEpochs >= 0 else { throw ValidationError("--warmup-teacher-epochs must not be negative") }
        guard batchSize >= 1, prototypes >= 1, bottleneck >= 2, headHidden >= 1, resnetWidth >= 1, localCrops >= 0 else {
            throw ValidationError("--batch-size, --prototypes, --head-hidden and --resnet-width must be positive, --bottleneck at least 2, --local-crops not negative")
        }
        guard resolvedLearningRate > 0, minLr >= 0, studentTemp > 0, teacherTemp > 0, warmupTeacherTemp > 0, patchTeacherTemp > 0 else {
            throw ValidationError("learning rates and temperatures must be positive")
        }
        guard (0...1).contains(teacherMomentum), (0...1).contains(centerMomentum), (0...1).contains(maskProbability),
              (0...1).contains(invertProbability ?? 0), (0...180).contains(rotation), (0...1).contains(translation), (0...1).contains(noise),
              0 < cropScales.local, cropScales.local <= cropScales.global, cropScales.global <= 1,
              0 <= maskRatioMin, maskRatioMin <= maskRatioMax, maskRatioMax < 1 else {
            throw ValidationError("momenta and probabilities must lie in [0, 1], --rotation in [0, 180], --translation and --noise in [0, 1], crop scales in 0 < --local-crop-min ≤ --global-crop-min ≤ 1, mask ratios in 0 ≤ min ≤ max < 1")
        }
    }

    /// The run's configuration; `mixedPolarity`: the data draws light-on-dark and dark-on-light
    /// images at random (the built-in shapes), so the small views invert half of the views.
    func configuration(imageSize: Int, channels: Int, seed: UInt64, mixedPolarity: Bool) throws -> DINOConfiguration {
        try validated()
        var c = DINOConfiguration()
        if !method.isVMF { c.useDINO() }
        if let v = vmfNormalization { c.loss.vmfNormalization = v }
        if let v = normalizedPrototypes { c.normalizedPrototypes = v }
        switch centering {
        case .probability?: c.loss.probabilityCentering = true
        case .logit?: c.loss.probabilityCentering = false
        case .sinkhorn?: c.loss.sinkhornIterations = 3
        case nil: break
        }
        c.loss.normalizerExact = exactNormalizer
        let patch = imageSize % 7 == 0 ? 7 : (imageSize % 4 == 0 ? 4 : 0)
        let backbone = resolvedBackbone
        switch backbone {
        case .resnet: c.backbone = .resnet(width: resnetWidth, channels: channels)
        default:
            guard patch > 0 else { throw ValidationError("images of \(imageSize) pixels divide into neither 7- nor 4-pixel patches; use --backbone resnet") }
            var v = backbone == .vitMicro ? ViTConfiguration.refMicro
                : backbone == .vitTiny ? ViTConfiguration.tiny(imageSize: imageSize, patchSize: patch, channels: channels)
                : ViTConfiguration.small(imageSize: imageSize, patchSize: patch, channels: channels)
            (v.imageSize, v.patchSize, v.channels) = (imageSize, patch, channels)
            c.backbone = .vit(v)
        }
        (c.prototypes, c.bottleneck, c.headHidden) = (prototypes, bottleneck, headHidden)
        c.loss.dimension = bottleneck
        (c.epochs, c.batchSize, c.baseLearningRate, c.minLearningRate, c.warmupEpochs) = (resolvedEpochs, batchSize, resolvedLearningRate, minLr, warmupEpochs)
        (c.weightDecay, c.weightDecayEnd, c.decayPrototypeScale) = (weightDecay, weightDecayEnd, !noDecayOnNorms)
        (c.teacherMomentum, c.clipGradient, c.freezeLastLayerEpochs) = (teacherMomentum, clipGrad > 0 ? clipGrad : .infinity, freezeLastLayer)
        (c.loss.studentTemperature, c.loss.teacherTemperature) = (studentTemp, teacherTemp)
        (c.loss.warmupTeacherTemperature, c.loss.warmupTeacherEpochs, c.loss.centerMomentum) = (warmupTeacherTemp, warmupTeacherEpochs, centerMomentum)
        if method.isIBOT {
            guard case .vit(var v) = c.backbone else { throw ValidationError("iBOT needs a ViT backbone (--backbone vit-*)") }
            v.maskToken = true
            c.backbone = .vit(v)
            var settings = IBOTSettings()
            settings.patchWeight = patchWeight
            settings.patch = c.loss
            settings.patch.teacherTemperature = patchTeacherTemp
            settings.patch.warmupTeacherTemperature = Swift.min(warmupTeacherTemp, patchTeacherTemp)
            settings.masking = BlockMasking(ratio: maskRatioMin...maskRatioMax, probability: maskProbability)
            c.ibot = settings
        }
        c.augmentation = augmentation == .small ? .smallImages : .dino
        c.augmentation.globalSize = imageSize
        c.augmentation.localSize = patch > 0 ? Swift.max(patch, (imageSize / 2) / patch * patch) : imageSize / 2
        c.augmentation.localCrops = localCrops
        c.augmentation.invertProbability = invertProbability ?? (mixedPolarity && augmentation == .small ? 0.5 : 0)
        c.augmentation.rotationDegrees = rotation
        (c.augmentation.translation, c.augmentation.noiseStd) = (translation, noise)
        c.augmentation.globalScale = cropScales.global...1
        c.augmentation.localScale = cropScales.local...cropScales.global
        c.seed = seed
        return c
    }
}

public struct Common: ParsableArguments {
    public init() {}
    @Option(help: "Output folder for metrics.jsonl, plots (SVG) and checkpoint.safetensors.")
    var output = "runs/" + KappaCommand.defaultMethod.rawValue
    @Option(help: "Random seed: the same seed gives the same run.")
    var seed: UInt64 = 0
    @Option(help: "Threads for kernels and BLAS (default: all cores).")
    var threads: Int?
    @Option(help: "Evaluate every N epochs (and at the end).")
    var evalEvery = 5

    func apply() throws {
        if let threads {
            guard threads >= 1 else { throw ValidationError("--threads must be at least 1") }
            Threads.count = threads
        }
    }
}

/// The program: `DINOvMF` or `iBOTvMF`, which differ only in name and default method.
public struct KappaCommand: ParsableCommand {
    nonisolated(unsafe) public static var name = "DINOvMF"
    nonisolated(unsafe) public static var defaultMethod = ModelOptions.Method.dinoVMF

    public static var configuration: CommandConfiguration {
        CommandConfiguration(
            commandName: name,
            abstract: "Self-supervised \(defaultMethod.isIBOT ? "iBOT-vMF / iBOT" : "DINO-vMF / DINO") training and evaluation on a CPU.",
            subcommands: [Train.self, Eval.self, Ablation.self], defaultSubcommand: Train.self)
    }

    public init() {}
}

struct Train: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Train, then report kNN and linear-probe accuracy next to two baselines (default).")
    @OptionGroup var data: DataOptions
    @OptionGroup var model: ModelOptions
    @OptionGroup var common: Common
    @Flag(help: "Continue the run saved in --output (after Ctrl-C or a crash).")
    var resume = false
    @Flag(help: "Skip the final linear probe.")
    var noLinearProbe = false

    func run() throws {
        try common.apply()
        let (train, test) = try data.load(seed: common.seed)
        let config = try model.configuration(imageSize: train.height, channels: train.channels, seed: common.seed,
                                             mixedPolarity: data.isBuiltin)
        guard config.batchSize <= train.count else { throw ValidationError("--batch-size \(config.batchSize) exceeds the \(train.count) training images") }
        print("\(model.method.rawValue) on \(train.source): \(train.count) training and \(test.count) evaluation images, \(Threads.count) threads (OpenBLAS \(HostKernels.openBLASCore), \(HostKernels.vectorLevel))")
        let session = TrainingSession(trainer: DINOTrainer(configuration: config, train: train), reference: train, test: test,
                                      output: common.output)
        session.evaluateEvery = common.evalEvery
        session.linearProbe = !noLinearProbe
        session.name = model.method.rawValue
        let outcome = try session.run(resume: resume)
        if outcome.interrupted { print("stopped; continue with --resume --output \(common.output)"); return }
        if let r = outcome.report {
            print("\n" + TrainingSession.describe(r, name: model.method.rawValue, seconds: outcome.seconds))
            print("outputs in \(common.output)/: metrics.jsonl, loss.svg, knn.svg, norms.svg, utilization.svg, checkpoint.safetensors")
        }
        if outcome.diverged { throw ExitCode(2) }
    }
}

struct Eval: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Evaluate a checkpoint (kNN, linear probe, utilization, norms) on a dataset.")
    @Option(help: "checkpoint.safetensors written by train.")
    var checkpoint: String
    @OptionGroup var data: DataOptions
    @OptionGroup var common: Common

    func run() throws {
        try common.apply()
        let url = URL(fileURLWithPath: checkpoint)
        let config = try DINOTrainer.configuration(in: url)
        let (train, test) = try data.load(seed: config.seed)
        let trainer = DINOTrainer(configuration: config, train: train)
        try trainer.resume(from: url)
        let start = Date()
        let report = trainer.evaluate(reference: train, test: test)
        print(TrainingSession.describe(report, name: checkpoint, seconds: Date().timeIntervalSince(start)))
    }
}

struct Ablation: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "The paper's ablation grid (normalized prototypes × vMF normalization × probability centering) on a short budget, as one table.")
    @OptionGroup var data: DataOptions
    @OptionGroup var model: ModelOptions
    @OptionGroup var common: Common
    @Option(help: "Epochs of each of the eight runs (the short budget; overrides --epochs).")
    var budgetEpochs = 5

    func run() throws {
        try common.apply()
        let (train, test) = try data.load(seed: common.seed)
        guard model.batchSize <= train.count else { throw ValidationError("--batch-size \(model.batchSize) exceeds the \(train.count) training images") }
        var rows: [String] = []
        for normalized in [true, false] {
            for vmf in [false, true] {
                for probability in [false, true] {
                    var m = model
                    (m.normalizedPrototypes, m.vmfNormalization, m.centering) = (normalized, vmf, probability ? .probability : .logit)
                    m.epochs = budgetEpochs
                    m.warmupEpochs = Swift.min(m.warmupEpochs, budgetEpochs)
                    let config = try m.configuration(imageSize: train.height, channels: train.channels, seed: common.seed,
                                                     mixedPolarity: data.isBuiltin)
                    let name = "norm-protos=\(normalized) vmf=\(vmf) prob-center=\(probability)"
                    print("== \(name)")
                    let session = TrainingSession(trainer: DINOTrainer(configuration: config, train: train), reference: train, test: test,
                                                  output: common.output + "/" + name.replacingOccurrences(of: " ", with: "_"))
                    session.evaluateEvery = Swift.max(1, budgetEpochs)
                    session.linearProbe = false
                    let outcome = try session.run()
                    let r = outcome.report
                    let collapsed = r.map { $0.utilization <= 1 } ?? true
                    let stable = !outcome.diverged && !collapsed ? "stable" : (outcome.diverged ? "NaN" : "collapsed")
                    rows.append(String(format: "| %-5@ | %-5@ | %-5@ | %6.2f%% | %4d / %-4d | %@ |", "\(normalized)", "\(vmf)", "\(probability)",
                                       100 * (r?.knn ?? .nan), r?.utilization ?? 0, config.prototypes, stable))
                }
            }
        }
        print("\n| normalized prototypes | vMF normalization | probability centering | kNN | utilization | run |")
        print("|---|---|---|---:|---:|---|")
        for r in rows { print(r) }
    }
}
