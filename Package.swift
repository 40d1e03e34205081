// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "Kappa",
    products: [
        .library(name: "Kappa", targets: ["Kappa"]),
        .library(name: "KappaNN", targets: ["KappaNN"]),
        .library(name: "KappaSSL", targets: ["KappaSSL"]),
        // Data-parallel training over MPI (`mpirun`); the other libraries need no MPI.
        .library(name: "KappaMPI", targets: ["KappaMPI"]),
        // The DINOvMF command line, for programs of new objectives (Examples/KoLeo).
        .library(name: "KappaCommands", targets: ["KappaCommands"]),
        .executable(name: "GradCheck", targets: ["GradCheck"]),
        .executable(name: "DINOvMF", targets: ["DINOvMF"]),
        .executable(name: "iBOTvMF", targets: ["iBOTvMF"]),
    ],
    dependencies: [
        // `Real` gives generic exp/log/erf/... over Float and Double, specialized per type.
        .package(url: "https://github.com/apple/swift-numerics", from: "1.1.1"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        // Generators and shrinking for the randomized gradient checks (tests only).
        .package(url: "https://github.com/x-sheep/swift-property-based", from: "2.0.1"),
        // `swift package generate-documentation`: the DocC catalogs of Kappa, KappaNN and KappaSSL.
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
    ],
    targets: [
        .systemLibrary(
            name: "CBLAS",
            path: "Sources/CBLAS",
            pkgConfig: "openblas",
            providers: [.apt(["libopenblas-dev"])]
        ),
        .systemLibrary(
            name: "CZlib",
            path: "Sources/CZlib",
            pkgConfig: "zlib",
            providers: [.apt(["zlib1g-dev"])]
        ),
        // Open MPI through pkg-config; without its headers the shim compiles to stubs that say so.
        .systemLibrary(
            name: "CMPI",
            path: "Sources/CMPI",
            pkgConfig: "ompi-c",
            providers: [.apt(["libopenmpi-dev"])]
        ),
        .target(name: "KappaMPI", dependencies: ["CMPI", "KappaNN"]),
        // Hot kernels in C, compiled per x86-64 level with target_clones and chosen at load time.
        .target(name: "CKappaKernels", path: "Sources/CKappaKernels"),
        .target(
            name: "Kappa",
            dependencies: ["CBLAS", "CKappaKernels", .product(name: "RealModule", package: "swift-numerics")]
        ),
        .target(name: "KappaNN", dependencies: ["Kappa"]),
        .target(name: "KappaSSL", dependencies: ["Kappa", "KappaNN", "CZlib"]),
        .executableTarget(name: "GradCheck", dependencies: ["Kappa"], path: "Examples/GradCheck"),
        .target(
            name: "KappaCommands",
            dependencies: ["Kappa", "KappaNN", "KappaSSL", "KappaMPI", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        .executableTarget(name: "DINOvMF", dependencies: ["KappaCommands"], path: "Examples/DINOvMF"),
        .executableTarget(name: "iBOTvMF", dependencies: ["KappaCommands"], path: "Examples/iBOTvMF"),
        .executableTarget(name: "KoLeo", dependencies: ["Kappa", "KappaNN", "KappaSSL", "KappaCommands",
                                                        .product(name: "ArgumentParser", package: "swift-argument-parser")],
                          path: "Examples/KoLeo"),
        .executableTarget(name: "Supervised", dependencies: ["Kappa", "KappaNN", "KappaSSL", "KappaCommands", .product(name: "ArgumentParser", package: "swift-argument-parser")],
                          path: "Examples/Supervised"),
        // Hostile-file testing of every reader, shared by the KappaFuzz command and the tests.
        .target(name: "KappaFuzzing", dependencies: ["Kappa", "KappaNN", "KappaSSL", "CZlib"]),
        .executableTarget(name: "KappaFuzz", dependencies: ["KappaFuzzing"], path: "Tools/KappaFuzz"),
        .executableTarget(name: "KappaBench", dependencies: ["Kappa", "KappaNN", "KappaSSL", "KappaCommands", "CBLAS", "CKappaKernels"], path: "Benchmarks/KappaBench"),
        .testTarget(name: "KappaTests", dependencies: ["Kappa", .product(name: "PropertyBased", package: "swift-property-based")],
                    exclude: ["torch_reference.json"]),
        .testTarget(name: "KappaNNTests", dependencies: ["Kappa", "KappaNN"]),
        .testTarget(name: "KappaSSLTests", dependencies: ["Kappa", "KappaNN", "KappaSSL", "KappaMPI", "KappaFuzzing", "KappaCommands"]),
    ],
    swiftLanguageModes: [.v5]
)
