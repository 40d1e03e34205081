import Foundation
import Kappa
import KappaNN
import Testing

func temporaryDirectory() -> URL {
    let url = FileManager.default.temporaryDirectory.appendingPathComponent("kappa-tests-\(UUID().uuidString)")
    try! FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    return url
}

func smallModel(seed: UInt64, dtype: DType = .float32) -> VisionTransformer {
    var g = RandomGenerator(seed: seed)
    let config = ViTConfiguration(imageSize: 8, patchSize: 4, channels: 1, width: 8, depth: 1, heads: 2, mlpRatio: 2)
    return VisionTransformer(config, dtype: dtype, using: &g)
}

/// An independent reader of the safetensors layout, written from the format's description:
/// little-endian u64 header length, JSON header, raw data.
func independentRead(_ url: URL) throws -> [String: (dtype: String, shape: [Int], bytes: [UInt8])] {
    let data = [UInt8](try Data(contentsOf: url))
    var n = 0
    for i in 0..<8 { n |= Int(data[i]) << (8 * i) }
    let header = try JSONSerialization.jsonObject(with: Data(data[8..<(8 + n)])) as! [String: Any]
    var out: [String: (String, [Int], [UInt8])] = [:]
    for (name, value) in header where name != "__metadata__" {
        let e = value as! [String: Any]
        let offsets = e["data_offsets"] as! [Int]
        out[name] = (e["dtype"] as! String, e["shape"] as! [Int], Array(data[(8 + n + offsets[0])..<(8 + n + offsets[1])]))
    }
    return out
}

@Suite("Checkpoints: safetensors, training state, hostile files")
struct CheckpointTests {
    @Test func roundTripIsBitExact() throws {
        let dir = temporaryDirectory()
        let a = smallModel(seed: 1), b = smallModel(seed: 2)
        let url = dir.appendingPathComponent("model.safetensors")
        try a.save(to: url)
        try b.load(from: url)
        for (x, y) in zip(a.stateDict(), b.stateDict()) {
            #expect(x.name == y.name && x.tensor.rawBytes() == y.tensor.rawBytes())
        }
        // Float64 and buffers too.
        let bn = BatchNorm1d(3, dtype: .float64)
        _ = bn(Tensor([1.0, 2, 3, 4, 5, 7], shape: [2, 3]))
        try bn.save(to: url)
        let bn2 = BatchNorm1d(3, dtype: .float64)
        try bn2.load(from: url)
        #expect(bn2.runningVar.rawBytes() == bn.runningVar.rawBytes())
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path) == ["model.safetensors"], "no temporary files left")
    }

    @Test func independentReaderAgrees() throws {
        let dir = temporaryDirectory()
        let a = smallModel(seed: 3)
        let url = dir.appendingPathComponent("m.safetensors")
        try a.save(to: url)
        let read = try independentRead(url)
        #expect(read.count == a.stateDict().count)
        for (name, t) in a.stateDict() {
            let r = try #require(read[name])
            #expect(r.dtype == "F32" && r.shape == t.shape && r.bytes == t.rawBytes(), "\(name)")
        }
    }

    static let python: String? = {
        for candidate in ["/tmp/peers/bin/python", "/usr/bin/python3", "/usr/local/bin/python3"] {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: candidate)
            p.arguments = ["-c", "import safetensors.numpy"]
            p.standardError = FileHandle.nullDevice
            guard (try? p.run()) != nil else { continue }
            p.waitUntilExit()
            if p.terminationStatus == 0 { return candidate }
        }
        return nil
    }()

    @Test(.enabled(if: python != nil, "Python's safetensors package is not installed; pip install safetensors numpy to run this check"))
    func pythonSafetensorsReadsKappaFiles() throws {
        let dir = temporaryDirectory()
        let a = smallModel(seed: 4)
        let url = dir.appendingPathComponent("m.safetensors")
        try a.save(to: url)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Self.python!)
        p.arguments = ["-c", "import sys, safetensors.numpy as s; t = s.load_file(sys.argv[1]); print(float(t['norm.weight'].sum()), float(t['blocks.0.attn.qkv.weight'][1, 2]), len(t))", url.path]
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        p.waitUntilExit()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        let fields = text.split(separator: " ").map { Double($0.trimmingCharacters(in: .whitespacesAndNewlines))! }
        #expect(fields[0] == 8)
        #expect(Float(fields[1]) == a.blocks[0].attn.qkv.weight.scalars(as: Float.self)[1 * 8 + 2])
        #expect(Int(fields[2]) == a.stateDict().count)
    }

    @Test func damagedFilesThrowNamingTheFile() throws {
        let dir = temporaryDirectory()
        let a = smallModel(seed: 5)
        let url = dir.appendingPathComponent("good.safetensors")
        try a.save(to: url)
        let good = [UInt8](try Data(contentsOf: url))
        let target = smallModel(seed: 6)
        let before = target.stateDict().map { $0.tensor.rawBytes() }
        func expectFailure(_ bytes: [UInt8], _ fragment: String, sourceLocation: SourceLocation = #_sourceLocation) {
            let bad = dir.appendingPathComponent("bad.safetensors")
            try! Data(bytes).write(to: bad)
            do {
                try target.load(from: bad)
                Issue.record("loading a damaged file succeeded", sourceLocation: sourceLocation)
            } catch let error as CheckpointError {
                #expect(error.path == bad.path, sourceLocation: sourceLocation)
                #expect(error.problem.contains(fragment), "\(error)", sourceLocation: sourceLocation)
            } catch {
                Issue.record("unexpected error \(error)", sourceLocation: sourceLocation)
            }
        }
        expectFailure(Array(good.prefix(5)), "truncated")
        expectFailure(Array(good.prefix(good.count - 3)), "outside")
        expectFailure(Array(good.prefix(100)), "truncated")
        var huge = good
        huge[7] = 0x7F
        expectFailure(huge, "header")
        var flippedData = good
        flippedData[good.count - 10] ^= 0x10
        expectFailure(flippedData, "checksum")
        var flippedHeader = good
        flippedHeader[12] ^= 0x01  // inside the first key, "__metadata__"
        expectFailure(flippedHeader, "unsupported dtype")
        // Random bytes never crash the reader.
        var rng = RandomGenerator(seed: 9)
        for _ in 0..<200 {
            var mutated = good
            for _ in 0..<(1 + rng.nextInt(below: 4)) { mutated[rng.nextInt(below: mutated.count)] ^= UInt8(1 << rng.nextInt(below: 8)) }
            _ = try? SafeTensors.read({ let u = dir.appendingPathComponent("fuzz"); try! Data(mutated).write(to: u); return u }())
        }
        #expect(target.stateDict().map { $0.tensor.rawBytes() } == before, "a failed load changes nothing")
    }

    @Test func mismatchedModelsThrow() throws {
        let dir = temporaryDirectory()
        let url = dir.appendingPathComponent("m.safetensors")
        try smallModel(seed: 7).save(to: url)
        var g = RandomGenerator(seed: 0)
        let wider = VisionTransformer(ViTConfiguration(imageSize: 8, patchSize: 4, channels: 1, width: 12, depth: 1, heads: 2),
                                      using: &g)
        #expect(throws: CheckpointError.self) { try wider.load(from: url) }
        do { try wider.load(from: url) } catch let e as CheckpointError { #expect(e.problem.contains("shape")) }
        let double = smallModel(seed: 7, dtype: .float64)
        do { try double.load(from: url) } catch let e as CheckpointError { #expect(e.problem.contains("float32")) }
        let lin = Linear(2, 2, using: &g)
        do { try lin.load(from: url) } catch let e as CheckpointError { #expect(e.problem.contains("missing tensor 'weight'")) }
        #expect(throws: CheckpointError.self) { try lin.load(from: dir.appendingPathComponent("absent.safetensors")) }
    }

    @Test func failedWriteKeepsThePreviousFile() throws {
        let dir = temporaryDirectory()
        let url = dir.appendingPathComponent("m.safetensors")
        try smallModel(seed: 8).save(to: url)
        let before = try Data(contentsOf: url)
        // A tensor name used twice is refused before anything is written.
        let t = Tensor.zeros([2])
        #expect(throws: CheckpointError.self) { try SafeTensors.write([("a", t), ("a", t)], to: url) }
        #expect(try Data(contentsOf: url) == before)
    }

    @Test func resumedTrainingContinuesExactly() throws {
        let dir = temporaryDirectory()
        let url = dir.appendingPathComponent("run.safetensors")
        let images = { (rng: inout RandomGenerator) in Tensor.randomNormal([2, 1, 8, 8], using: &rng) }
        func step(_ m: VisionTransformer, _ t: VisionTransformer, _ opt: AdamW, _ rng: inout RandomGenerator) {
            opt.zeroGrad()
            let x = images(&rng)
            let loss = (m(x).cls - withoutGradients { t(x).cls }).pow(2).mean()
            loss.backward()
            opt.step()
            emaUpdate(teacher: t, student: m, momentum: 0.9)
        }
        // Uninterrupted: 6 steps.
        let a = smallModel(seed: 10), at = smallModel(seed: 10)
        let optA = AdamW(groups: ParameterGroup.dinoGroups(a, learningRate: 1e-2, weightDecay: 0.04))
        var rngA = RandomGenerator(seed: 99)
        for _ in 0..<6 { step(a, at, optA, &rngA) }
        // Interrupted after 3, saved, resumed in fresh objects.
        let b = smallModel(seed: 10), bt = smallModel(seed: 10)
        let optB = AdamW(groups: ParameterGroup.dinoGroups(b, learningRate: 1e-2, weightDecay: 0.04))
        var rngB = RandomGenerator(seed: 99)
        for _ in 0..<3 { step(b, bt, optB, &rngB) }
        let center = Tensor([0.25, 0.75])
        try TrainingCheckpoint.save(to: url, student: b, teacher: bt, optimizer: optB, extra: [("center", center)],
                                    state: TrainingState(step: 3, epoch: 0, generator: rngB, configuration: ["lr": "0.01"]))
        let c = smallModel(seed: 11), ct = smallModel(seed: 12)
        let optC = AdamW(groups: ParameterGroup.dinoGroups(c, learningRate: 1e-2, weightDecay: 0.04))
        let (state, extra) = try TrainingCheckpoint.load(from: url, student: c, teacher: ct, optimizer: optC)
        #expect(state.step == 3 && state.configuration["lr"] == "0.01")
        #expect(extra["center"]?.scalars(as: Float.self) == [0.25, 0.75])
        var rngC = state.generator
        #expect(rngC == rngB)
        for _ in 0..<3 { step(c, ct, optC, &rngC) }
        for (x, y) in zip(a.stateDict() + at.stateDict(), c.stateDict() + ct.stateDict()) {
            #expect(x.tensor.rawBytes() == y.tensor.rawBytes(), "\(x.name) differs after resuming")
        }
    }
}
