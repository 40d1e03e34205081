import Kappa
import Testing

/// Programmer errors stop the process with a message that names the op and the shapes.
@Suite("Error messages")
struct ErrorTests {
    @Test func matmulInnerDimensions() async {
        await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            _ = Tensor.zeros([3, 4]).matmul(Tensor.zeros([5, 6]))
        }.map { result in
            let text = String(decoding: result.standardErrorContent, as: UTF8.self)
            #expect(text.contains("matmul: [3, 4] × [5, 6]: inner dimensions 4 and 5 differ"), "\(text)")
        }
    }

    @Test func broadcastMismatch() async {
        await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            _ = Tensor.zeros([2, 3]) + Tensor.zeros([4])
        }.map { result in
            let text = String(decoding: result.standardErrorContent, as: UTF8.self)
            #expect(text.contains("add: [2, 3] and [4] cannot be broadcast together"), "\(text)")
        }
    }

    @Test func invalidAxis() async {
        await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            _ = Tensor.zeros([2, 3]).softmax(alongAxis: 2)
        }.map { result in
            let text = String(decoding: result.standardErrorContent, as: UTF8.self)
            #expect(text.contains("softmax: axis 2 is out of range for shape [2, 3]"), "\(text)")
        }
    }
}
