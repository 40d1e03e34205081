import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The tape: every op on tensors that require gradients appends a node, numbered in the
/// order it ran. `backward` gathers the nodes an output depends on and runs their
/// vector-Jacobian products in reverse tape order, accumulating into the leaves.
///
/// Nodes hold their inputs and the residuals their VJPs saved; an output holds its node.
/// Nothing else refers to a node, so a graph is freed with the last tensor that reaches it,
/// and `backward` releases the saved residuals as it goes (unless `retainGraph`), so memory
/// does not grow across training steps.

/// A recorded op: its inputs and the closure that maps the output's gradient to one
/// gradient per input (`nil` where an input is not differentiable).
final class Node {
    /// Position on the tape; later ops have larger numbers.
    let sequence: Int
    let name: String
    var inputs: [Tensor?]
    let inputShapes: [[Int]]
    var vjp: ((Tensor) -> [Tensor?])?

    init(name: String, inputs: [Tensor?], inputShapes: [[Int]], vjp: @escaping (Tensor) -> [Tensor?]) {
        self.sequence = Tape.counter.wrappingAdd(1, ordering: .relaxed).newValue
        self.name = name
        self.inputs = inputs
        self.inputShapes = inputShapes
        self.vjp = vjp
    }
}

/// The switches of the tape. Like PyTorch's grad mode they are per thread: a
/// ``withoutGradients(_:)`` scope on one thread does not affect another. Tape positions
/// come from one process-wide atomic counter.
public enum Tape {
    static let counter = Atomic<Int>(0)

    /// The per-thread state: recording on or off, anomaly detection and its first finding.
    final class State {
        var gradEnabled = true
        var anomalyDetection = false
        var firstAnomaly: AnomalyError?
    }

    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key) { p in if let p { Unmanaged<State>.fromOpaque(p).release() } }
        return key
    }()

    static var state: State {
        @inline(__always) get {
            if let p = pthread_getspecific(key) { return Unmanaged<State>.fromOpaque(p).takeUnretainedValue() }
            let s = State()
            pthread_setspecific(key, Unmanaged.passRetained(s).toOpaque())
            return s
        }
    }

    static var gradEnabled: Bool {
        get { state.gradEnabled }
        set { state.gradEnabled = newValue }
    }
    static var anomalyDetection: Bool {
        get { state.anomalyDetection }
        set { state.anomalyDetection = newValue }
    }
    static var firstAnomaly: AnomalyError? {
        get { state.firstAnomaly }
        set { state.firstAnomaly = newValue }
    }

    /// Whether ops currently record onto the tape.
    public static var isRecording: Bool { gradEnabled }

    /// Records `output` as the result of op `name` on `inputs` with the given VJP, when
    /// gradients are on and some input requires them; checks the output for non-finite
    /// values in anomaly mode. The VJP must not capture `output` itself (use a
    /// `detached()` view of it): a node holding its own output would never be freed.
    @inline(__always)
    static func record(_ name: String, _ inputs: [Tensor], _ output: Tensor,
                       _ vjp: @escaping (Tensor) -> [Tensor?]) {
        let state = self.state
        if state.anomalyDetection { checkAnomaly(output, op: name, phase: "forward", inputs: inputs.map(\.shape)) }
        var any = false
        for t in inputs where t._requiresGrad { any = true; break }
        guard any && state.gradEnabled else { return }
        output._requiresGrad = true
        output.gradFn = Node(name: name, inputs: inputs.map { $0._requiresGrad ? $0 : nil },
                             inputShapes: inputs.map(\.shape), vjp: vjp)
    }

    static func checkAnomaly(_ t: Tensor, op: String, phase: String, inputs: [[Int]]) {
        guard firstAnomaly == nil, !t.isAllFinite else { return }
        firstAnomaly = AnomalyError(op: op, phase: phase, inputShapes: inputs, outputShape: t.shape)
    }
}

extension Tensor {
    var isAllFinite: Bool {
        let c = contiguousData()
        let n = c.count
        switch dtype {
        case .float32:
            let p = c.pointer(Float.self)
            var bad = false
            for i in 0..<n where !p[i].isFinite { bad = true; break }
            return !bad
        case .float64:
            let p = c.pointer(Double.self)
            var bad = false
            for i in 0..<n where !p[i].isFinite { bad = true; break }
            return !bad
        }
    }
}

/// Runs `body` with recording off: ops produce tensors without gradient history (for a
/// teacher network, evaluation and optimizer updates).
public func withoutGradients<R>(_ body: () throws -> R) rethrows -> R {
    let saved = Tape.gradEnabled
    Tape.gradEnabled = false
    defer { Tape.gradEnabled = saved }
    return try body()
}

/// Runs `body` with recording on, even inside ``withoutGradients(_:)``.
public func withGradients<R>(_ body: () throws -> R) rethrows -> R {
    let saved = Tape.gradEnabled
    Tape.gradEnabled = true
    defer { Tape.gradEnabled = saved }
    return try body()
}

// MARK: Anomaly mode

/// The first op, in a ``withAnomalyDetection(_:)`` scope, whose forward output or backward
/// gradient held NaN or infinity.
public struct AnomalyError: Error, CustomStringConvertible, Equatable {
    /// The op's name, as recorded on the tape (`"log"`, `"matmul"`, ...).
    public let op: String
    /// `"forward"` or `"backward"`.
    public let phase: String
    /// The shapes of the op's inputs.
    public let inputShapes: [[Int]]
    /// The shape of the non-finite result (the output in forward, the input gradient in backward).
    public let outputShape: [Int]

    public var description: String {
        let ins = inputShapes.map { "\($0)" }.joined(separator: ", ")
        return "anomaly: \(phase) of '\(op)' (inputs \(ins)) produced NaN or infinity in a result of shape \(outputShape)"
    }
}

/// Runs `body` checking every op's forward output and every gradient backward computes for
/// NaN or infinity; throws an ``AnomalyError`` naming the first op that produced one, instead
/// of a NaN loss many steps later. The check costs a pass over each result.
public func withAnomalyDetection<R>(_ body: () throws -> R) throws -> R {
    let saved = (Tape.anomalyDetection, Tape.firstAnomaly)
    Tape.anomalyDetection = true
    Tape.firstAnomaly = nil
    defer { (Tape.anomalyDetection, Tape.firstAnomaly) = saved }
    let result = try body()
    if let a = Tape.firstAnomaly { throw a }
    return result
}

// MARK: Backward

extension Tensor {
    /// Back-propagates from this tensor: walks the tape in reverse from the op that made it
    /// and adds d(self)/d(leaf) · `gradient` into the ``grad`` of every leaf that requires
    /// gradients. A scalar may omit `gradient` (it defaults to 1). Gradients accumulate
    /// across calls until ``zeroGrad()``. The saved residuals are released afterwards unless
    /// `retainGraph` is true.
    ///
    /// `onGradientReady` is called with each leaf as soon as its gradient of this backward is
    /// complete (every op that used it has run its VJP), while the rest of backward still runs:
    /// data-parallel training starts averaging a bucket of gradients over the processes then,
    /// as PyTorch's DistributedDataParallel does from its autograd hooks. A leaf that receives no
    /// gradient (all its VJPs returned nil) is not reported.
    public func backward(_ gradient: Tensor? = nil, retainGraph: Bool = false, onGradientReady: ((Tensor) -> Void)? = nil) {
        precondition(_requiresGrad, "backward: tensor of shape \(shape) does not require gradients")
        let seed: Tensor
        if let g = gradient {
            precondition(g.shape == shape, "backward: gradient shape \(g.shape) differs from output shape \(shape)")
            precondition(g.dtype == dtype, "backward: gradient dtype \(g.dtype) differs from output dtype \(dtype)")
            seed = g
        } else {
            precondition(count == 1, "backward: output of shape \(shape) is not a scalar; pass a gradient")
            seed = Tensor.full(shape, 1, dtype: dtype)
        }
        guard let root = gradFn else {
            accumulateLeaf(self, seed)
            onGradientReady?(self)
            return
        }
        withoutGradients {
            // Gather the nodes `root` depends on, then run them latest-first: reverse tape order
            // is a topological order, since an op's inputs exist before it runs.
            var nodes: [Node] = []
            var seen: Set<ObjectIdentifier> = [ObjectIdentifier(root)]
            var stack = [root]
            // With a hook: how many uses of each leaf are still to run their VJPs.
            var uses: [ObjectIdentifier: Int] = [:]
            while let n = stack.popLast() {
                nodes.append(n)
                for case let t? in n.inputs {
                    if let m = t.gradFn {
                        if seen.insert(ObjectIdentifier(m)).inserted { stack.append(m) }
                    } else if onGradientReady != nil {
                        uses[ObjectIdentifier(t), default: 0] += 1
                    }
                }
            }
            var received: Set<ObjectIdentifier> = []
            /// One use of leaf `t` done: when it was the last, the leaf's gradient is complete.
            func used(_ t: Tensor) {
                guard let hook = onGradientReady else { return }
                let key = ObjectIdentifier(t)
                let left = uses[key, default: 1] - 1
                uses[key] = left
                if left == 0 && received.contains(key) { hook(t) }
            }
            nodes.sort { $0.sequence > $1.sequence }
            var pending: [ObjectIdentifier: Tensor] = [ObjectIdentifier(root): seed]
            for node in nodes {
                guard let g = pending.removeValue(forKey: ObjectIdentifier(node)) else {
                    // Reached by no gradient: its leaves' uses are done all the same.
                    if onGradientReady != nil { for case let t? in node.inputs where t.gradFn == nil { used(t) } }
                    continue
                }
                guard let vjp = node.vjp else {
                    preconditionFailure("backward: the graph through '\(node.name)' was already released; pass retainGraph: true to the earlier backward")
                }
                let grads = vjp(g)
                precondition(grads.count == node.inputs.count,
                             "backward: VJP of '\(node.name)' returned \(grads.count) gradients for \(node.inputs.count) inputs")
                for (i, input) in node.inputs.enumerated() {
                    guard let t = input else { continue }
                    guard var gi = grads[i] else {
                        if t.gradFn == nil { used(t) }
                        continue
                    }
                    if gi.shape != t.shape { gi = gi.sum(toShape: t.shape) }
                    if Tape.anomalyDetection {
                        Tape.checkAnomaly(gi, op: node.name, phase: "backward", inputs: node.inputShapes)
                    }
                    if let m = t.gradFn {
                        let key = ObjectIdentifier(m)
                        if let old = pending[key] { pending[key] = old + gi } else { pending[key] = gi }
                    } else {
                        accumulateLeaf(t, gi)
                        if onGradientReady != nil {
                            received.insert(ObjectIdentifier(t))
                            used(t)
                        }
                    }
                }
                if !retainGraph {
                    node.vjp = nil
                    node.inputs = node.inputs.map { _ in nil }
                }
            }
        }
    }
}

private func accumulateLeaf(_ t: Tensor, _ g: Tensor) {
    withoutGradients {
        precondition(g.dtype == t.dtype, "backward: gradient of dtype \(g.dtype) for a \(t.dtype) leaf")
        if let old = t.grad { t.grad = old + g } else { t.grad = g.copied() }
    }
}

// MARK: Custom ops

extension Tensor {
    /// Defines a differentiable op from a forward function and its vector-Jacobian product,
    /// in the shape of JAX's `custom_vjp` (PyTorch: `autograd.Function` with
    /// `ctx.save_for_backward`). The library's own fused ops (``layerNorm(weight:bias:eps:)``,
    /// ``batchNorm(weight:bias:runningMean:runningVariance:training:momentum:eps:applyingReLU:synchronizing:)``,
    /// ``selfAttention(heads:scale:)``) are written this way.
    ///
    /// `forward` runs once, with recording off, on detached copies of `inputs`, and returns
    /// the op's outputs and its *residuals*: whatever the VJP needs from the forward pass (the
    /// inputs, an output, or intermediates such as per-row statistics, so that backward does not
    /// recompute them). `vjp` receives one gradient per output (zeros for an output that does
    /// not reach the loss) and the residuals, and returns one gradient per input in input order
    /// (`nil` where an input is not differentiable); a gradient of a broadcast input may keep the
    /// output's shape, the tape sums it down. Residuals are kept until backward runs (or the
    /// outputs are freed); outputs of several tensors must share a dtype.
    ///
    /// ```swift
    /// // y = x³, keeping x² for backward.
    /// func cube(_ x: Tensor) -> Tensor {
    ///     Tensor.custom("cube", [x], forward: { t in
    ///         let square = t[0] * t[0]
    ///         return (outputs: [square * t[0]], residuals: [square])
    ///     }, vjp: { g, r in [g[0] * 3 * r[0]] })[0]
    /// }
    /// ```
    ///
    /// Gradient-check a new op with ``gradcheck(_:eps:atol:rtol:mode:seed:_:)``.
    public static func custom(_ name: String, _ inputs: [Tensor],
                              forward: ([Tensor]) -> (outputs: [Tensor], residuals: [Tensor]),
                              vjp: @escaping (_ gradients: [Tensor], _ residuals: [Tensor]) -> [Tensor?]) -> [Tensor] {
        let (produced, saved) = withoutGradients { forward(inputs.map { $0.detached() }) }
        precondition(!produced.isEmpty, "\(name): forward returned no outputs")
        // Fresh tensors without history; residuals detached so that no node holds its own output.
        let outputs = produced.map { $0.detached() }
        let residuals = saved.map { $0.detached() }
        let count = inputs.count
        func checked(_ grads: [Tensor?]) -> [Tensor?] {
            precondition(grads.count == count, "\(name): VJP returned \(grads.count) gradients for \(count) inputs")
            return grads
        }
        if outputs.count == 1 {
            Tape.record(name, inputs, outputs[0]) { g in checked(vjp([g], residuals)) }
            return outputs
        }
        guard Tape.isRecording && inputs.contains(where: { $0.requiresGrad }) else { return outputs }
        // Several outputs: one node on the outputs packed into a vector; each output is a
        // differentiable slice of it, so the tape hands the VJP all output gradients at once.
        let dtype = outputs[0].dtype
        for o in outputs {
            precondition(o.dtype == dtype, "\(name): outputs of dtypes \(outputs.map(\.dtype)); they must share one")
        }
        let shapes = outputs.map(\.shape), sizes = outputs.map(\.count)
        let packed = withoutGradients { Tensor.concat(outputs.map { $0.reshape([$0.count]) }, alongAxis: 0) }
        Tape.record(name, inputs, packed) { g in
            checked(vjp(zip(g.split(sizes: sizes, alongAxis: 0), shapes).map { $0.reshape($1) }, residuals))
        }
        return zip(packed.split(sizes: sizes, alongAxis: 0), shapes).map { $0.reshape($1) }
    }

    /// A single-output ``custom(_:_:forward:vjp:)`` whose VJP gets the inputs and the output
    /// as residuals (PyTorch's `save_for_backward(*inputs, output)`):
    ///
    /// ```swift
    /// func cube(_ x: Tensor) -> Tensor {
    ///     Tensor.custom("cube", [x], forward: { $0[0] * $0[0] * $0[0] },
    ///                   vjp: { g, inputs, _ in [g * 3 * inputs[0] * inputs[0]] })
    /// }
    /// ```
    public static func custom(_ name: String, _ inputs: [Tensor],
                              forward: ([Tensor]) -> Tensor,
                              vjp: @escaping (_ gradient: Tensor, _ inputs: [Tensor], _ output: Tensor) -> [Tensor?]) -> Tensor {
        let n = inputs.count
        return custom(name, inputs, forward: { t in
            let y = forward(t)
            return ([y], t + [y])
        }, vjp: { g, r in vjp(g[0], Array(r.prefix(n)), r[n]) })[0]
    }
}
