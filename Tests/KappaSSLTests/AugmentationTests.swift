import Foundation
import Kappa
import KappaSSL
import Testing

/// The geometric and noise options of the views, on a 28×28 image of a horizontal bar.
@Suite("Multi-crop views: rotation, shift, noise")
struct AugmentationTests {
    static let n = 28
    /// A horizontal bar through the center: rows 13–14, columns 4–23.
    static let bar: [Float] = (0..<(n * n)).map { i in (13...14).contains(i / n) && (4...23).contains(i % n) ? 1 : 0 }

    /// Whole-image global crops with every photometric step off and identity normalization,
    /// so that a view is the geometric transform alone.
    static func plain() -> MultiCropAugmentation {
        var a = MultiCropAugmentation()
        (a.globalSize, a.localCrops, a.globalScale) = (n, 0, 1...1)
        (a.flipProbability, a.jitterProbability, a.blurProbabilities, a.solarizeProbability) = (0, 0, [0, 0, 0], 0)
        (a.mean, a.std) = (0, 1)
        return a
    }

    static func views(_ a: MultiCropAugmentation, count: Int) -> [[Float]] {
        var g = RandomGenerator(seed: 11)
        return (0..<count).flatMap { _ in
            bar.withUnsafeBufferPointer { a.crops(of: $0, channels: 1, height: n, width: n, using: &g) }
        }
    }

    /// Centroid (x, y) and orientation in degrees (principal axis of the second moments).
    static func moments(_ v: [Float]) -> (x: Double, y: Double, degrees: Double) {
        var (m, mx, my) = (0.0, 0.0, 0.0)
        for i in v.indices { let w = Double(v[i]); m += w; mx += w * Double(i % n); my += w * Double(i / n) }
        let (cx, cy) = (mx / m, my / m)
        var (uxx, uyy, uxy) = (0.0, 0.0, 0.0)
        for i in v.indices {
            let (w, dx, dy) = (Double(v[i]), Double(i % n) - cx, Double(i / n) - cy)
            uxx += w * dx * dx; uyy += w * dy * dy; uxy += w * dx * dy
        }
        return (cx, cy, 0.5 * atan2(2 * uxy, uxx - uyy) * 180 / Double.pi)
    }

    @Test func withoutOptionsAViewIsTheImage() {
        for v in Self.views(Self.plain(), count: 3) { #expect(v == Self.bar) }
    }

    @Test func rotationTurnsWithinTheRange() {
        var a = Self.plain()
        a.rotationDegrees = 40
        let angles = Self.views(a, count: 40).map { Self.moments($0).degrees }
        // Bilinear resampling blurs the bar a little; its axis stays within a degree or two.
        #expect(angles.allSatisfy { abs($0) <= 42 }, "\(angles)")
        #expect(angles.max()! - angles.min()! > 40, "\(angles)")
        for v in Self.views(a, count: 10) {
            let c = Self.moments(v)
            #expect(abs(c.x - 13.5) < 0.6 && abs(c.y - 13.5) < 0.6, "a turn about the center keeps the centroid: \(c)")
            let mass = v.reduce(0, +)
            #expect(abs(mass - 40) < 1.5, "a turn keeps the area: \(mass)")
        }
    }

    @Test func translationShiftsWithinTheRange() {
        var a = Self.plain()
        a.translation = 0.1
        let shifts = Self.views(a, count: 40).map { v -> (Double, Double) in let c = Self.moments(v); return (c.x - 13.5, c.y - 13.5) }
        // Up to 2.8 pixels each way (the bar keeps 4 pixels from the sides, so nothing is cut).
        #expect(shifts.allSatisfy { abs($0.0) <= 2.9 && abs($0.1) <= 2.9 }, "\(shifts)")
        #expect(shifts.contains { abs($0.0) > 1.5 } && shifts.contains { abs($0.1) > 1.5 }, "\(shifts)")
        #expect(Self.views(a, count: 40).allSatisfy { abs(Self.moments($0).degrees) < 1 })
    }

    @Test func noiseHasTheDrawnSpread() {
        var a = Self.plain()
        a.noiseStd = 0.2
        let spreads = Self.views(a, count: 40).map { v -> Double in
            let d = zip(v, Self.bar).map { Double($0 - $1) }
            return (d.map { $0 * $0 }.reduce(0, +) / Double(d.count)).squareRoot()
        }
        #expect(spreads.allSatisfy { $0 <= 0.22 }, "\(spreads)")
        #expect(spreads.max()! > 0.15 && spreads.min()! < 0.05, "\(spreads)")
    }
}
