import Foundation
import Kappa
import Testing

/// `../shared/reference/vmf_logcp.csv` beside the repository: mpmath at 50 digits.
let referencePath = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("shared/reference/vmf_logcp.csv").path

struct ReferenceRow {
    let p: Int, kappa: Double, nu: Double, logI: Double, logCp: Double, dLogCp: Double
}

func referenceRows() throws -> [ReferenceRow] {
    let text = try String(contentsOfFile: referencePath, encoding: .utf8)
    return text.split(whereSeparator: \.isNewline).dropFirst().map { line in
        let f = line.split(separator: ",").map { Double($0.trimmingCharacters(in: .whitespaces))! }
        return ReferenceRow(p: Int(f[0]), kappa: f[1], nu: f[2], logI: f[3], logCp: f[4], dLogCp: f[5])
    }
}

@Suite("log-Bessel functions and the vMF normalizer")
struct BesselTests {
    @Test(.enabled(if: FileManager.default.fileExists(atPath: referencePath),
                   "needs ../shared/reference/vmf_logcp.csv (mpmath reference values) beside the repository"))
    func float64MatchesMpmath() throws {
        let rows = try referenceRows()
        #expect(rows.count > 200)
        var worst = (logI: 0.0, logCp: 0.0, derivative: 0.0)
        for r in rows {
            let scale = Swift.max(Swift.abs(r.logI), Swift.abs(r.logCp))
            let eI = Swift.abs(logBesselI(order: r.nu, r.kappa) - r.logI) / Swift.max(Swift.abs(r.logI), .leastNormalMagnitude)
            let eC = Swift.abs(vmfLogNormalizer(dimension: r.p, kappa: r.kappa, approximation: .exact) - r.logCp) / scale
            let eD = Swift.abs(vmfLogNormalizerDerivative(dimension: r.p, kappa: r.kappa, approximation: .exact) - r.dLogCp)
                / Swift.abs(r.dLogCp)
            #expect(eI <= 1e-12, "log I_\(r.nu)(\(r.kappa)): relative error \(eI)")
            #expect(eC <= 1e-12, "log C_\(r.p)(\(r.kappa)): scaled error \(eC)")
            #expect(eD <= 1e-12, "d/dκ log C_\(r.p)(\(r.kappa)): relative error \(eD)")
            worst = (Swift.max(worst.logI, eI), Swift.max(worst.logCp, eC), Swift.max(worst.derivative, eD))
        }
        print("Float64 vs mpmath over \(rows.count) rows: log I_ν rel \(worst.logI), log C_p scaled \(worst.logCp), d/dκ log C_p rel \(worst.derivative)")
    }

    @Test(.enabled(if: FileManager.default.fileExists(atPath: referencePath),
                   "needs ../shared/reference/vmf_logcp.csv (mpmath reference values) beside the repository"))
    func float32TensorsMatchMpmath() throws {
        let rows = try referenceRows()
        for p in Set(rows.map(\.p)).sorted() {
            let sub = rows.filter { $0.p == p }
            let kappa = Tensor(sub.map(\.kappa), shape: [sub.count], dtype: .float32)
            let nu = Double(p) / 2 - 1
            let logI = kappa.logBesselI(order: nu).doubles
            let logCp = kappa.vmfLogNormalizer(dimension: p, approximation: .exact).doubles
            for (i, r) in sub.enumerated() {
                let k32 = Double(Float(r.kappa))  // the input itself is rounded to Float32
                let shift = Swift.abs(k32 - r.kappa) * (Swift.abs(r.dLogCp) + nu / r.kappa + 1)
                let scale = Swift.max(Swift.abs(r.logI), Swift.abs(r.logCp), 1e-30)
                #expect(Swift.abs(logI[i] - r.logI) <= 1e-5 * Swift.max(Swift.abs(r.logI), 1e-30) + shift,
                        "float32 log I_\(nu)(\(r.kappa)) = \(logI[i]), expected \(r.logI)")
                #expect(Swift.abs(logCp[i] - r.logCp) <= 1e-5 * scale + shift,
                        "float32 log C_\(p)(\(r.kappa)) = \(logCp[i]), expected \(r.logCp)")
            }
        }
    }

    @Test(arguments: [3, 16, 64, 256, 1024])
    func gradients(p: Int) {
        let kappa = Tensor([1e-3, 0.3, 2, 17, 150, 900, 1e4], shape: [7], dtype: .float64)
        let nu = Double(p) / 2 - 1
        for f in [{ (k: Tensor) in k.logBesselI(order: nu) },
                  { (k: Tensor) in k.besselRatio(order: nu) },
                  { (k: Tensor) in k.vmfLogNormalizer(dimension: p, approximation: .exact) },
                  { (k: Tensor) in k.vmfLogNormalizer(dimension: p, approximation: .largeOrder) }] {
            let report = gradcheck([kappa]) { f($0[0]) }
            #expect(report.passed, "p = \(p): \(report)")
        }
        // Composed the way DINO-vMF uses it: logits ⟨w, y⟩/τ + log C_p(‖w‖/τ).
        let w = randn([3, 5], seed: UInt64(p)), y = randn([5], seed: 1).l2Normalized()
        let report = gradcheck([w]) { t in
            let norms = t[0].norm(2, alongAxes: [1]) / 0.1
            return (t[0].matmul(y) / 0.1 + norms.vmfLogNormalizer(dimension: p, approximation: .exact)).logSoftmax()
        }
        #expect(report.passed, "\(report)")
    }

    /// The Float32 kernel of the large-order normalizer (one vectorized pass in Float32)
    /// against the Float64 form: value within 4 ulp of its largest term, derivative within
    /// 1e-6 of its larger term, κ from 1e-3 to 1e5.
    @Test(arguments: [4, 16, 64, 256, 1024])
    func float32ApproximateNormalizerMatchesFloat64(p: Int) {
        let kappas = (0...80).map { Foundation.pow(10, -3 + 8 * Double($0) / 80) }
        let k64 = Tensor(kappas).requiringGrad(), k32 = Tensor(kappas, shape: [kappas.count], dtype: .float32).requiringGrad()
        let v64 = k64.vmfLogNormalizer(dimension: p), v32 = k32.vmfLogNormalizer(dimension: p)
        v64.sum().backward()
        v32.sum().backward()
        let nu = Double(p) / 2 - 1
        for (i, kappa) in kappas.enumerated() {
            // The terms ν log(ν + s), s and the constant are each rounded: scale the ulp by the largest.
            let s = (nu * nu + kappa * kappa).squareRoot()
            let scale = Swift.max(nu * Foundation.log(nu + s), s, (Double(p) - 1) / 2 * Foundation.log(2 * Double.pi))
            let (a, b) = (v32[element: [i]], v64[element: [i]])
            #expect(Swift.abs(a - b) <= 4 * scale * Double(Float.ulpOfOne), "p \(p), κ \(kappa): \(a) vs \(b)")
            let (da, db) = (k32.grad![element: [i]], k64.grad![element: [i]])
            // Its two terms ±κ/(ν + s), κ/(2s²) cancel for small κ: scale by the larger term.
            #expect(Swift.abs(da - db) <= 1e-6 * Swift.max(Swift.abs(db), kappa / (nu + s)),
                    "p \(p), κ \(kappa): derivative \(da) vs \(db)")
        }
    }

    @Test func monotonicityAndLimits() {
        for p in [2, 3, 16, 256, 4096] {
            let nu = Double(p) / 2 - 1
            let kappas = [1e-6, 1e-3, 0.1, 1, 5, 20, 60, 200, 1000, 5000, 2e4, 1e5, 1e6]
            let values = kappas.map { vmfLogNormalizer(dimension: p, kappa: $0, approximation: .exact) }
            let ratios = kappas.map { besselRatio(order: nu, $0) }
            #expect(zip(values, values.dropFirst()).allSatisfy { $0 > $1 }, "log C_\(p) must decrease: \(values)")
            #expect(ratios.allSatisfy { $0 > 0 && $0 < 1 }, "A must lie in (0, 1): \(ratios)")
            #expect(zip(ratios, ratios.dropFirst()).allSatisfy { $0 < $1 }, "A must increase: \(ratios)")
            #expect(ratios.last! > 0.99 || p == 4096)
            // C_p(κ → 0) = 1/|S^{p−1}| = Γ(p/2)/(2π^{p/2}).
            let logArea = Foundation.log(2.0) + Double(p) / 2 * Foundation.log(Double.pi) - lgamma(Double(p) / 2)
            let atZero = vmfLogNormalizer(dimension: p, kappa: 0, approximation: .exact)
            #expect(Swift.abs(atZero + logArea) <= 1e-12 * Swift.max(1, Swift.abs(logArea)), "p = \(p): \(atZero) vs \(-logArea)")
            for k in kappas { #expect(logBesselI(order: nu, k).isFinite) }
        }
        #expect(logBesselI(order: 0, 0) == 0 && logBesselI(order: 2, 0) == -.infinity)
        #expect(logBesselI(order: 2047, 1e6).isFinite && logBesselI(order: 2047, 1e-6).isFinite)
        // Closed forms: I_{1/2}(κ) = √(2/(πκ)) sinh κ.
        for k in [0.01, 1.0, 30, 700] {
            let exact = 0.5 * Foundation.log(2 / (Double.pi * k)) + k + Foundation.log(-Foundation.expm1(-2 * k) / 2)
            #expect(Swift.abs(logBesselI(order: 0.5, k) - exact) <= 1e-13 * Swift.max(1, Swift.abs(exact)))
        }
    }

    @Test func nanPropagatesAndAnomalyModeNamesTheOp() {
        #expect(logBesselI(order: 3, .nan).isNaN)
        let k = Tensor([1.0, .nan]).requiringGrad()
        let error = #expect(throws: AnomalyError.self) {
            try withAnomalyDetection { k.vmfLogNormalizer(dimension: 64, approximation: .exact).sum() }
        }
        #expect(error?.op == "vmfLogNormalizer")
    }

    @Test func invalidArgumentsNameTheFunction() async {
        await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            _ = logBesselI(order: 2, -0.5)
        }.map { result in
            #expect(String(decoding: result.standardErrorContent, as: UTF8.self).contains("logBesselI: κ = -0.5 is negative"))
        }
        await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            _ = vmfLogNormalizer(dimension: 1, kappa: 1)
        }.map { result in
            #expect(String(decoding: result.standardErrorContent, as: UTF8.self).contains("vmfLogNormalizer: dimension 1 is below 2"))
        }
        await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            _ = besselRatio(order: -1, 1)
        }.map { result in
            #expect(String(decoding: result.standardErrorContent, as: UTF8.self).contains("besselRatio: order -1.0 is negative"))
        }
    }
}
