"""Speculative decoding on SmolLM2-135M (CPU target): acceptance and speed-up of each proposer, same run.

Batch 1 (default): held-out prompts — the last GSM8K train questions and the even-numbered MT-Bench
questions (draft heads train on the first GSM8K lines and the odd ones) — run one request at a time,
greedy, EOS ignored, `--max-tokens` new tokens each. For each method the same prompts run without
speculation and with it, in alternating order (machine drift hits both), after a warm-up that compiles
every step shape; the table shows the share of outputs token-identical to the target alone, generated tokens/s, the
speed-up, the acceptance rate (accepted / drafted tokens), the mean accepted length (tokens emitted per
verification, bonus included) and the mean draft length the controller chose.

`--batch N` (e.g. 64) runs N prompts together instead, speculation off vs adaptive vs fixed length: the
adaptive controller must not be slower than off by more than 5% (issue 7).

Methods: ngram (prompt lookup); draft (SmolLM2 truncated to its first `--draft-layers` layers);
medusa / eagle (heads trained by `llmc train-draft`, given with --medusa-heads / --eagle-heads).
Prints a table and writes JSON (default bench_results/spec_decode.json).
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

DATA = Path(os.environ.get("LLMC_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


def held_out_prompts(per_set: int, data: Path = DATA) -> list[tuple[str, str]]:
    """(dataset, question) pairs: the last GSM8K train questions, the even-numbered MT-Bench questions."""
    gsm = [json.loads(x)["question"] for x in (data / "gsm8k_train.jsonl").read_text().splitlines() if x.strip()]
    mt = [json.loads(x) for x in (data / "mt_bench_questions.jsonl").read_text().splitlines() if x.strip()]
    mt = [r["turns"][0] for r in mt if r["question_id"] % 2 == 0]
    return [("gsm8k", q) for q in gsm[-per_set:]] + [("mt_bench", q) for q in mt[:per_set]]


def build(args):
    from lowering import Speculative, compile_model

    kw = dict(target=args.target, progress=False)
    if args.weights:
        kw["weights"] = args.weights
    methods = {}
    for m in args.methods.split(","):
        if m == "ngram":
            methods[m] = Speculative("ngram", num_tokens=args.num_tokens, adaptive=args.adaptive)
        elif m == "draft":
            draft = compile_model(args.model, num_layers=args.draft_layers, **kw)
            methods[m] = Speculative("draft", num_tokens=args.num_tokens, adaptive=args.adaptive, draft=draft)
        elif m in ("medusa", "eagle"):
            heads = getattr(args, f"{m}_heads")
            if heads is None:
                print(f"skipping {m}: pass --{m}-heads DIR (from `llmc train-draft --method {m}`)")
                continue
            methods[m] = Speculative(m, num_tokens=args.num_tokens, adaptive=args.adaptive, heads=heads)
        else:
            raise SystemExit(f"unknown method {m}")
    needs_hidden = any(s.needs_hidden for s in methods.values())
    # one target graph for all methods: with the hidden-state output when a head method runs (it costs nothing
    # for the others); each engine gets its Speculative
    target = compile_model(args.model, speculative=next((s for s in methods.values() if s.needs_hidden), None),
                           **kw) if needs_hidden else compile_model(args.model, **kw)
    return target, methods


def _agreement(on_ids, off_ids) -> dict:
    """How far speculative outputs equal the target's own: the share of identical outputs and the mean share of
    each output before the first difference. (float32 on the CPU: identical; in bfloat16 a verification row is
    computed in a matmul of another shape than a decode row, and a near-tie can round the other way.)"""
    prefix = []
    for a, b in zip(on_ids, off_ids):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(len(b), 1))
    return {"identical": sum(a == b for a, b in zip(on_ids, off_ids)) / len(off_ids),
            "common_prefix": sum(prefix) / len(prefix)}


def run_batch1(engine, prompts, params):
    tokens, start = 0, time.perf_counter()
    outs = []
    for p in prompts:
        o = engine.generate([p], params, chat=True)[0]
        outs.append(o.token_ids)
        tokens += len(o.token_ids)
    return tokens / (time.perf_counter() - start), outs


def run_batch(engine, prompts, params):
    start = time.perf_counter()
    outs = engine.generate(prompts, params, chat=True)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start), [o.token_ids for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="registry name or checkpoint path")
    ap.add_argument("--target", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--weights", default=None, help="compile_model weights= (e.g. gguf: the native Q4_1 kernel)")
    ap.add_argument("--methods", default="ngram,draft,medusa,eagle")
    ap.add_argument("--num-tokens", type=int, default=4, help="the longest draft (k)")
    ap.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--both", action="store_true", help="run each method adaptive and with a fixed draft length")
    ap.add_argument("--spec-on-device", default="auto", choices=["auto", "off", "both"],
                    help="n-gram: drafts, verification and the accept rule on the device where the Program can "
                         "(Engine(spec_on_device=)); off: host drafts between synchronous steps; both: each")
    ap.add_argument("--draft-layers", type=int, default=6)
    ap.add_argument("--medusa-heads", default=None)
    ap.add_argument("--eagle-heads", default=None)
    ap.add_argument("--prompts", type=int, default=6, help="prompts per dataset (batch 1)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--batch", type=int, default=1, help="1: one request at a time; N: N prompts together")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--num-blocks", type=int, default=None, help="KV blocks of each engine's pool (default: enough "
                    "for the batch)")
    ap.add_argument("--fused-gemv-rows", type=int, default=None,
                    help="CUDA: steps of at most this many rows run the fused norm / SwiGLU + GEMV kernels (the "
                         "program's default otherwise)")
    ap.add_argument("--dot-gemv-rows", type=int, default=None,
                    help="CUDA: steps of 2 to this many rows run their small-K linears through the tensor-core GEMV "
                         "(0: cuBLAS; the program's default otherwise)")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "bench_results"), "spec_decode.json"))
    args = ap.parse_args()

    from runtime import Engine, SamplingParams

    target, methods = build(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    # every engine prefills every run (no prefix caching) and owns a fixed pool (several CUDA programs coexist)
    engine_kw = dict(max_model_len=1024, max_num_seqs=max(args.batch, 1), max_num_batched_tokens=2048,
                     enable_prefix_caching=False,
                     num_blocks=args.num_blocks or max(args.batch, 2) * (1024 // 16 + 1))
    if args.batch == 1:
        pairs = held_out_prompts(args.prompts)
        prompts = [q for _, q in pairs]
        run = run_batch1
    else:
        pairs = held_out_prompts(-(-args.batch // 2))[: args.batch]
        prompts = [q for _, q in pairs]
        run = run_batch
    # warm-up runs over the same prompts compile every step shape (XLA on the CPU; Triton kernels and CUDA graphs
    # on the GPU), which would otherwise dominate short runs; --repeats N keeps the best of N timed runs
    warm = prompts
    base = Engine(target, speculative=False, **engine_kw)

    def configure(engine):
        if args.fused_gemv_rows is not None or args.dot_gemv_rows is not None:
            if args.fused_gemv_rows is not None:
                engine.program.fused_gemv_rows = args.fused_gemv_rows
            if args.dot_gemv_rows is not None:
                engine.program.dot_gemv_rows = args.dot_gemv_rows
            engine.program.drop_decode_graphs()
        return engine

    configure(base)
    run(base, warm, params)
    rows, results = [], {}
    variants = {}  # each method with the adaptive controller and with a fixed draft length
    for name, spec in methods.items():
        for adaptive in ([True, False] if args.both else [args.adaptive]):
            label = f"{name} adaptive" if adaptive else f"{name} k={spec.num_tokens}"
            spec_k = spec.__class__(**{**spec.__dict__, "adaptive": adaptive})
            if name != "ngram" or args.spec_on_device == "auto":
                variants[label] = (spec_k, None)
            else:
                if args.spec_on_device == "both":
                    variants[label + " device"] = (spec_k, None)
                variants[label + " host"] = (spec_k, False)
    for name, (spec, on_device) in variants.items():
        engine = configure(Engine(target, speculative=spec, spec_on_device=on_device, **engine_kw))
        run(engine, warm, params)  # warm-up: compiles the verification shapes, trains the controller
        engine.spec_stats.__init__(method=spec.method)
        off_rates, on_rates = [], []
        for _ in range(args.repeats):
            off_rate, off_ids = run(base, prompts, params)
            on_rate, on_ids = run(engine, prompts, params)
            off_rates.append(off_rate)
            on_rates.append(on_rate)
            same = _agreement(on_ids, off_ids)
        s = engine.spec_stats
        off, on = max(off_rates), max(on_rates)
        ctl = engine.draft_controller
        # the costs the controller measured (seconds): target steps by row-count bucket, proposals by draft length
        device = {"spec_on_device": engine.spec_on_device, "device_iterations": engine.num_device_spec_iterations,
                  "device_bursts": engine.num_device_spec_bursts,
                  "device_iteration_cost_s": {f"b{b}q{q}": v for (b, q), v in engine._burst_cost.items()},
                  "device_tokens_per_s": {str(k): v for k, v in engine._burst_rate.items()}}
        results[name] = {"tok_s_off": off, "tok_s_on": on, "speedup": on / off, **s.to_json(), **same, **device,
                         "step_cost_s": {str(k): v for k, v in sorted(ctl.step_cost.items())},
                         "draft_cost_s": {str(k): v for k, v in sorted(ctl.draft_cost.items())}}
        rows.append((name, off, on, on / off, s.acceptance_rate, s.mean_accepted_length, s.mean_draft_length,
                     same["identical"]))
        per_set = {}
        if args.batch == 1:  # acceptance and speed per dataset, from a separate pass over each set
            for ds in ("gsm8k", "mt_bench"):
                subset = [q for d, q in pairs if d == ds]
                off_rate, _ = run(base, subset, params)
                engine.spec_stats.__init__(method=spec.method)
                on_rate, _ = run(engine, subset, params)
                per_set[ds] = {"acceptance_rate": engine.spec_stats.acceptance_rate,
                               "mean_accepted_length": engine.spec_stats.mean_accepted_length,
                               "tok_s_off": off_rate, "tok_s_on": on_rate, "speedup": on_rate / off_rate}
            results[name]["per_dataset"] = per_set

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    where = f"CPU ({os.cpu_count()} cores)" if args.target == "cpu" else _gpu_name()
    print(f"\nSmolLM2 speculative decoding, {where}, target={args.target}, batch {args.batch}, {len(prompts)} prompts, "
          f"{args.max_tokens} new tokens, k <= {args.num_tokens}, weights={args.weights or 'float32'}")
    print(f"{'method':<22s} {'off tok/s':>10s} {'on tok/s':>10s} {'speed-up':>9s} {'accept':>7s} {'mean len':>9s} "
          f"{'mean k':>7s} {'identical':>9s}")
    for name, off, on, sp, acc, mlen, mk, same in rows:
        print(f"{name:<22s} {off:10.1f} {on:10.1f} {sp:8.2f}x {acc:7.2f} {mlen:9.2f} {mk:7.2f} {same:9.2f}")
    for name, r in results.items():
        cost = r["step_cost_s"]
        if cost:
            print(f"  {name}: measured step ms by rows " + ", ".join(f"{k}:{v * 1e3:.2f}" for k, v in cost.items())
                  + "; proposal ms by k " + ", ".join(f"{k}:{v * 1e3:.2f}" for k, v in r["draft_cost_s"].items()))
        if r["device_iterations"]:
            print(f"  {name}: {r['device_iterations']} device iterations in {r['device_bursts']} bursts; ms per "
                  "iteration " + ", ".join(f"{k}:{v * 1e3:.3f}" for k, v in r["device_iteration_cost_s"].items())
                  + "; tokens/s a request by batch " + ", ".join(f"{k}:{v:.0f}" for k, v in
                                                                  r["device_tokens_per_s"].items()))
        if "per_dataset" in r:
            print(f"  {name}: " + ", ".join(f"{d} accept {v['acceptance_rate']:.2f} / mean len "
                                           f"{v['mean_accepted_length']:.2f} / speed-up {v['speedup']:.2f}x"
                                           for d, v in r["per_dataset"].items()))
    out = {"date": datetime.date.today().isoformat(), "commit": commit, "target": args.target,
           "machine": (platform.processor() or platform.machine()) if args.target == "cpu" else _gpu_name(),
           "cpu_count": os.cpu_count(), "args": vars(args), "results": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


if __name__ == "__main__":
    main()
