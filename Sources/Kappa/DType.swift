import RealModule

/// The element type of a tensor, chosen at run time.
///
/// Float32 trains; Float64 runs the same code path and exists so that gradients can be
/// checked by finite differences. Every op accepts both.
public enum DType: String, Sendable, CustomStringConvertible {
    case float32
    case float64

    /// Bytes per element.
    public var byteSize: Int {
        switch self {
        case .float32: return 4
        case .float64: return 8
        }
    }

    public var description: String { rawValue }
}

/// A scalar type a tensor can hold: `Float` or `Double`.
///
/// Kernels are written once, generically over `TensorScalar`, and specialized for both
/// types by the compiler; no kernel dispatches dynamically per element.
public protocol TensorScalar: Real, BinaryFloatingPoint, Sendable {
    /// The run-time tag of this type.
    static var dtype: DType { get }
}

extension Float: TensorScalar {
    /// Float32 tensors hold `Float`.
    public static var dtype: DType { .float32 }
}

extension Double: TensorScalar {
    /// Float64 tensors hold `Double`.
    public static var dtype: DType { .float64 }
}
