import Foundation

extension Tensor: CustomStringConvertible {
    /// Shape, type, gradient status and values; tensors of more than 64 elements show the
    /// first and last 3 entries of every long axis, as NumPy does.
    public var description: String {
        var head = "Tensor(shape: \(shape), dtype: \(dtype)"
        if let n = gradFn?.name { head += ", gradFn: \(n)" } else if _requiresGrad { head += ", requiresGrad" }
        head += ")"
        let values = scalars(as: Double.self)
        let summarize = count > 64
        func fmt(_ v: Double) -> String {
            if v.isNaN { return "nan" }
            if v.isInfinite { return v > 0 ? "inf" : "-inf" }
            if v == v.rounded() && Swift.abs(v) < 1e6 { return String(format: "%.0f.", v) }
            return String(format: "%.4g", v)
        }
        let strides = contiguousStrides(shape)
        func render(_ dim: Int, _ base: Int, _ indent: String) -> String {
            if dim == rank { return fmt(values[base]) }
            let n = shape[dim]
            var items: [String] = []
            let idx: [Int?] = summarize && n > 6 ? [0, 1, 2, nil, n - 3, n - 2, n - 1] : (0..<n).map { $0 }
            for i in idx {
                items.append(i.map { render(dim + 1, base + $0 * strides[dim], indent + " ") } ?? "...")
            }
            let sep = dim == rank - 1 ? ", " : ",\n" + indent + " "
            return "[" + items.joined(separator: sep) + "]"
        }
        return head + "\n" + render(0, 0, "")
    }
}
