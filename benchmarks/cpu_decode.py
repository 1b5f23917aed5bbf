"""CPU decode throughput of SmolLM2-135M: llmc (CPU target) vs Hugging Face transformers eager, same run.

For each batch size: the same prompts (MT-Bench questions, chat template), greedy, a fixed number of
new tokens (EOS ignored). Reports end-to-end generated tokens/s (prefill included) and the decode-only
rate from the time of the first new token on. jit compilation is excluded: one warm-up run first;
the timed runs alternate llmc and HF so drift in machine speed affects both; medians are reported.
Two llmc variants run the same weight values as HF: "llmc" (the GGUF dequantized to float32, as HF
loads it) and "llmc gguf" (compile_model(weights="gguf"): the file's own Q4_1 / Q8_0 blocks, multiplied
by the CPU backend's native kernel). Prefix caching is off, so every run prefills like HF's.
Prints a table and writes JSON (default bench_results/cpu_decode.json).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mt_bench_questions.jsonl"


def load_prompts(count: int) -> list[str]:
    if DATA.exists():
        rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
        return [r["turns"][0] for r in rows[:count]]
    return [f"Write a short story about a robot number {i}." for i in range(count)]


def llmc_runner(model, prompts, new_tokens):
    """A function that runs one timed generate() and returns (total tok/s, decode tok/s, ids)."""
    from runtime import Engine, SamplingParams

    # no prefix caching: every timed run prefills its prompts again, as HF does
    engine = Engine(model, max_model_len=1024, max_num_seqs=len(prompts), max_num_batched_tokens=2048,
                    enable_prefix_caching=False)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    def run():
        first = {}
        start = time.perf_counter()
        outs = engine.generate(prompts, params, chat=True,
                               on_token=lambda rid, _t: first.setdefault(rid, time.perf_counter()))
        end = time.perf_counter()
        assert all(len(o.token_ids) == new_tokens for o in outs)
        # decode-only: from the moment every prompt has its first token to the end
        return (len(prompts) * new_tokens / (end - start),
                len(prompts) * (new_tokens - 1) / (end - max(first.values())), outs[0].token_ids)

    return run


def hf_runner(model, tok, prompts, new_tokens):
    """Same for Hugging Face generate() (eager, dynamic cache, left-padded batch)."""
    import torch
    import transformers

    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)

    def run():
        clock = _FirstLogits()
        with torch.no_grad():
            start = time.perf_counter()
            out = model.generate(**enc, **kwargs, logits_processor=transformers.LogitsProcessorList([clock]))
            end = time.perf_counter()
        return (len(prompts) * new_tokens / (end - start), len(prompts) * (new_tokens - 1) / (end - clock.first),
                out[0, enc["input_ids"].shape[1]:].tolist())

    return run


class _FirstLogits:
    """A logits processor that notes when the first logits (end of prefill) arrive; changes nothing."""

    def __init__(self):
        self.first = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = time.perf_counter()
        return scores


VARIANTS = {  # name -> compile_model keyword arguments
    "llmc": {},  # the GGUF dequantized to float32, as HF loads it
    "llmc gguf": {"weights": "gguf"},  # the GGUF's own Q4_1 / Q8_0 blocks: the same weight values, 5-8.5 bits each
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="llmc variants: " + ", ".join(VARIANTS))
    parser.add_argument("--out", default="bench_results/cpu_decode.json")
    args = parser.parse_args()

    import torch
    import transformers

    from lowering import compile_model
    from lowering.checkpoints import resolve_model

    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    gguf = resolve_model(args.model)
    compiled = {name: compile_model(str(gguf), target="cpu", progress=False, **VARIANTS[name]) for name in names}
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                           torch_dtype=torch.float32).eval()
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = load_prompts(batch)
        runners = {name: llmc_runner(cm, prompts, args.new_tokens) for name, cm in compiled.items()}
        runners["hf"] = hf_runner(hf, tok, prompts, args.new_tokens)
        results = {name: [] for name in runners}
        for name, run in runners.items():  # warm-up: jit compilation, allocator, caches
            run()
        for _ in range(args.repeats):  # alternate A B C A B C so drift in machine speed hits all
            for name, run in runners.items():
                results[name].append(run())
        med = {name: (float(np.median([r[0] for r in rs])), float(np.median([r[1] for r in rs])), rs[-1][2])
               for name, rs in results.items()}
        h_total, h_decode, h_ids = med["hf"]
        for name in names:
            l_total, l_decode, l_ids = med[name]
            rows.append({"batch": batch, "system": name, "new_tokens": args.new_tokens, "llmc_tok_s": l_total,
                         "hf_eager_tok_s": h_total, "speedup": l_total / h_total, "llmc_decode_tok_s": l_decode,
                         "hf_eager_decode_tok_s": h_decode, "decode_speedup": l_decode / h_decode,
                         "first_prompt_tokens_match": l_ids == h_ids})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"benchmark": "cpu_decode", "date": datetime.date.today().isoformat(), "commit": commit,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "transformers": transformers.__version__, "dtype": "float32", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nSmolLM2-135M on the CPU ({result['machine']}), {args.new_tokens} new tokens, greedy; "
          "HF eager float32 on the dequantized GGUF")
    print(f"{'batch':>5} {'system':>10} {'tok/s':>8} {'HF tok/s':>9} {'speedup':>8} {'decode':>8} {'HF decode':>10} "
          f"{'dec. speedup':>12} {'same tokens':>12}")
    for r in rows:
        print(f"{r['batch']:>5} {r['system']:>10} {r['llmc_tok_s']:>8.1f} {r['hf_eager_tok_s']:>9.1f} {r['speedup']:>7.2f}x "
              f"{r['llmc_decode_tok_s']:>8.1f} {r['hf_eager_decode_tok_s']:>10.1f} {r['decode_speedup']:>11.2f}x "
              f"{str(r['first_prompt_tokens_match']):>12}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
