// swift-tools-version: 6.0
// Phi3CoreML: a library (Phi3Session: load an export, generate with streaming) for iOS 18 / macOS 15 apps, and
// phi3-coreml, a command-line generator on top of it (macOS 15).
import PackageDescription

let package = Package(
    name: "Phi3CoreML",
    platforms: [.macOS(.v15), .iOS(.v18)],  // stateful Core ML models and MLTensor need these
    products: [
        .library(name: "Phi3CoreML", targets: ["Phi3CoreML"]),
        .executable(name: "phi3-coreml", targets: ["phi3-coreml"]),
    ],
    dependencies: [
        // Pinned: the release whose LanguageModel / Generation sources toolkit/coreml/swift_transformers.py
        // was written against (1.3.3 = commit 2fa33e1f5e7131a7fc64c28e6d161dcec0d24820).
        .package(url: "https://github.com/huggingface/swift-transformers", exact: "1.3.3")
    ],
    targets: [
        .target(
            name: "Phi3CoreML",
            dependencies: [.product(name: "Transformers", package: "swift-transformers")]
        ),
        .executableTarget(name: "phi3-coreml", dependencies: ["Phi3CoreML"]),
    ],
    swiftLanguageModes: [.v5]  // the streaming callback mutates captured state; fine outside Swift 6 mode
)
