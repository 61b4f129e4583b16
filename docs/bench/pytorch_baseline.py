"""PyTorch baseline for `prompt-salience bench`: the same measurements with transformers.

Loads the same GGUF (dequantized to float32 by transformers), 2 threads, computes logits only
at the rows that predict the target (stronger than LIT's all-rows path), and times what
`prompt-salience bench` times: gradient salience (one forward + backward with respect to the
input embeddings, weights frozen) for prompts of N tokens plus a 20-token target, and integrated
gradients with a zero baseline and the midpoint rule, batched, plus the two forward passes
for the completeness gap that prompt-salience always reports. Run it on the same machine,
right after the bench, so that the two are compared on the same load (`prompt-salience bench
--baseline-python PY` runs this script itself and prints the ratios):

    python3 -m pip install torch transformers gguf accelerate
    python3 docs/bench/pytorch_baseline.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf

With `--serve` it loads the model, prints one JSON line, then times one piece of work for each
JSON line it reads (`{"method": "grad_dot_input", "prompt_tokens": 300}`) and answers with one
JSON line: the bench uses it to run each piece of work right before or after its own, so that
the machine's drifting speed (up to 1.9x within an hour on shared machines) moves both sides of
a ratio alike.
"""

import argparse
import json
import os
import resource
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXT = (
    "The quick brown fox jumps over the lazy dog while the committee reviews "
    "the quarterly budget, and every number must add up before Friday. "
)


def objective(model, embeds, prompt_len, target_ids):
    # Logits only at the rows that predict the target (LIT computes every row's logits: a
    # weaker baseline, 49,152 × prompt length values for nothing).
    hidden = model.model(inputs_embeds=embeds).last_hidden_state
    rows = hidden[:, prompt_len - 1 : prompt_len - 1 + target_ids.shape[1], :]
    logp = torch.log_softmax(model.lm_head(rows).float(), dim=-1)
    return logp.gather(-1, target_ids.expand(embeds.shape[0], -1).unsqueeze(-1)).sum(dim=(1, 2))


def grad_salience(model, table, ids, prompt_len, target_ids):
    e = table[ids].unsqueeze(0).clone().requires_grad_(True)
    f = objective(model, e, prompt_len, target_ids).sum()
    (g,) = torch.autograd.grad(f, e)
    return (g[0, :prompt_len] * e[0, :prompt_len]).sum(-1)


def integrated_gradients(model, table, ids, prompt_len, target_ids, steps, batch, completeness):
    e = table[ids]
    if completeness:
        # F at the input and at the baseline, one forward pass for both, as prompt-salience
        # does to report the completeness gap.
        ends = e.unsqueeze(0).repeat(2, 1, 1)
        ends[1, :prompt_len] = 0
        with torch.no_grad():
            objective(model, ends, prompt_len, target_ids)
    total = torch.zeros_like(e[:prompt_len])
    alphas = [(k + 0.5) / steps for k in range(steps)]
    for i in range(0, steps, batch):
        chunk = torch.tensor(alphas[i : i + batch]).view(-1, 1, 1)
        x = e.unsqueeze(0).repeat(len(chunk), 1, 1)
        x[:, :prompt_len] = x[:, :prompt_len] * chunk
        x = x.detach().requires_grad_(True)
        f = objective(model, x, prompt_len, target_ids).sum()
        (g,) = torch.autograd.grad(f, x)
        total += g[:, :prompt_len].sum(0)
    return (total / steps * e[:prompt_len]).sum(-1)


def best_of(repeat, fn):
    fn()  # warm-up, as the reference timings do
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--lengths", default="100,300,600")
    ap.add_argument("--ig-lengths", default="100,300")
    ap.add_argument("--ig-steps", type=int, default=8)
    ap.add_argument("--ig-batch", type=int, default=8)
    ap.add_argument(
        "--no-completeness",
        action="store_true",
        help="skip the two forward passes for F(input) and F(baseline) (prompt-salience always runs them)",
    )
    ap.add_argument("--target-tokens", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--serve",
        action="store_true",
        help="time one piece of work per JSON line read from stdin (see above)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder, name = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, torch_dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    table = model.get_input_embeddings().weight
    pool = tok(TEXT * 200, add_special_tokens=False)["input_ids"]
    t = args.target_tokens

    def measure(method, n):
        ids = torch.tensor(pool[: n + t])
        target = ids[n:].unsqueeze(0)
        if method == "grad_dot_input":
            s = best_of(args.repeat, lambda: grad_salience(model, table, ids, n, target))
            return {"method": method, "prompt_tokens": n, "seconds": s}
        if method == "integrated_gradients":
            s = best_of(
                args.repeat,
                lambda: integrated_gradients(
                    model,
                    table,
                    ids,
                    n,
                    target,
                    args.ig_steps,
                    args.ig_batch,
                    not args.no_completeness,
                ),
            )
            return {"method": method, "prompt_tokens": n, "steps": args.ig_steps, "seconds": s}
        raise ValueError(f"unknown method {method!r}")

    if args.serve:
        print(json.dumps({"baseline": "pytorch", "version": torch.__version__}), flush=True)
        for line in sys.stdin:
            try:
                work = json.loads(line)
                answer = measure(work["method"], int(work["prompt_tokens"]))
            except Exception as e:  # the bench shows why, and goes on with the next piece
                answer = {"error": f"{type(e).__name__}: {e}"}
            print(json.dumps(answer), flush=True)
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"| prompt tokens | method | seconds (best of {args.repeat}) |")
    print("|---|---|---|")
    results = []
    for n in [int(x) for x in args.lengths.split(",") if x]:
        r = measure("grad_dot_input", n)
        print(f"| {n} | grad_dot_input | {r['seconds']:.3f} |", flush=True)
        results.append(r)
    for n in [int(x) for x in args.ig_lengths.split(",") if x]:
        r = measure("integrated_gradients", n)
        print(f"| {n} | integrated_gradients ({args.ig_steps} steps) | {r['seconds']:.3f} |", flush=True)
        results.append(r)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {rss:.0f} MiB")
    print(json.dumps({"baseline": "pytorch", "version": torch.__version__, "results": results}))


if __name__ == "__main__":
    main()
