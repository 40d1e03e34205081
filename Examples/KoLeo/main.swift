// A self-supervised loss that is not in the library, trained with DINOvMF's whole machinery:
// DINO-vMF plus DINOv2's KoLeo regularizer (Sablayrolles et al. 2019; Oquab et al. 2023),
// which spreads the student's features over the sphere by pushing each image away from its
// nearest neighbour in the batch:
//
//     L = L_DINO-vMF + λ · (1/V) Σ_views −(1/B) Σ_i log ‖y_i − y_nn(i)‖,   y = x/‖x‖,
//
// on the backbone's features of each global view (DINOv2: λ = 0.1). Only the public API of
// KappaSSL is used: an objective (one class), and the DINOvMF command line around it.
//
//     swift run -c release KoLeo                     # on the built-in shapes, as DINOvMF
//     swift run -c release KoLeo --koleo-weight 0.3 --data ../shared/data/mnist
//     swift run -c release KoLeo --resume            # after Ctrl-C
import ArgumentParser
import Foundation
import Kappa
import KappaCommands
import KappaNN
import KappaSSL

/// DINO-vMF's loss plus λ times the KoLeo term of the global views' backbone features.
final class KoLeoDINO: SelfSupervisedObjective, CustomStringConvertible {
    let dino: DINOLoss
    let weight: Double

    init(configuration c: DINOConfiguration, weight: Double) {
        var loss = c.loss
        loss.dimension = c.bottleneck
        dino = DINOLoss(prototypes: c.prototypes, configuration: loss)
        self.weight = weight
    }

    /// −mean_i log ‖y_i − y_nn(i)‖ over the rows of x [B, D] (DINOv2's `KoLeoLoss`); the
    /// nearest neighbour is chosen without gradient, the distance is differentiable.
    static func koleo(_ x: Tensor, eps: Double = 1e-8) -> Tensor {
        let y = x.l2Normalized(alongAxis: 1, eps: eps)
        let neighbours = withoutGradients { () -> [Int] in
            let similarity = y.matmul(y.transposed()) - Tensor.eye(y.shape[0], dtype: y.dtype) * 3   // never oneself
            return similarity.argmax(alongAxis: 1).scalars(as: Double.self).map { Int($0) }
        }
        let distance = (y - y.indexSelect(alongAxis: 0, indices: neighbours) + eps).norm(alongAxes: [1])
        return -(distance + eps).log().mean()
    }

    func callAsFunction(_ batch: ObjectiveBatch, networks: TeacherStudentNetworks, context: StepContext) -> ObjectiveOutput {
        let teacher = networks.teacherLogits(batch.globalViews)
        let student = networks.studentForward(batch.views)
        let r = dino(studentDots: student.logits, studentNorms: networks.studentHead.prototypeNorms, teacherDots: teacher,
                     teacherNorms: networks.teacherHead.prototypeNorms, epoch: context.epoch)
        let globals = student.features.prefix(batch.globalCount)
        let koleo = globals.dropFirst().reduce(Self.koleo(globals[0])) { $0 + Self.koleo($1) } / Double(globals.count)
        return ObjectiveOutput(loss: r.loss + koleo * weight,
                               terms: [LoggedScalar("dinoLoss", label: "dino", r.loss.item()),
                                       LoggedScalar("koleoLoss", label: "koleo", koleo.item())],
                               monitors: r.monitors)
    }

    /// What checkpoints record: a run resumes only under the same λ.
    var description: String { "KoLeoDINO(weight: \(weight))" }

    // The center is the only state; KoLeo keeps none.
    var state: [(name: String, tensor: Tensor)] { dino.state() }
    func loadState(_ tensors: [String: Tensor]) throws { try dino.loadState(tensors) }
}

/// λ, read before the command line proper (the DINOvMF options do not know it).
struct KoLeoOptions: ParsableArguments {
    @Option(help: "Weight λ of the KoLeo term (DINOv2: 0.1).")
    var koleoWeight = 0.1
}

var arguments = Array(CommandLine.arguments.dropFirst())
var weight = KoLeoOptions.parseOrExit([]).koleoWeight   // the option's default
if let i = arguments.firstIndex(of: "--koleo-weight") {
    let pair = Array(arguments[i..<Swift.min(i + 2, arguments.count)])
    let options = KoLeoOptions.parseOrExit(pair)
    guard options.koleoWeight.isFinite && options.koleoWeight >= 0 else { KoLeoOptions.exit(withError: ValidationError("--koleo-weight must be a number of at least 0")) }
    weight = options.koleoWeight
    arguments.removeSubrange(i..<Swift.min(i + 2, arguments.count))
}

KappaCommand.name = "KoLeo"
KappaCommand.objectiveName = "dino-vmf+koleo"
KappaCommand.defaultMethod = .dinoVMF
KappaCommand.discussion = "DINO-vMF plus DINOv2's KoLeo term. --koleo-weight λ (default \(weight)) sets the term's weight; every other option is DINOvMF's."
KappaCommand.makeObjective = { c in
    guard c.ibot == nil else { throw ValidationError("KoLeo builds on DINO's [CLS] loss: use --method dino-vmf or dino") }
    return KoLeoDINO(configuration: c, weight: weight)
}
HostSetup.useFastestBLASKernels()
HostSetup.applyFaultInjection()
HostSetup.joinProcesses()
KappaCommand.main(arguments)
