import Kappa
import KappaNN

/// How the teacher's assignments are kept from collapsing: the teacher target for a batch
/// of raw teacher logits r (shape [N, K]; r = ⟨w_k, y⟩, plus τ_t·log C_p(‖w_k‖/τ_t) with
/// the vMF normalization) at teacher temperature τ_t.
///
/// - `logit` (DINO): softmax((r − c)/τ_t), then c ← m·c + (1 − m)·mean_batch(r).
/// - `probability` (DINO-vMF, as METHOD.md specifies it): with ℓ = r/τ_t and q = softmax(ℓ),
///   the target is softmax(ℓ − log c̄), then c̄ ← m·c̄ + (1 − m)·mean_batch(q), c̄ starting
///   uniform at 1/K. Logit centering would subtract each component's mean logit and with it
///   exactly the log C_p term that DINO-vMF adds; probability centering does not.
/// - `sinkhornKnopp` (SwAV, DINOv2): a few alternating normalizations of exp(ℓ) so that the
///   batch's assignment matrix has equal prototype marginals; no running state.
///
/// The center is part of the training state: save ``center`` with checkpoints.
///
/// With several processes (`Distributed.world`, each holding an equal shard of the batch)
/// the batch statistics are those of the whole batch, as DINO's `update_center` (an
/// allreduce) and DINOv2's distributed Sinkhorn–Knopp: every process keeps the same center.
public final class Centering {
    /// Which of the three.
    public enum Kind: Equatable, Sendable, CustomStringConvertible {
        case logit
        case probability
        case sinkhornKnopp(iterations: Int)

        public var description: String {
            switch self {
            case .logit: return "logit"
            case .probability: return "probability"
            case .sinkhornKnopp(let n): return "sinkhorn-knopp(\(n))"
            }
        }
    }

    /// The method.
    public let kind: Kind
    /// m of the center update.
    public let momentum: Double
    /// c (logit centering, starts at 0) or c̄ (probability centering, starts at 1/K): [K].
    public var center: Tensor

    /// A center for `prototypes` prototypes at its starting value.
    public init(_ kind: Kind, prototypes: Int, momentum: Double = 0.9, dtype: DType = .float32) {
        precondition(prototypes > 0 && momentum >= 0 && momentum <= 1,
                     "Centering: \(prototypes) prototypes, momentum \(momentum)")
        self.kind = kind
        self.momentum = momentum
        center = kind == .probability ? Tensor.full([prototypes], 1 / Double(prototypes), dtype: dtype)
                                      : Tensor.zeros([prototypes], dtype: dtype)
    }

    /// The teacher's target probabilities for raw logits `r` [N, K] (no gradient).
    public func targets(teacherLogits r: Tensor, temperature: Double) -> Tensor {
        withoutGradients {
            switch kind {
            case .logit:
                return ((r - center.to(r.dtype)) / temperature).softmax(alongAxis: -1)
            case .probability:
                return (r / temperature - center.to(r.dtype).log()).softmax(alongAxis: -1)
            case .sinkhornKnopp(let iterations):
                return Centering.sinkhornKnopp(r / temperature, iterations: iterations)
            }
        }
    }

    /// Moves the center towards this batch's statistic (call after ``targets(teacherLogits:temperature:)``).
    public func update(teacherLogits r: Tensor, temperature: Double) {
        withoutGradients {
            let k = r.shape[r.rank - 1]
            let rows = r.reshape([-1, k])
            switch kind {
            case .logit:
                center = center * momentum + Distributed.allReduceMean(rows.mean(alongAxis: 0)).to(center.dtype) * (1 - momentum)
            case .probability:
                let q = (rows / temperature).softmax(alongAxis: -1)
                center = center * momentum + Distributed.allReduceMean(q.mean(alongAxis: 0)).to(center.dtype) * (1 - momentum)
            case .sinkhornKnopp:
                break
            }
        }
    }

    /// Sinkhorn–Knopp on logits ℓ [N, K]: Q = exp(ℓ − max), then `iterations` times
    /// normalize each prototype's mass to 1/K and each sample's to 1/N; returns rows that
    /// sum to 1 (as DINOv2's `sinkhorn_knopp_teacher`). With several processes the rows are
    /// the whole batch's, each process holding its shard: the total, each prototype's mass
    /// and N are summed over all of them (as DINOv2's distributed version), the row
    /// normalization is each process's own.
    public static func sinkhornKnopp(_ logits: Tensor, iterations: Int = 3) -> Tensor {
        withoutGradients {
            let k = logits.shape[1]
            let n = logits.shape[0] * Distributed.size
            // The largest logit over all processes, subtracted for stability.
            var shift = [logits.max().item()]
            Distributed.allReduce(&shift, .max)
            var q = (logits - shift[0]).exp()
            q = q / Distributed.allReduceSum(q.sum())
            for _ in 0..<iterations {
                q = q / Distributed.allReduceSum(q.sum(alongAxis: 0, keepingDims: true)) / Double(k)
                q = q / q.sum(alongAxis: 1, keepingDims: true) / Double(n)
            }
            return q * Double(n)
        }
    }
}
