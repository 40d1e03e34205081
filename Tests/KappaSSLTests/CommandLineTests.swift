import Foundation
import KappaSSL
import Testing
@testable import KappaCommands

/// How the command line resolves the views it does not name: the defaults that depend on
/// the preset and on the data.
@Suite("Command line: defaults and views")
struct CommandLineTests {
    static func views(_ arguments: [String], builtin: Bool) throws -> MultiCropAugmentation {
        try ModelOptions.parse(arguments).configuration(imageSize: 28, channels: 1, seed: 0, mixedPolarity: builtin).augmentation
    }

    @Test func smallViewsKeepMostOfTheImageAndInvertOnlyMixedPolarityData() throws {
        let shapes = try Self.views([], builtin: true)
        #expect(shapes.globalScale == 0.9...1 && shapes.localScale == 0.7...0.9)
        #expect(shapes.invertProbability == 0.5)
        let files = try Self.views([], builtin: false)
        #expect(files == MultiCropAugmentation.smallImages)
        #expect(try Self.views(["--invert-probability", "0"], builtin: true).invertProbability == 0)
        #expect(try Self.views(["--invert-probability", "0.25"], builtin: false).invertProbability == 0.25)
    }

    @Test func dinoViewsNeverInvertUnlessAsked() throws {
        let dino = try Self.views(["--augmentation", "dino"], builtin: true)
        #expect(dino.globalScale == 0.4...1 && dino.localScale == 0.05...0.4 && dino.invertProbability == 0)
    }

    @Test func localCropsFollowALowerGlobalMinimum() throws {
        #expect(try Self.views(["--global-crop-min", "0.5"], builtin: false).localScale == 0.5...0.5)
        #expect(try Self.views(["--global-crop-min", "0.5", "--local-crop-min", "0.2"], builtin: false).localScale == 0.2...0.5)
        #expect(throws: (any Error).self) { try Self.views(["--local-crop-min", "0.95"], builtin: false) }
    }

    /// vit-stem trains on the two global crops alone (docs/vit.md); the other backbones keep 4 local crops.
    @Test func vitStemHasNoLocalCropsUnlessAsked() throws {
        #expect(try Self.views(["--backbone", "vit-stem"], builtin: false).localCrops == 0)
        #expect(try Self.views(["--backbone", "vit-stem", "--local-crops", "4"], builtin: true).localCrops == 4)
        for other in ["resnet", "vit-micro", "vit-conv"] {
            #expect(try Self.views(["--backbone", other], builtin: false).localCrops == 4, "\(other)")
        }
    }

    @Test func localCropSizeIsWholeTokens() throws {
        #expect(try Self.views([], builtin: false).localSize == 14)
        #expect(try Self.views(["--local-crop-size", "10"], builtin: false).localSize == 10)  // a ResNet takes any size
        #expect(try Self.views(["--backbone", "vit-stem", "--local-crop-size", "21"], builtin: true).localSize == 21)
        for bad in [["--backbone", "vit-stem", "--local-crop-size", "20"], ["--backbone", "vit-conv", "--local-crop-size", "32"],
                    ["--local-crop-size", "0"], ["--local-crop-size", "29"]] {
            #expect(throws: (any Error).self, "\(bad)") { try Self.views(bad, builtin: false) }
        }
    }

    @Test func optionsOnlyOverrideTheConfigurationsDefaults() throws {
        // No option given: exactly the preset, for each method and both kinds of data.
        for method in SSLMethod.allCases {
            for builtin in [false, true] {
                let parsed = try ModelOptions.parse(["--method", method.rawValue])
                    .configuration(imageSize: 28, channels: 1, seed: 0, mixedPolarity: builtin)
                #expect(parsed == (try DINOConfiguration.preset(method: method, mixedPolarity: builtin)), "\(method) builtin \(builtin)")
            }
        }
        // The help shows the configuration's values, not numbers of its own.
        let help = ModelOptions.helpMessage(columns: 10_000)
        let d = DINOConfiguration()
        for value in ["Default: \(d.prototypes).", "Default: \(d.bottleneck).", "Default: \(d.teacherMomentum).", "Default: \(d.loss.teacherTemperature)."] {
            #expect(help.contains(value), "\(value)")
        }
        // --epochs alone shortens the warmup with it.
        let short = try ModelOptions.parse(["--epochs", "1"]).configuration(imageSize: 28, channels: 1, seed: 0, mixedPolarity: false)
        #expect(short.epochs == 1 && short.warmupEpochs == 1)
        #expect(throws: (any Error).self) { try ModelOptions.parse(["--epochs", "1", "--warmup-epochs", "2"]).configuration(imageSize: 28, channels: 1, seed: 0, mixedPolarity: false) }
        #expect(throws: (any Error).self) { try ModelOptions.parse(["--lr", "inf"]).configuration(imageSize: 28, channels: 1, seed: 0, mixedPolarity: false) }
    }

    /// `--clip-grad 0` (no clipping) once became an infinite norm in the configuration, which
    /// JSON cannot hold: the run trained, then failed at its first checkpoint.
    @Test func noClippingIsSavedWithTheRun() throws {
        func parsed(_ value: String) throws -> DINOConfiguration {
            try ModelOptions.parse(["--clip-grad", value]).configuration(imageSize: 28, channels: 1, seed: 0, mixedPolarity: false)
        }
        #expect(try parsed("0").clipGradient == 0)
        for bad in ["-1", "inf", "nan"] { #expect(throws: (any Error).self, "\(bad)") { try parsed(bad) } }

        var c = tinyConfiguration()
        c.clipGradient = 0
        let trainer = try TeacherStudentTrainer(configuration: c, train: ShapesDataset.make(count: 32, size: 16, seed: 3))
        var losses: [Double] = []
        trainer.trainEpoch { losses.append($0.loss) }
        #expect(losses.count == 2 && losses.allSatisfy(\.isFinite))
        let url = URL(fileURLWithPath: NSTemporaryDirectory() + "kappa-noclip-\(UUID().uuidString).safetensors")
        defer { try? FileManager.default.removeItem(at: url) }
        try RunCheckpoint.save(trainer, to: url)
        #expect(try RunCheckpoint.configuration(in: url) == c)
    }
}
