"""Serving under open-loop load: llmc's OpenAI server vs a plain Hugging Face loop serving one request at a time.

Requests arrive as a Poisson process (`--rate` per second) with chat prompts from
../shared/data/mt_bench_questions.jsonl and output lengths drawn uniformly from
[--min-tokens, --max-tokens] (EOS ignored so every request produces its drawn length). Each system
sees the same arrival times, prompts and lengths.

- llmc: `llmc serve`'s app (AsyncEngine + FastAPI) on loopback, requests streamed with httpx; TTFT is
  first content chunk - send time, TPOT = (last - first token) / (tokens - 1). The workload runs
  --warm-runs times unrecorded first (they compile the CPU target's step-shape buckets, seconds each;
  a long-running server reaches that steady state), then once measured.
- HF: transformers `generate` (eager, greedy) for one request at a time in arrival order, a token
  streamer timing each token; queueing time counts toward TTFT, as it would for a server.

A second part measures prefix caching: a request sharing a 512-token prefix with an earlier one,
TTFT with the cache on and off (skipped when the engine has no `enable_prefix_caching`).

Prints a table, writes JSON to bench_results/serve_bench.json (or $OUT).

    .venv/bin/python benchmarks/serve_bench.py --requests 32 --rate 2
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mt_bench_questions.jsonl"


def load_prompts(count: int) -> list[str]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()] if DATA.exists() else []
    prompts = [r["turns"][0] for r in rows] or [f"Write a short story about a robot number {i}." for i in range(80)]
    return [prompts[i % len(prompts)] for i in range(count)]


def workload(args):
    rng = np.random.default_rng(args.seed)
    arrivals = np.cumsum(rng.exponential(1.0 / args.rate, size=args.requests))
    lengths = rng.integers(args.min_tokens, args.max_tokens + 1, size=args.requests)
    return list(zip(arrivals.tolist(), load_prompts(args.requests), lengths.tolist()))


def percentiles(xs):
    if not xs:
        return {"p50": None, "p99": None, "mean": None}
    return {"p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99)), "mean": statistics.fmean(xs)}


def summarize(records, makespan):
    tokens = sum(r["tokens"] for r in records)
    return {"requests": len(records), "output_tokens": tokens, "makespan_s": makespan,
            "throughput_tok_s": tokens / makespan, "requests_per_s": len(records) / makespan,
            "ttft_s": percentiles([r["ttft"] for r in records]),
            "tpot_s": percentiles([r["tpot"] for r in records if r["tpot"] is not None]),
            "latency_s": percentiles([r["latency"] for r in records])}


# ---- llmc ---------------------------------------------------------------------------------------------


def run_llmc(model, jobs, args):
    import httpx

    from runtime import Engine
    from runtime.async_engine import AsyncEngine
    from runtime.server import BackgroundServer

    engine = Engine(model, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                    max_num_batched_tokens=args.max_num_batched_tokens)
    server = BackgroundServer(AsyncEngine(engine), model_name="toy")
    try:
        async def one(client, t0, arrival, prompt, n):
            await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
            sent = time.perf_counter()
            body = {"model": "toy", "messages": [{"role": "user", "content": prompt}], "max_tokens": n,
                    "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            first = last = None
            count = 0
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        count = chunk["usage"]["completion_tokens"]
                    elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        last = time.perf_counter()
                        first = first or last
            end = time.perf_counter()
            first = first or end
            return {"ttft": first - sent, "tpot": (last - first) / (count - 1) if count > 1 and last else None,
                    "latency": end - sent, "tokens": count}

        async def main():
            limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
            async with httpx.AsyncClient(base_url=server.url, timeout=3600, limits=limits) as client:
                t0 = time.perf_counter()
                records = await asyncio.gather(*(one(client, t0, *job) for job in jobs))
                return records, time.perf_counter() - t0

        # warm-up: the CPU target compiles one XLA program per step-shape bucket on first use (seconds
        # each), so the same workload runs once unrecorded and the second run is measured
        asyncio.run(_warm(server.url, args))
        for _ in range(args.warm_runs):
            asyncio.run(main())
        before = _num_compiled(engine.program)
        records, makespan = asyncio.run(main())
        out = summarize(records, makespan)
        out["compiled_step_shapes"] = _num_compiled(engine.program)
        out["compiled_during_measured_run"] = (out["compiled_step_shapes"] - before) if before is not None else None
        return out
    finally:
        server.stop()


def _num_compiled(program):
    from lowering.backends.cpu import jit_cache_size

    size = jit_cache_size(getattr(program, "_step", None))
    return size if size >= 0 else None


async def _warm(url, args):
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        body = {"model": "toy", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
        await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(min(8, args.requests))))


# ---- Hugging Face, one request at a time -----------------------------------------------------------------


def run_hf(gguf_path, jobs, args):
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    tok = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                              torch_dtype=torch.float32).eval()

    class Clock(BaseStreamer):
        def __init__(self):
            self.times, self.calls = [], 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:  # the first call carries the prompt
                self.times.append(time.perf_counter())

        def end(self):
            pass

    def generate(prompt, n, streamer=None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer,
                           pad_token_id=tok.eos_token_id)

    generate("Hello", 4)  # warm-up
    records = []
    t0 = time.perf_counter()
    for arrival, prompt, n in jobs:  # one at a time, in arrival order
        now = time.perf_counter()
        if now < t0 + arrival:
            time.sleep(t0 + arrival - now)
        clock = Clock()
        generate(prompt, n, clock)
        sent = t0 + arrival
        first, last = clock.times[0], clock.times[-1]
        records.append({"ttft": first - sent, "tpot": (last - first) / (len(clock.times) - 1) if len(clock.times) > 1
                        else None, "latency": last - sent, "tokens": len(clock.times)})
    return summarize(records, time.perf_counter() - t0)


# ---- prefix caching ----------------------------------------------------------------------------------


def run_prefix(model, args):
    """TTFT of a request whose first 512 tokens repeat an earlier request's, with the prefix cache on / off."""
    import inspect

    from runtime import Engine, SamplingParams

    if "enable_prefix_caching" not in inspect.signature(Engine.__init__).parameters:
        return None
    tokenizer = model.tokenizer
    shakespeare = DATA.parent / "tinyshakespeare.txt"
    text = shakespeare.read_text()[:20000] if shakespeare.exists() else "word " * 4000
    prefix = tokenizer.encode(text, add_special_tokens=False)[:512]
    out = {}
    for enabled in (False, True):
        engine = Engine(model, max_model_len=1024, max_num_batched_tokens=1024, enable_prefix_caching=enabled)
        params = SamplingParams(max_tokens=1, temperature=0.0)
        engine.generate([prefix + tokenizer.encode(" First question?", add_special_tokens=False)], params)
        times = []
        for i in range(3):
            t = time.perf_counter()
            engine.generate([prefix + tokenizer.encode(f" Question {i}?", add_special_tokens=False)], params)
            times.append(time.perf_counter() - t)
        out["on" if enabled else "off"] = statistics.median(times)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rate", type=float, default=2.0, help="mean arrivals per second (Poisson)")
    ap.add_argument("--min-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warm-runs", type=int, default=2, help="unrecorded runs of the workload before the measured one")
    ap.add_argument("--systems", nargs="+", default=["llmc", "hf"])
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024, help="chunked-prefill token budget per step")
    args = ap.parse_args()

    from lowering import compile_model
    from lowering.checkpoints import resolve_model

    gguf = resolve_model("smollm2-135m")
    jobs = workload(args)
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "args": vars(args), "systems": {}}
    model = compile_model(str(gguf), target="cpu", progress=False)
    if "llmc" in args.systems:
        results["systems"]["llmc"] = run_llmc(model, jobs, args)
    if "hf" in args.systems:
        results["systems"]["hf_one_at_a_time"] = run_hf(gguf, jobs, args)
    results["prefix_cache_ttft_s"] = run_prefix(model, args)

    print(f"\n{args.requests} requests, Poisson {args.rate}/s, {args.min_tokens}-{args.max_tokens} new tokens, "
          "SmolLM2-135M fp32 on the CPU")
    print("| system | tok/s | req/s | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | latency p50 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results["systems"].items():
        ms = lambda d, k: f"{d[k] * 1e3:.0f} ms" if d[k] is not None else "-"  # noqa: E731
        print(f"| {name} | {r['throughput_tok_s']:.1f} | {r['requests_per_s']:.2f} | {ms(r['ttft_s'], 'p50')} | "
              f"{ms(r['ttft_s'], 'p99')} | {ms(r['tpot_s'], 'p50')} | {ms(r['tpot_s'], 'p99')} | "
              f"{ms(r['latency_s'], 'p50')} |")
        if r.get("compiled_during_measured_run"):
            print(f"  ({name}: {r['compiled_during_measured_run']} step shapes compiled during the measured run)")
    prefix = results["prefix_cache_ttft_s"]
    if prefix:
        print(f"prefix cache, 512 shared tokens: TTFT {prefix['off'] * 1e3:.0f} ms off -> {prefix['on'] * 1e3:.0f} ms on")
    out_dir = Path(os.environ.get("OUT") or Path(__file__).resolve().parents[1] / "bench_results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serve_bench.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
