import Foundation
import Kappa

/// Per-iteration schedules, computed up front as DINO's `cosine_scheduler` does.
public enum Schedule {
    /// Linear warmup from `warmupStart` to `base` over `warmupEpochs`, then a cosine from
    /// `base` to `final` over the remaining iterations: one value per iteration.
    public static func cosine(base: Double, final: Double, epochs: Int, iterationsPerEpoch: Int,
                              warmupEpochs: Int = 0, warmupStart: Double = 0) -> [Double] {
        precondition(epochs > 0 && iterationsPerEpoch > 0 && warmupEpochs >= 0 && warmupEpochs <= epochs,
                     "Schedule.cosine: \(epochs) epochs of \(iterationsPerEpoch) iterations with \(warmupEpochs) warmup epochs")
        let warm = warmupEpochs * iterationsPerEpoch
        var out: [Double] = warm == 0 ? [] : (0..<warm).map { i in
            warm == 1 ? base : warmupStart + (base - warmupStart) * Double(i) / Double(warm - 1)
        }
        let rest = epochs * iterationsPerEpoch - warm
        out += (0..<rest).map { i in final + 0.5 * (base - final) * (1 + Foundation.cos(Double.pi * Double(i) / Double(rest))) }
        return out
    }

    /// The same value for every iteration.
    public static func constant(_ value: Double, iterations: Int) -> [Double] {
        [Double](repeating: value, count: iterations)
    }

    /// `base`, multiplied by `gamma` at each milestone iteration.
    public static func step(base: Double, gamma: Double, milestones: [Int], iterations: Int) -> [Double] {
        (0..<iterations).map { i in base * Foundation.pow(gamma, Double(milestones.filter { i >= $0 }.count)) }
    }
}

/// Gradient clipping and freezing, as DINO's utilities.
public enum Gradients {
    /// DINO's `clip_gradients`: scales each parameter's gradient by maxNorm/(‖g‖ + 1e-6)
    /// when that is below 1. Returns the norms before clipping, by name.
    @discardableResult
    public static func clipPerParameter(_ model: Module, maxNorm: Double) -> [(name: String, norm: Double)] {
        clipPerParameter(parameters: model.namedParameters(), maxNorm: maxNorm)
    }

    /// ``clipPerParameter(_:maxNorm:)`` over parameters collected once (a training loop that
    /// clips every step need not walk its modules every step).
    @discardableResult
    public static func clipPerParameter(parameters: [(name: String, tensor: Tensor)], maxNorm: Double) -> [(name: String, norm: Double)] {
        var norms: [(String, Double)] = []
        withoutGradients {
            for (name, p) in parameters {
                guard let g = p.grad else { continue }
                let n = g.norm().item()
                norms.append((name, n))
                let coef = maxNorm / (n + 1e-6)
                if coef < 1 { p.grad = g * coef }
            }
        }
        return norms
    }

    /// Scales all gradients together so that their global 2-norm is at most `maxNorm`
    /// (PyTorch's `clip_grad_norm_`). Returns the norm before clipping.
    @discardableResult
    public static func clipGlobalNorm(_ parameters: [Tensor], maxNorm: Double) -> Double {
        withoutGradients {
            let total = parameters.compactMap(\.grad).reduce(0.0) { $0 + ($1 * $1).sum().item() }.squareRoot()
            let coef = maxNorm / (total + 1e-6)
            if coef < 1 { for p in parameters { if let g = p.grad { p.grad = g * coef } } }
            return total
        }
    }
}

/// The exponential moving average of a student's parameters into a teacher's, in place and
/// off the tape: θ_t ← m·θ_t + (1 − m)·θ_s for every parameter, matched by name.
public func emaUpdate(teacher: Module, student: Module, momentum m: Double) {
    emaUpdate(teacherParameters: teacher.namedParameters(), studentParameters: student.namedParameters(), momentum: m)
}

/// ``emaUpdate(teacher:student:momentum:)`` over parameters collected once, matched by
/// position and checked by name, shape and dtype.
public func emaUpdate(teacherParameters t: [(name: String, tensor: Tensor)], studentParameters s: [(name: String, tensor: Tensor)],
                      momentum m: Double) {
    precondition(t.count == s.count, "emaUpdate: teacher has \(t.count) parameters, student \(s.count)")
    for (a, b) in zip(t, s) {
        precondition(a.name == b.name && a.tensor.shape == b.tensor.shape && a.tensor.dtype == b.tensor.dtype,
                     "emaUpdate: \(a.name) \(a.tensor.shape) does not match \(b.name) \(b.tensor.shape)")
        switch a.tensor.dtype {
        case .float32: ema(Float.self, a.tensor, b.tensor, m)
        case .float64: ema(Double.self, a.tensor, b.tensor, m)
        }
    }
}

private func ema<T: TensorScalar>(_: T.Type, _ teacher: Tensor, _ student: Tensor, _ m: Double) {
    let mm = T(m), rest = T(1 - m)
    teacher.withMutableScalars(as: T.self) { tt in
        student.withScalars(as: T.self) { ss in
            for i in 0..<tt.count { tt[i] = mm * tt[i] + rest * ss[i] }
        }
    }
}
