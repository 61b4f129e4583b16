"""llama.cpp baseline for `prompt-salience bench`: prefill and greedy decoding on the same GGUF.

Times what `prompt-salience bench` times for generation: a 100-token prompt (the same text,
tokenized by the model's own tokenizer), then N greedy tokens, one at a time, past any
end-of-sequence token, with the same number of threads. `bench --baseline-python PY` runs this
script itself and prints the ratio; by hand:

    python3 -m pip install llama-cpp-python   # builds llama.cpp from source: ~15 min on 2 cores

On a Xeon with AMX (Sapphire Rapids), the default native build of 0.3.36 crashed in `eval`
(segmentation fault in its AMX path). Built without AMX, with every other native feature, it
runs; this is the build the README's figures on that CPU used:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
      -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON \
      -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON" python3 -m pip install llama-cpp-python==0.3.36
    python3 docs/bench/llama_cpp_baseline.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf

The last line of output is JSON: {"prefill_seconds", "decode_tokens_per_second", ...}.
"""

import argparse
import json
import time

import numpy as np
from llama_cpp import Llama, __version__

TEXT = (
    "The quick brown fox jumps over the lazy dog while the committee reviews "
    "the quarterly budget, and every number must add up before Friday. "
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--generate-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    llm = Llama(
        model_path=args.gguf,
        n_ctx=args.prompt_tokens + args.generate_tokens + 8,
        n_batch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        logits_all=False,
        verbose=False,
    )
    pool = llm.tokenize((TEXT * 20).encode(), add_bos=False, special=False)
    prompt = pool[: args.prompt_tokens]
    best_prefill, best_rate = float("inf"), 0.0
    for attempt in range(args.repeat + 1):  # the first run warms up
        # A fresh prompt each time, so no cached prefix flatters the figure.
        prompt = [prompt[1]] + prompt[1:] if attempt % 2 else prompt
        llm.reset()
        llm._ctx.kv_cache_clear()
        t = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(args.generate_tokens - 1):
            next_id = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([next_id])
        rate = (args.generate_tokens - 1) / (time.perf_counter() - t)
        if attempt > 0:
            best_prefill = min(best_prefill, prefill)
            best_rate = max(best_rate, rate)
    print(
        f"llama-cpp-python {__version__}, threads {args.threads}: prefill {args.prompt_tokens} "
        f"tokens {best_prefill:.3f} s, decode {best_rate:.1f} tokens/s (best of {args.repeat})"
    )
    print(
        json.dumps(
            {
                "baseline": "llama.cpp",
                "version": __version__,
                "threads": args.threads,
                "prompt_tokens": args.prompt_tokens,
                "prefill_seconds": best_prefill,
                "decode_tokens_per_second": best_rate,
            }
        )
    )


if __name__ == "__main__":
    main()
