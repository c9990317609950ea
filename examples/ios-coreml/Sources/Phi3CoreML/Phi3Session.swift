// Loads a package written by `phi3 export-coreml` with swift-transformers and generates from a chat prompt.
// The export follows swift-transformers' stateful LanguageModel interface (toolkit/coreml/swift_transformers.py),
// so no feature names, masks or KV-cache handling appear here: LanguageModel owns them.
import CoreML
import Foundation
import Generation
import Models
import Tokenizers

public enum Phi3Error: Error, CustomStringConvertible {
    case notStateful
    case promptTooLong(tokens: Int, context: Int)

    public var description: String {
        switch self {
        case .notStateful:
            return "the package has no keyCache/valueCache states: export it with `phi3 export-coreml`"
        case let .promptTooLong(tokens, context):
            return "the prompt has \(tokens) tokens; the package's context is \(context)"
        }
    }
}

public final class Phi3Session {
    public let model: LanguageModel
    public let tokenizer: Tokenizer

    /// `packageURL`: the .mlpackage (compiled here) or an .mlmodelc (e.g. compiled by Xcode into the app
    /// bundle). The tokenizer files `phi3 export-coreml` writes are read from `tokenizerFolder`, by default the
    /// package's folder, so nothing is fetched from the Hub.
    public init(packageURL: URL, tokenizerFolder: URL? = nil, computeUnits: MLComputeUnits = .cpuAndGPU) async throws {
        var compiled = packageURL
        if packageURL.pathExtension != "mlmodelc" {
            compiled = try await MLModel.compileModel(at: packageURL)
        }
        let folder = tokenizerFolder ?? packageURL.deletingLastPathComponent()
        tokenizer = try await AutoTokenizer.from(modelFolder: folder)
        // a flexible query length usually keeps Core ML off the Neural Engine: CPU and GPU is the honest choice
        model = try LanguageModel.loadCompiled(url: compiled, computeUnits: computeUnits, tokenizer: tokenizer)
        guard model is LanguageModelWithStatefulKVCache else { throw Phi3Error.notStateful }
    }

    /// Greedy when `temperature` is 0, else sampling with temperature / top-k / top-p.
    public func generationConfig(maxNewTokens: Int, temperature: Float, topK: Int, topP: Float) -> GenerationConfig {
        var config = GenerationConfig(maxNewTokens: maxNewTokens)
        config.doSample = temperature > 0
        if config.doSample {
            config.temperature = temperature
            config.topK = topK
            config.topP = topP
        }
        // generation stops on this one id: the export makes it the chat turn end (<|end|> for Phi-3)
        config.eosTokenId = tokenizer.eosTokenId
        config.bosTokenId = tokenizer.bosTokenId
        return config
    }

    /// Prompt tokens: the chat template from tokenizer_config.json around one user message, or the raw text.
    public func promptTokens(_ text: String, chat: Bool) throws -> [Int] {
        if chat && tokenizer.hasChatTemplate {
            return try tokenizer.applyChatTemplate(messages: [["role": "user", "content": text]])
        }
        return tokenizer.encode(text: text)
    }

    /// Generates a reply to `prompt`, handing each new piece of text to `onText` as it is decoded.
    public func reply(
        to prompt: String,
        chat: Bool = true,
        config baseConfig: GenerationConfig,
        onText: @escaping (String) -> Void
    ) async throws -> String {
        let tokens = try promptTokens(prompt, chat: chat)
        let context = model.maxContextLength
        guard tokens.count < context else { throw Phi3Error.promptTooLong(tokens: tokens.count, context: context) }
        var config = baseConfig
        // the loop stops at maxLength total tokens; keep it inside the KV cache the package was exported with
        config.maxLength = min(context, tokens.count + config.maxNewTokens)

        var stream = StreamingText(tokenizer: tokenizer, promptLength: tokens.count)
        await model.resetState()  // a fresh KV cache; generate(config:tokens:) does not reset it itself
        let output = try await model.generate(config: config, tokens: tokens) { all in
            let piece = stream.next(all)
            if !piece.isEmpty { onText(piece) }
        }
        return tokenizer.decode(tokens: Array(output.dropFirst(tokens.count)), skipSpecialTokens: true)
    }
}

/// Streaming detokenization: the callback gets every token so far; decode the generated part and emit only
/// what is new, holding text back while it ends in an incomplete UTF-8 character (U+FFFD).
struct StreamingText {
    let tokenizer: Tokenizer
    let promptLength: Int
    private var emitted = ""

    init(tokenizer: Tokenizer, promptLength: Int) {
        self.tokenizer = tokenizer
        self.promptLength = promptLength
    }

    mutating func next(_ all: [Int]) -> String {
        let text = tokenizer.decode(tokens: Array(all.dropFirst(promptLength)), skipSpecialTokens: true)
        guard !text.hasSuffix("\u{FFFD}"), text.hasPrefix(emitted), text.count > emitted.count else { return "" }
        let piece = String(text.dropFirst(emitted.count))
        emitted = text
        return piece
    }
}
