import Foundation
import Testing

/// The extension point is public: a package outside this repository that depends on Kappa by
/// path defines its own objective (with state of its own), trains it for a few steps through
/// `TeacherStudentTrainer`, saves a checkpoint and resumes from it.
@Suite("A new objective in a package of its own")
struct OutsidePackageTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static let manifest = """
        // swift-tools-version: 6.0
        import PackageDescription
        let package = Package(
            name: "Outside",
            dependencies: [.package(path: "\(root.path)")],
            targets: [.executableTarget(name: "Outside", dependencies: [
                .product(name: "Kappa", package: "\(root.lastPathComponent)"),
                .product(name: "KappaNN", package: "\(root.lastPathComponent)"),
                .product(name: "KappaSSL", package: "\(root.lastPathComponent)"),
            ])],
            swiftLanguageModes: [.v5]
        )
        """

    /// BYOL's cross-view cosine loss on the head outputs (not in Kappa), with a running mean
    /// of the loss as the objective's own state.
    static let program = """
        import Foundation
        import Kappa
        import KappaNN
        import KappaSSL

        final class CrossViewCosine: SelfSupervisedObjective {
            var runningLoss = Tensor.zeros([1])
            func callAsFunction(_ batch: ObjectiveBatch, networks: TeacherStudentNetworks, context: StepContext) -> ObjectiveOutput {
                let teacher = networks.teacherLogits(batch.globalViews).map { $0.l2Normalized(alongAxis: 1) }
                let student = networks.studentLogits(batch.views).map { $0.l2Normalized(alongAxis: 1) }
                var terms: [Tensor] = []
                for (q, t) in teacher.enumerated() {
                    for (v, s) in student.enumerated() where v != q { terms.append(2 - 2 * (s * t).sum(alongAxis: 1).mean()) }
                }
                let loss = terms.dropFirst().reduce(terms[0], +) / Double(terms.count)
                runningLoss = withoutGradients { runningLoss * 0.9 + loss.reshape([1]) * 0.1 }
                return ObjectiveOutput(loss: loss, monitors: [LoggedScalar("runningLoss", label: "avg", runningLoss.item())])
            }
            var state: [(name: String, tensor: Tensor)] { [("runningLoss", runningLoss)] }
            func loadState(_ tensors: [String: Tensor]) throws {
                guard let t = tensors["runningLoss"], t.shape == [1] else { throw ObjectiveStateError("no runningLoss") }
                runningLoss = t
            }
        }

        var c = DINOConfiguration()
        c.backbone = .vit(ViTConfiguration(imageSize: 16, patchSize: 4, channels: 1, width: 16, depth: 1, heads: 2, mlpRatio: 2))
        (c.prototypes, c.headHidden, c.bottleneck, c.batchSize, c.epochs, c.warmupEpochs) = (16, 16, 8, 8, 2, 0)
        (c.augmentation.globalSize, c.augmentation.localSize, c.augmentation.localCrops) = (16, 8, 2)
        let data = ShapesDataset.make(count: 24, size: 16, seed: 1)
        let trainer = try TeacherStudentTrainer(configuration: c, objective: CrossViewCosine(), train: data)
        trainer.trainEpoch { print("step \\($0.step) loss \\($0.loss) avg \\($0["runningLoss"]!)") }
        let url = URL(fileURLWithPath: CommandLine.arguments[1])
        try RunCheckpoint.save(trainer, to: url)
        let resumed = try TeacherStudentTrainer(configuration: c, objective: CrossViewCosine(), train: data)
        try RunCheckpoint.restore(resumed, from: url)
        trainer.trainEpoch()
        resumed.trainEpoch()
        let same = zip(trainer.objective.state + trainer.student.stateDict(), resumed.objective.state + resumed.student.stateDict())
            .allSatisfy { $0.tensor.rawBytes() == $1.tensor.rawBytes() }
        print(same ? "resumed run identical" : "resumed run differs")
        exit(same ? 0 : 1)
        """

    @Test(.timeLimit(.minutes(15)))
    func outsidePackageTrainsItsOwnObjective() throws {
        let dir = URL(fileURLWithPath: NSTemporaryDirectory()).appendingPathComponent("kappa-outside-\(UUID().uuidString)")
        let sources = dir.appendingPathComponent("Sources/Outside")
        try FileManager.default.createDirectory(at: sources, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        try Self.manifest.write(to: dir.appendingPathComponent("Package.swift"), atomically: true, encoding: .utf8)
        try Self.program.write(to: sources.appendingPathComponent("main.swift"), atomically: true, encoding: .utf8)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["swift", "run", "--package-path", dir.path, "Outside", dir.appendingPathComponent("run.safetensors").path]
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        do { try process.run() } catch {
            print("skipped: the outside-package test needs the `swift` command on PATH (\(error))")
            return
        }
        let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        #expect(process.terminationStatus == 0, "\(output.suffix(3000))")
        let losses = output.split(separator: "\n").filter { $0.hasPrefix("step ") }.compactMap { Double($0.split(separator: " ")[3]) }
        #expect(losses.count == 3 && losses.allSatisfy(\.isFinite), "\(output.suffix(3000))")
        #expect(output.contains("resumed run identical"))
    }
}
