import Foundation
import Kappa

/// Parameters that share a learning rate and a weight decay (PyTorch's param groups).
/// A training loop sets both per iteration from its schedules.
public struct ParameterGroup {
    /// The group's name (`"regularized"`, `"notRegularized"`, ...).
    public var name: String
    /// The parameters, by name (unique across an optimizer's groups).
    public var parameters: [(name: String, tensor: Tensor)]
    /// The current learning rate.
    public var learningRate: Double
    /// The current weight decay (decoupled in AdamW).
    public var weightDecay: Double
    /// This group's learning rate relative to a schedule's (``Optimizer/setSchedule(learningRate:weightDecay:)``).
    public var learningRateScale: Double

    /// A group with its hyperparameters.
    public init(name: String, parameters: [(name: String, tensor: Tensor)], learningRate: Double, weightDecay: Double,
                learningRateScale: Double = 1) {
        (self.name, self.parameters, self.learningRate, self.weightDecay) = (name, parameters, learningRate, weightDecay)
        self.learningRateScale = learningRateScale
    }

    /// The trainable parameters of `model` whose names satisfy `predicate`, as one group
    /// (names prefixed by `prefix`).
    public static func matching(_ model: Module, name: String, learningRate: Double, weightDecay: Double,
                                learningRateScale: Double = 1, prefix: String = "", where predicate: (String) -> Bool) -> ParameterGroup {
        ParameterGroup(name: name, parameters: model.namedParameters().filter { $0.tensor.requiresGrad && predicate($0.name) }
                        .map { (prefix + $0.name, $0.tensor) },
                       learningRate: learningRate * learningRateScale, weightDecay: weightDecay, learningRateScale: learningRateScale)
    }

    /// DINO's `get_params_groups`: `"regularized"` (weight decay) and `"notRegularized"`
    /// (biases and other 1-D parameters, no decay; DINO tells them by a name ending in `bias`
    /// or one dimension). The prototype scale g of a ``DINOHead`` has shape [K, 1], so DINO
    /// decays it; `decayPrototypeScale: false` moves it to the undecayed group.
    /// `prefix` is put before every name (`"head."`): names must be unique across all the
    /// groups of one optimizer, which keeps its per-parameter state by name.
    public static func dinoGroups(_ model: Module, learningRate: Double, weightDecay: Double,
                                  decayPrototypeScale: Bool = true, prefix: String = "") -> [ParameterGroup] {
        var decayed: [(name: String, tensor: Tensor)] = [], plain: [(name: String, tensor: Tensor)] = []
        for var p in model.namedParameters() where p.tensor.requiresGrad {
            p.name = prefix + p.name
            let isScale = (model as? DINOHead).map { $0.lastLayerScale === p.tensor } ?? false
            if p.name.hasSuffix("bias") || p.tensor.rank == 1 || (isScale && !decayPrototypeScale) {
                plain.append(p)
            } else {
                decayed.append(p)
            }
        }
        return [ParameterGroup(name: "regularized", parameters: decayed, learningRate: learningRate, weightDecay: weightDecay),
                ParameterGroup(name: "notRegularized", parameters: plain, learningRate: learningRate, weightDecay: 0)]
    }
}

/// An optimizer updates the parameters of its groups in place from their gradients,
/// skipping parameters without one.
public protocol Optimizer: AnyObject {
    var groups: [ParameterGroup] { get set }
    /// Steps taken so far.
    var stepCount: Int { get set }
    /// Applies one update.
    func step()
    /// The optimizer's per-parameter state (moments), named `"<kind>.<parameter name>"`,
    /// for checkpoints; ``loadState(_:)`` restores it.
    func namedState() -> [(name: String, tensor: Tensor)]
    func loadState(_ tensors: [String: Tensor]) throws
}

extension Optimizer {
    /// Every parameter that has a gradient, with its group and name, in group order.
    var parametersWithGradients: [(group: ParameterGroup, name: String, parameter: Tensor, gradient: Tensor)] {
        groups.flatMap { group in
            group.parameters.compactMap { p in p.tensor.grad.map { (group, p.name, p.tensor, $0) } }
        }
    }

    /// Clears every parameter's gradient.
    public func zeroGrad() {
        for g in groups { for p in g.parameters { p.tensor.zeroGrad() } }
    }

    /// Sets every group's learning rate to `learningRate` × its ``ParameterGroup/learningRateScale``,
    /// and, when given, the weight decay of every group that decays (nonzero decay, or the
    /// group named `"regularized"`), as DINO's loop does each iteration.
    public func setSchedule(learningRate: Double, weightDecay: Double? = nil) {
        for i in groups.indices {
            groups[i].learningRate = learningRate * groups[i].learningRateScale
            if let wd = weightDecay, groups[i].weightDecay != 0 || groups[i].name == "regularized" { groups[i].weightDecay = wd }
        }
    }
}

/// An error loading optimizer state.
public struct OptimizerStateError: Error, CustomStringConvertible {
    /// What is wrong with the state.
    public let description: String
}

/// Stops when two parameters of an optimizer's groups share a name (their state would mix).
func checkUniqueNames(_ optimizer: String, _ groups: [ParameterGroup]) {
    var seen = Set<String>()
    for g in groups {
        for p in g.parameters {
            precondition(seen.insert(p.name).inserted,
                         "\(optimizer): parameter name '\(p.name)' appears twice in the groups; give each module's groups a prefix")
        }
    }
}

/// Per-parameter state tensors kept by name, created as zeros on first use.
final class StateStore {
    var tensors: [String: Tensor] = [:]
    func get(_ kind: String, _ name: String, like p: Tensor) -> Tensor {
        let key = "\(kind).\(name)"
        if let t = tensors[key] { return t }
        let t = Tensor.zeros(p.shape, dtype: p.dtype)
        tensors[key] = t
        return t
    }
    func named() -> [(name: String, tensor: Tensor)] { tensors.keys.sorted().map { ($0, tensors[$0]!) } }
    func load(_ source: [String: Tensor], kinds: [String]) throws {
        var loaded: [String: Tensor] = [:]
        for (k, t) in source where kinds.contains(where: { k.hasPrefix($0 + ".") }) { loaded[k] = t }
        tensors = loaded
    }
}

/// Runs `body` on the raw buffers of a parameter, its gradient and extra state tensors.
func withBuffers<T: TensorScalar>(_: T.Type, _ p: Tensor, _ g: Tensor, _ state: [Tensor],
                                  _ body: (UnsafeMutableBufferPointer<T>, UnsafeBufferPointer<T>, [UnsafeMutableBufferPointer<T>]) -> Void) {
    p.withMutableScalars(as: T.self) { pp in
        g.withScalars(as: T.self) { gg in
            var bufs: [UnsafeMutableBufferPointer<T>] = []
            func nest(_ i: Int) {
                if i == state.count { body(pp, gg, bufs); return }
                state[i].withMutableScalars(as: T.self) { b in bufs.append(b); nest(i + 1) }
            }
            nest(0)
        }
    }
}

/// Stochastic gradient descent with momentum (PyTorch's SGD: buf = μ·buf + g; Nesterov
/// uses g + μ·buf), L2 weight decay added to the gradient.
public final class SGD: Optimizer {
    public var groups: [ParameterGroup]
    public var stepCount = 0
    /// Momentum (0: plain SGD) and whether it is Nesterov's.
    public let momentum: Double, nesterov: Bool
    let state = StateStore()

    /// SGD over `groups`.
    public init(groups: [ParameterGroup], momentum: Double = 0, nesterov: Bool = false) {
        (self.groups, self.momentum, self.nesterov) = (groups, momentum, nesterov)
        checkUniqueNames("SGD", groups)
    }

    public func step() {
        stepCount += 1
        for (group, name, p, g) in parametersWithGradients {
            let buf = momentum != 0 ? [state.get("momentum", name, like: p)] : []
            switch p.dtype {
            case .float32: update(Float.self, p, g, buf, group)
            case .float64: update(Double.self, p, g, buf, group)
            }
        }
    }

    private func update<T: TensorScalar>(_: T.Type, _ p: Tensor, _ g: Tensor, _ buf: [Tensor], _ group: ParameterGroup) {
        let lr = T(group.learningRate), wd = T(group.weightDecay), mu = T(momentum), first = stepCount == 1
        let nesterov = self.nesterov
        withBuffers(T.self, p, g, buf) { pp, gg, bb in
            for i in 0..<pp.count {
                var d = gg[i] + wd * pp[i]
                if let b = bb.first {
                    b[i] = first ? d : mu * b[i] + d
                    d = nesterov ? d + mu * b[i] : b[i]
                }
                pp[i] -= lr * d
            }
        }
    }

    public func namedState() -> [(name: String, tensor: Tensor)] { state.named() }
    public func loadState(_ tensors: [String: Tensor]) throws { try state.load(tensors, kinds: ["momentum"]) }
}

/// Adam with decoupled weight decay (Loshchilov and Hutter; PyTorch's AdamW):
/// p ← p·(1 − lr·wd), m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², p ← p − lr·m̂/(√v̂ + ε).
public final class AdamW: Optimizer {
    public var groups: [ParameterGroup]
    public var stepCount = 0
    /// The moment decay rates and the denominator's ε.
    public let beta1: Double, beta2: Double, eps: Double
    let state = StateStore()

    /// AdamW over `groups` (PyTorch's defaults).
    public init(groups: [ParameterGroup], beta1: Double = 0.9, beta2: Double = 0.999, eps: Double = 1e-8) {
        (self.groups, self.beta1, self.beta2, self.eps) = (groups, beta1, beta2, eps)
        checkUniqueNames("AdamW", groups)
    }

    public func step() {
        stepCount += 1
        for (group, name, p, g) in parametersWithGradients {
            let m = state.get("exp_avg", name, like: p), v = state.get("exp_avg_sq", name, like: p)
            switch p.dtype {
            case .float32: update(Float.self, p, g, m, v, group)
            case .float64: update(Double.self, p, g, m, v, group)
            }
        }
    }

    private func update<T: TensorScalar>(_: T.Type, _ p: Tensor, _ g: Tensor, _ m: Tensor, _ v: Tensor, _ group: ParameterGroup) {
        let t = Double(stepCount)
        let c1 = 1 - Foundation.pow(beta1, t), c2 = 1 - Foundation.pow(beta2, t)
        let decay = T(1 - group.learningRate * group.weightDecay)
        let b1 = T(beta1), b2 = T(beta2), eps = T(eps)
        let stepSize = T(group.learningRate / c1), rootC2 = T(c2.squareRoot())
        withBuffers(T.self, p, g, [m, v]) { pp, gg, s in
            let mm = s[0], vv = s[1]
            for i in 0..<pp.count {
                pp[i] *= decay
                mm[i] = b1 * mm[i] + (1 - b1) * gg[i]
                vv[i] = b2 * vv[i] + (1 - b2) * gg[i] * gg[i]
                pp[i] -= stepSize * mm[i] / (vv[i].squareRoot() / rootC2 + eps)
            }
        }
    }

    public func namedState() -> [(name: String, tensor: Tensor)] { state.named() }
    public func loadState(_ tensors: [String: Tensor]) throws { try state.load(tensors, kinds: ["exp_avg", "exp_avg_sq"]) }
}

/// LARS as in DINO's `utils.LARS`: for parameters of rank > 1, d = g + wd·p is scaled by
/// the trust ratio η‖p‖/‖d‖ (1 when either norm is 0); then buf = μ·buf + d, p ← p − lr·buf.
/// 1-D parameters (biases, norms) skip decay and scaling.
public final class LARS: Optimizer {
    public var groups: [ParameterGroup]
    public var stepCount = 0
    /// Momentum and the trust coefficient η.
    public let momentum: Double, eta: Double
    let state = StateStore()

    /// LARS over `groups` (as DINO's).
    public init(groups: [ParameterGroup], momentum: Double = 0.9, eta: Double = 0.001) {
        (self.groups, self.momentum, self.eta) = (groups, momentum, eta)
        checkUniqueNames("LARS", groups)
    }

    public func step() {
        stepCount += 1
        for (group, name, p, g) in parametersWithGradients {
            let buf = state.get("momentum", name, like: p)
            var d = g
            if p.rank > 1 {
                d = withoutGradients { g + p * group.weightDecay }
                let pn = p.norm().item(), dn = d.norm().item()
                let q = pn > 0 && dn > 0 ? eta * pn / dn : 1
                d = withoutGradients { d * q }
            }
            switch p.dtype {
            case .float32: update(Float.self, p, d, buf, group)
            case .float64: update(Double.self, p, d, buf, group)
            }
        }
    }

    private func update<T: TensorScalar>(_: T.Type, _ p: Tensor, _ d: Tensor, _ buf: Tensor, _ group: ParameterGroup) {
        let lr = T(group.learningRate), mu = T(momentum)
        withBuffers(T.self, p, d, [buf]) { pp, dd, s in
            let b = s[0]
            for i in 0..<pp.count {
                b[i] = mu * b[i] + dd[i]
                pp[i] -= lr * b[i]
            }
        }
    }

    public func namedState() -> [(name: String, tensor: Tensor)] { state.named() }
    public func loadState(_ tensors: [String: Tensor]) throws { try state.load(tensors, kinds: ["momentum"]) }
}
