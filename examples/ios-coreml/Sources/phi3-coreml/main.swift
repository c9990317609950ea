// phi3-coreml PACKAGE.mlpackage [PROMPT] [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--raw]
import CoreML
import Foundation
import Phi3CoreML

func option(_ name: String, in args: [String]) -> String? {
    guard let i = args.firstIndex(of: name), i + 1 < args.count else { return nil }
    return args[i + 1]
}

let args = Array(CommandLine.arguments.dropFirst())
let valueFlags: Set = ["--max-new-tokens", "--temperature", "--top-k", "--top-p"]
var positional: [String] = []
var skipNext = false
for arg in args {
    if skipNext { skipNext = false; continue }
    if valueFlags.contains(arg) { skipNext = true; continue }
    if !arg.hasPrefix("--") { positional.append(arg) }
}
guard let packagePath = positional.first else {
    FileHandle.standardError.write(Data("usage: phi3-coreml PACKAGE.mlpackage [PROMPT] [options]\n".utf8))
    exit(2)
}
let prompt = positional.count > 1 ? positional[1] : "What is the capital of France?"

do {
    let session = try await Phi3Session(packageURL: URL(fileURLWithPath: packagePath))
    let config = session.generationConfig(
        maxNewTokens: Int(option("--max-new-tokens", in: args) ?? "") ?? 128,
        temperature: Float(option("--temperature", in: args) ?? "") ?? 0,
        topK: Int(option("--top-k", in: args) ?? "") ?? 50,
        topP: Float(option("--top-p", in: args) ?? "") ?? 1.0
    )
    let start = Date()
    // the sampling and argmax around each prediction are small tensor ops: keep them on the CPU
    _ = try await withMLTensorComputePolicy(.cpuOnly) {
        try await session.reply(to: prompt, chat: !args.contains("--raw"), config: config) { piece in
            print(piece, terminator: "")
            fflush(stdout)
        }
    }
    print("\n(\(String(format: "%.1f", Date().timeIntervalSince(start))) s)")
} catch {
    FileHandle.standardError.write(Data("error: \(error)\n".utf8))
    exit(1)
}
