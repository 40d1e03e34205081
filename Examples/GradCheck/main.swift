// A custom layer with a hand-written VJP and residuals (as JAX's custom_vjp), gradient-checked
// against finite differences.
//
//     swift run GradCheck
//
// RMSNorm (Zhang and Sennrich, 2019): y = g ⊙ x / √(mean(x²) + ε) over the last axis.
// Its VJP, with r = (mean(x²) + ε)^(−1/2) and n the row length:
//     dx = r·(G ⊙ g) − x·r³/n · Σ(G ⊙ g ⊙ x)
//     dg = Σ over rows of G ⊙ x·r
import Foundation
import Kappa

func rmsNorm(_ x: Tensor, gain: Tensor, eps: Double = 1e-6) -> Tensor {
    let n = Double(x.shape[x.rank - 1])
    return Tensor.custom("rmsNorm", [x, gain], forward: { t in
        let (x, gain) = (t[0], t[1])
        let r = ((x * x).mean(alongAxes: [-1], keepingDims: true) + eps).rsqrt()   // one per row
        // The residuals: what the VJP needs, so that it does not recompute the inverse RMS.
        return (outputs: [x * r * gain], residuals: [x, gain, r])
    }, vjp: { g, residuals in
        let (x, gain, r) = (residuals[0], residuals[1], residuals[2])
        let gg = g[0] * gain
        let dx = r * gg - x * r.pow(3) / n * (gg * x).sum(alongAxes: [-1], keepingDims: true)
        let dgain = (g[0] * x * r).sum(toShape: gain.shape)
        return [dx, dgain]
    })[0]
}

var rng = RandomGenerator(seed: 0)
let x = Tensor.randomNormal([4, 8], dtype: .float64, using: &rng)
let gain = Tensor.randomUniform([8], low: 0.5, high: 1.5, dtype: .float64, using: &rng)

print("RMSNorm over the last axis of x \(x.shape) with gain \(gain.shape), Float64\n")
let full = gradcheck([x, gain]) { rmsNorm($0[0], gain: $0[1]) }
print(full, "\n")
// Composed with library ops, checked by random projections (fast mode).
let fast = gradcheck([x, gain], mode: .fast) { t in
    rmsNorm(t[0].transposed().contiguous().transposed(), gain: t[1]).gelu().matmul(t[0].transposed())
}
print(fast)

// The same layer trains in Float32: one gradient step lowers a loss.
let x32 = x.to(.float32), g32 = gain.to(.float32).requiringGrad()
let loss = { rmsNorm(x32, gain: g32).sum(alongAxis: 0).softmax().max() }
let before = loss()
before.backward()
let after = withoutGradients { rmsNorm(x32, gain: g32 - g32.grad! * 0.5).sum(alongAxis: 0).softmax().max() }
print("\nFloat32 step: loss \(String(format: "%.6f", before.item())) -> \(String(format: "%.6f", after.item()))")

exit(full.passed && fast.passed ? 0 : 1)
