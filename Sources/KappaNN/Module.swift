import Kappa

/// A trainable tensor of a module: a leaf that requires gradients. Its name in
/// ``Module/namedParameters()`` is the property's name, prefixed by the path of modules.
@propertyWrapper
public struct Parameter<Value: TensorSlot> {
    public var wrappedValue: Value
    public init(wrappedValue: Value) {
        wrappedValue.tensor?.requiresGrad = true
        self.wrappedValue = wrappedValue
    }
}

/// A tensor of a module's state that is not trained by gradients (BatchNorm's running
/// statistics); saved in checkpoints, copied with parameters, never given to optimizers.
@propertyWrapper
public struct Buffer<Value: TensorSlot> {
    public var wrappedValue: Value
    public init(wrappedValue: Value) { self.wrappedValue = wrappedValue }
}

/// What a ``Parameter`` or ``Buffer`` may hold: a tensor, or an optional one.
public protocol TensorSlot {
    var tensor: Tensor? { get }
}
extension Tensor: TensorSlot {
    public var tensor: Tensor? { self }
}
extension Optional: TensorSlot where Wrapped == Tensor {
    public var tensor: Tensor? { self }
}

private protocol ParameterBox { var tensor: Tensor? { get } }
private protocol BufferBox { var tensor: Tensor? { get } }
extension Parameter: ParameterBox { var tensor: Tensor? { wrappedValue.tensor } }
extension Buffer: BufferBox { var tensor: Tensor? { wrappedValue.tensor } }

/// The base class of layers and models, like `torch.nn.Module`.
///
/// Subclasses declare parameters with `@Parameter`, state with `@Buffer`, and submodules as
/// plain stored properties (a module, an optional module, or an array of modules); all are
/// found by reflection, in declaration order, and named by their path:
/// `"blocks.3.attn.qkv.weight"`. Optimizers, the EMA teacher, freezing, weight-decay
/// groups and checkpoints all address parameters by these names.
open class Module {
    /// Training mode (dropout, drop-path and BatchNorm batch statistics on) or evaluation.
    public private(set) var isTraining = true

    public init() {}

    /// The direct submodules with their names.
    public var namedChildren: [(name: String, module: Module)] {
        var out: [(String, Module)] = []
        forEachProperty { label, value in
            if let m = value as? Module {
                out.append((label, m))
            } else if let ms = value as? [Module] {
                for (i, m) in ms.enumerated() { out.append(("\(label).\(i)", m)) }
            }
        }
        return out
    }

    private func forEachProperty(_ body: (String, Any) -> Void) {
        var mirrors: [Mirror] = []
        var m: Mirror? = Mirror(reflecting: self)
        while let mm = m { mirrors.append(mm); m = mm.superclassMirror }
        for mirror in mirrors.reversed() {
            for child in mirror.children {
                guard var label = child.label else { continue }
                if label.hasPrefix("_") { label.removeFirst() }
                body(label, child.value)
            }
        }
    }

    /// Every parameter of this module and its submodules, with its path name, in
    /// declaration order.
    public func namedParameters() -> [(name: String, tensor: Tensor)] {
        collect(prefix: "") { $0 as? ParameterBox }
    }

    /// Every buffer (non-trained state) with its path name.
    public func namedBuffers() -> [(name: String, tensor: Tensor)] {
        collect(prefix: "") { ($0 as? BufferBox).map { b in BoxedTensor(tensor: b.tensor) } }
    }

    /// Parameters and buffers together: what a checkpoint holds.
    public func stateDict() -> [(name: String, tensor: Tensor)] {
        namedParameters() + namedBuffers()
    }

    private struct BoxedTensor: ParameterBox { let tensor: Tensor? }

    private func collect(prefix: String, _ pick: (Any) -> ParameterBox?) -> [(name: String, tensor: Tensor)] {
        var out: [(name: String, tensor: Tensor)] = []
        forEachProperty { label, value in
            if let box = pick(value) {
                if let t = box.tensor { out.append((prefix + label, t)) }
            } else if let m = value as? Module {
                out += m.collect(prefix: prefix + label + ".", pick)
            } else if let ms = value as? [Module] {
                for (i, m) in ms.enumerated() { out += m.collect(prefix: prefix + "\(label).\(i).", pick) }
            }
        }
        return out
    }

    /// The parameters, in the order of ``namedParameters()``.
    public var parameters: [Tensor] { namedParameters().map(\.tensor) }

    /// The number of trainable scalars.
    public var parameterCount: Int { parameters.reduce(0) { $0 + $1.count } }

    /// Sets training mode on this module and every submodule.
    public func train(_ on: Bool = true) {
        isTraining = on
        for (_, c) in namedChildren { c.train(on) }
    }

    /// Sets evaluation mode on this module and every submodule.
    public func eval() { train(false) }

    /// Clears the gradients of every parameter.
    public func zeroGrad() {
        for p in parameters { p.zeroGrad() }
    }

    /// Turns gradients off (or on) for every parameter whose name satisfies `predicate`.
    public func setRequiresGrad(_ flag: Bool, where predicate: (String) -> Bool = { _ in true }) {
        for (name, p) in namedParameters() where predicate(name) { p.requiresGrad = flag }
    }

    /// Copies every parameter and buffer of `other`, a module of the same architecture,
    /// into this one, in place (the teacher starts as a copy of the student).
    public func copyParameters(from other: Module) {
        let mine = stateDict(), theirs = other.stateDict()
        precondition(mine.count == theirs.count, "copyParameters: \(mine.count) tensors here, \(theirs.count) in the source")
        withoutGradients {
            for (a, b) in zip(mine, theirs) {
                precondition(a.name == b.name && a.tensor.shape == b.tensor.shape,
                             "copyParameters: \(a.name) \(a.tensor.shape) does not match \(b.name) \(b.tensor.shape)")
                a.tensor.assign(b.tensor)
            }
        }
    }
}
