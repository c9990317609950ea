// Token-by-token generation with a package from `phi3 export-coreml` (iOS 18 / macOS 15, stateful Core ML).
// Dependencies: CoreML, and swift-transformers (https://github.com/huggingface/swift-transformers) for the
// tokenizer. The feature names below must match the package; tests/test_coreml_export.py checks them.
import CoreML
import Tokenizers

let inputIdsName = "input_ids"      // (1, q) int32: the whole prompt first, then one token per call
let causalMaskName = "causal_mask"  // (1, 1, q, past + q) fp16, additive: 0 = may attend, -inf = may not
let logitsName = "logits"           // (1, q, vocab) fp16
let keyCacheStateName = "keyCache"  // states: created by makeState(), updated in place by every prediction
let valueCacheStateName = "valueCache"

final class Phi3Generator {
    let model: MLModel
    let tokenizer: Tokenizer
    let context: Int          // the --context the package was exported with
    let slidingWindow: Int?   // config.json "sliding_window" (2047 for Phi-3-mini-4k), nil if none
    let eosTokenIds: Set<Int>

    init(modelURL: URL, tokenizerFolder: URL, context: Int, slidingWindow: Int?, eosTokenIds: Set<Int>) async throws {
        let config = MLModelConfiguration()
        config.computeUnits = .cpuAndGPU  // flexible query length: the GPU is the realistic target
        model = try await MLModel.load(contentsOf: modelURL, configuration: config)
        tokenizer = try await AutoTokenizer.from(modelFolder: tokenizerFolder)
        self.context = context
        self.slidingWindow = slidingWindow
        self.eosTokenIds = eosTokenIds
    }

    /// Query i (position past + i) may attend key j iff j <= past + i and past + i - j < slidingWindow (HF rule).
    func causalMask(past: Int, q: Int) throws -> MLMultiArray {
        let end = past + q
        let mask = try MLMultiArray(shape: [1, 1, NSNumber(value: q), NSNumber(value: end)], dataType: .float16)
        for i in 0..<q {
            for j in 0..<end {
                let pos = past + i
                var allowed = j <= pos
                if let w = slidingWindow { allowed = allowed && pos - j < w }
                mask[[0, 0, NSNumber(value: i), NSNumber(value: j)]] = NSNumber(value: allowed ? 0 : -Float.infinity)
            }
        }
        return mask
    }

    func generate(prompt: String, maxNewTokens: Int, onToken: (String) -> Void = { _ in }) async throws -> String {
        let state = model.makeState()  // a fresh, zeroed KV cache for this conversation
        var pending = tokenizer.encode(text: prompt)
        var past = 0
        var generated: [Int] = []
        while generated.count < maxNewTokens && past + pending.count <= context {
            let ids = try MLMultiArray(shape: [1, NSNumber(value: pending.count)], dataType: .int32)
            for (i, token) in pending.enumerated() { ids[i] = NSNumber(value: token) }
            let inputs = try MLDictionaryFeatureProvider(dictionary: [
                inputIdsName: MLFeatureValue(multiArray: ids),
                causalMaskName: MLFeatureValue(multiArray: try causalMask(past: past, q: pending.count)),
            ])
            let output = try await model.prediction(from: inputs, using: state)
            guard let logits = output.featureValue(for: logitsName)?.multiArrayValue else { break }
            let next = argmaxOfLastRow(MLShapedArray<Float16>(logits))  // greedy; sample here instead if wanted
            past += pending.count
            if eosTokenIds.contains(next) { break }
            generated.append(next)
            onToken(tokenizer.decode(tokens: [next]))
            pending = [next]
        }
        return tokenizer.decode(tokens: generated)
    }

    private func argmaxOfLastRow(_ logits: MLShapedArray<Float16>) -> Int {
        let q = logits.shape[1], vocab = logits.shape[2]
        let row = logits.scalars[((q - 1) * vocab)..<(q * vocab)]
        var best = row.startIndex
        for k in row.indices where row[k] > row[best] { best = k }
        return best - row.startIndex
    }
}
