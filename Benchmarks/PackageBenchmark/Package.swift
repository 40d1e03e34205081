// swift-tools-version: 6.1
// The BENCHMARKS.md workloads under ordo-one's package-benchmark (wall clock, CPU, peak
// resident memory, malloc counts, with baselines and comparisons):
//
//     cd Benchmarks/PackageBenchmark && swift package benchmark
//
// A package of its own so that `swift test` and CI on the main package never build it.
import Foundation
import PackageDescription

// SwiftPM names a local dependency by its folder, so Kappa's package is whatever the clone's
// folder is called ("kappa", "main", ...): derive it from this manifest's path.
let kappa = URL(fileURLWithPath: #filePath).deletingLastPathComponent()   // Benchmarks/PackageBenchmark
    .deletingLastPathComponent().deletingLastPathComponent().lastPathComponent.lowercased()

let package = Package(
    name: "KappaPackageBenchmark",
    dependencies: [
        .package(path: "../.."),
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.1", traits: ["MallocInterposer"]),
    ],
    targets: [
        .systemLibrary(name: "CBLASBench", path: "Sources/CBLASBench", pkgConfig: "openblas"),
        .executableTarget(
            name: "KappaBenchmarks",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "Kappa", package: kappa),
                .product(name: "KappaNN", package: kappa),
                .product(name: "KappaSSL", package: kappa),
                "CBLASBench",
            ],
            path: "Benchmarks/KappaBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
    ],
    swiftLanguageModes: [.v5]
)
