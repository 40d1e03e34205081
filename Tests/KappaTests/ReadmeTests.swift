import Foundation
import Kappa
import Testing

/// The README's tour, verbatim (the blocks between the BEGIN/END markers below), run as a
/// test; a second test checks that every Swift block of README.md appears here unchanged.
@Suite("README")
struct ReadmeTests {
    @Test func tourRuns() throws {
        // BEGIN README
        var rng = RandomGenerator(seed: 0)
        let x = Tensor.randomNormal([8, 4], using: &rng)
        let w = Tensor.truncatedNormal([4, 3], std: 0.02, using: &rng).requiringGrad()
        let b = Tensor.zeros([3]).requiringGrad()

        let logits = x.matmul(w) + b    // [8, 3]; b broadcasts over the rows
        let loss = Tensor.crossEntropy(logits: logits, labels: [0, 1, 2, 0, 1, 2, 0, 1])
        loss.backward()
        print(w.grad!.shape)            // [4, 3]

        // A teacher network or an evaluation runs without recording.
        let probabilities = withoutGradients { x.matmul(w).softmax(alongAxis: 1) }

        let images = Tensor.randomNormal([2, 3, 32, 32], using: &rng)
        let patches = images.unfoldPatches(size: 4)         // [2, 64, 48], for a ViT patch embedding
        let firstRow = images[0, .all, .range(0..<4)]       // [3, 4, 32], a view
        let gram = patches.matmul(patches.transposed())     // [2, 64, 64]
        print(firstRow.sharesStorage(with: images), gram.shape)   // true [2, 64, 64]

        func cube(_ x: Tensor) -> Tensor {
            Tensor.custom("cube", [x], forward: { t in
                let square = t[0] * t[0]
                return (outputs: [square * t[0]], residuals: [square])   // keep x² for backward
            }, vjp: { g, residuals in [g[0] * 3 * residuals[0]] })[0]
        }
        let report = gradcheck([Tensor.randomNormal([5], dtype: .float64, using: &rng)]) { cube($0[0]) }
        print(report)   // gradcheck passed (full Jacobian) ... max abs error ... at input [i], output [j]

        do {
            _ = try withAnomalyDetection { (x.log() * 2).sum() }
        } catch {
            print(error)   // anomaly: forward of 'log' (inputs [8, 4]) produced NaN or infinity ...
        }

        let kappa = Tensor([10.0, 100, 1000]).requiringGrad()   // ‖w_k‖/τ, Float64
        let logC = kappa.vmfLogNormalizer(dimension: 256, approximation: .exact)
        logC.sum().backward()                                  // kappa.grad = −A_127(κ)
        // END README

        // What the comments in the README claim.
        #expect(w.grad!.shape == [4, 3] && b.grad!.shape == [3])
        #expect(!probabilities.requiresGrad && probabilities.shape == [8, 3])
        #expect(patches.shape == [2, 64, 48] && firstRow.shape == [3, 4, 32] && gram.shape == [2, 64, 64])
        #expect(firstRow.sharesStorage(with: images))
        #expect(report.passed)
        #expect(throws: AnomalyError.self) { try withAnomalyDetection { (x.log() * 2).sum() } }
        #expect(kappa.grad!.doubles == [10.0, 100, 1000].map { -besselRatio(order: 127, $0) })
        // Cross-entropy of near-uniform logits over 3 classes is close to log 3.
        #expect(Swift.abs(loss.item() - Foundation.log(3.0)) < 0.05)
    }

    @Test func readmeBlocksAreTheTestedCode() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        // README.md and every document under docs/.
        let docs = root.appendingPathComponent("docs")
        let documents = ["README.md"] + ((try? FileManager.default.contentsOfDirectory(atPath: docs.path)) ?? [])
            .filter { $0.hasSuffix(".md") }.sorted().map { "docs/" + $0 }
        let readme = try documents.map { try String(contentsOf: root.appendingPathComponent($0), encoding: .utf8) }.joined(separator: "\n")
        func normalized(_ text: Substring) -> [String] {
            text.split(separator: "\n", omittingEmptySubsequences: false)
                .map { $0.trimmingCharacters(in: .whitespaces) }
                .filter { !$0.isEmpty && !$0.hasPrefix("import ") }
        }
        // Every README region of every test file.
        var tested = ""
        let testsRoot = root.appendingPathComponent("Tests")
        for case let file as String in FileManager.default.enumerator(atPath: testsRoot.path)! where file.hasSuffix(".swift") {
            let text = try String(contentsOf: testsRoot.appendingPathComponent(file), encoding: .utf8)
            var rest = Substring(text)
            while let begin = rest.range(of: "// BEGIN " + "README"), let end = rest.range(of: "// END " + "README") {
                tested += normalized(rest[begin.upperBound..<end.lowerBound]).joined(separator: "\n") + "\n"
                rest = rest[end.upperBound...]
            }
        }
        let blocks = readme.components(separatedBy: "```swift\n").dropFirst().map { $0.components(separatedBy: "```")[0] }
        #expect(blocks.count == 7, "Swift blocks in \(documents)")
        for block in blocks {
            let code = normalized(Substring(block)).joined(separator: "\n")
            #expect(tested.contains(code), "README/docs block not found verbatim in a README region of the tests:\n\(code)")
        }
    }
}
