"""End-to-end decode on one GPU: llmc target="cuda" vs Hugging Face transformers, same model, same run.

Model: Llama-3.2-1B-shaped (16 layers, hidden 2048, 32/8 heads, d=64, vocab 128256, tied embeddings)
with random bf16 weights, saved as a safetensors checkpoint and compiled by llmc from that directory.
Workload: `batch` prompts of 128 random tokens, 128 new tokens each, greedy, EOS ignored.

Each system runs generate() twice per batch size: with 1 new token (prefill) and with 128; decode
throughput = batch x 127 / (time(128) - time(1)), so prefill is excluded the same way for everyone.
Peers: HF `generate` eager (dynamic cache) and HF with a static cache + torch.compile
("reduce-overhead", CUDA graphs). The batch-1 roofline is weight bytes / the device-to-device copy rate,
measured at the start of the run (bytes read + bytes written per second; 3.0 TB/s on the H100 of 2026-11-26).
`--quant int4 nvfp4 ...` adds llmc variants compiled with weights=<format> (RTN
through the quantization passes, every linear and the logits weight, no accuracy guard: random weights
have no accuracy to guard); every llmc variant also times a prefill of the largest batch.
Prints a table, writes JSON to $OUT/gpu_decode.json (else bench_results/).

    PYTHONPATH=. python3 benchmarks/gpu_decode.py [--batch 1 64] [--peers eager static] [--quant int4 nvfp4]
        [--ablate-fusion] [--ablate-async] [--ablate-pdl] [--profile]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

COPY_TBPS_H100 = 3.0  # device-to-device copy rate measured on the H100 (2026-11-26)


def copy_tbps(nbytes: int = 2 << 30, repeats: int = 20) -> float:
    """Device-to-device copy rate of this GPU, (read + written bytes) / s, median of repeats."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times) / 1e12
LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                   rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                   bos_token_id=128000, eos_token_id=128001)


def make_checkpoint(path: Path, layers: int | None):
    import transformers

    cfg = dict(LLAMA_32_1B)
    if layers:
        cfg["num_hidden_layers"] = layers
    config = transformers.LlamaConfig(**cfg)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    return model.eval(), config


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def decode_rate(run, batch, new_tokens, repeats):
    """tokens/s of the decode phase: (time of new_tokens) - (time of 1 token)."""
    run(1), run(new_tokens)  # warm-up (compilation, graph capture)
    t1 = timed(lambda: run(1), repeats)
    tn = timed(lambda: run(new_tokens), repeats)
    return batch * (new_tokens - 1) / (tn - t1), t1, tn


def profile_program(program, batches, context):
    """Per decode step: CUDA-graph replay alone (GPU time, events), step_greedy (+ host work), kernel table."""
    from runtime.step import StepInput

    out = {}
    width = -(-(context + 1) // program.block_size)
    for batch in batches:
        tables = (np.arange(batch * width, dtype=np.int32).reshape(batch, width) + 1) % program.num_blocks
        inp = StepInput(token_ids=np.full(batch, 7, np.int32), positions=np.full(batch, context, np.int32),
                        slot_mapping=tables[:, -1] * program.block_size + context % program.block_size,
                        query_start=np.arange(batch + 1, dtype=np.int32),
                        seq_lens=np.full(batch, context + 1, np.int32), block_tables=tables,
                        logit_rows=np.arange(batch, dtype=np.int32))
        for _ in range(3):
            program.step_greedy(inp)
        graph = next(v[0] for key, v in sorted(program._graphs.items()) if key[0] >= batch and key[1] == 1)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        gpu_ms = start.elapsed_time(end) / 50
        t = time.perf_counter()
        for _ in range(50):
            program.step_greedy(inp)
        wall_ms = (time.perf_counter() - t) / 50 * 1e3
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            program.cuda_graphs, saved = False, program.cuda_graphs
            program.step_greedy(inp)
            torch.cuda.synchronize()
            program.cuda_graphs = saved
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
        print(f"profile batch {batch}: graph replay {gpu_ms:.3f} ms GPU, step_greedy {wall_ms:.3f} ms wall\n{table}")
        out[f"b{batch}"] = {"graph_replay_ms": gpu_ms, "step_greedy_ms": wall_ms}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--peers", nargs="*", default=["eager", "static"])
    ap.add_argument("--quant", nargs="*", default=[], help="weight quantization schemes to add (int8 int4 nvfp4 fp8)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (smoke runs)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="split a decode step into GPU time and host time")
    ap.add_argument("--ablate-fusion", action="store_true",
                    help="also time llmc bf16 at batch <= 4 with the decode fusions (GEMV, rope+kv_write) off, "
                         "and each --quant variant without its fused quantized GEMVs (same engine)")
    ap.add_argument("--ablate-async", action="store_true",
                    help="also time llmc bf16 with async scheduling off (each step waits for the last one's tokens; "
                         "same engine)")
    ap.add_argument("--ablate-pdl", action="store_true",
                    help="also time each llmc variant at batch <= 4 with programmatic dependent launch of the fused "
                         "GEMVs (bf16 and quantized) off (same engine, graphs captured again)")
    args = ap.parse_args()

    from lowering import compile_model
    from runtime import Engine, SamplingParams

    tmp = Path(tempfile.mkdtemp(prefix="llmc_bench_"))
    t0 = time.perf_counter()
    hf, config = make_checkpoint(tmp / "ckpt", args.layers)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())  # tied embedding counted once
    tbps = copy_tbps()
    roofline = tbps * 1e12 / weight_bytes  # tokens/s at batch 1
    print(f"{torch.cuda.get_device_name()}: copy {tbps:.2f} TB/s (H100: {COPY_TBPS_H100})")
    print(f"checkpoint: {weight_bytes / 1e9:.2f} GB of bf16 weights, batch-1 roofline {roofline:.0f} tok/s "
          f"({time.perf_counter() - t0:.0f} s to build)", flush=True)

    rng = np.random.default_rng(0)
    max_batch = max(args.batch)
    prompts = rng.integers(10, config.vocab_size - 10, size=(max_batch, args.prompt_len)).tolist()
    results = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
               "torch": torch.__version__, "weight_bytes": weight_bytes, "copy_tbps": tbps, "roofline_batch1_tok_s": roofline,
               "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "runs": {}}
    rows = []

    def record(system, batch, rate, t1, tn, extra=None):
        results["runs"][f"{system}/b{batch}"] = {"tok_s": rate, "prefill_s": t1, "total_s": tn, **(extra or {})}
        rows.append((system, batch, rate, t1, tn))
        print(f"  {system:28s} batch {batch:3d}: {rate:9.1f} tok/s decode  (1 token {t1 * 1e3:.1f} ms, "
              f"{args.new_tokens} tokens {tn * 1e3:.0f} ms)", flush=True)

    # ---- llmc ----------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    cm = compile_model(str(tmp / "ckpt"), target="cuda", progress=False, max_model_len=1024)
    print(f"llmc compile: {time.perf_counter() - t0:.1f} s", flush=True)
    variants = [("llmc bf16", None)] + [(f"llmc w-{q}", q) for q in args.quant]
    llmc_tokens = {}

    def bench_variant(name, quant):
        model = cm
        if quant:  # the quantization passes (RTN, every linear; the logits weight too), no accuracy guard
            t0 = time.perf_counter()
            model = compile_model(str(tmp / "ckpt"), target="cuda", progress=False, max_model_len=1024,
                                  weights={"*": quant, "lm_head": quant}, quant_method="rtn", max_ppl_increase=None)
            print(f"llmc compile {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        # a fixed pool (every sequence's blocks + spare) so each variant gets the same one, whatever is left
        blocks = max_batch * -(-(args.prompt_len + args.new_tokens + 16) // 16) + 64
        # no prefix caching: repeated runs of the same prompts must prefill again (as they do for HF)
        engine = Engine(model, max_num_seqs=max_batch, max_num_batched_tokens=max_batch * args.prompt_len,
                        max_model_len=1024, num_blocks=blocks, enable_prefix_caching=False)
        engine.program.capture_decode_graphs()

        def generate(batch, n):
            return engine.generate(prompts[:batch], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))

        for batch in args.batch:
            rate, t1, tn = decode_rate(lambda n, batch=batch: generate(batch, n), batch, args.new_tokens, args.repeats)
            llmc_tokens[(name, batch)] = [o.token_ids for o in generate(batch, args.new_tokens)]
            extra = {"graph_replays": engine.program.num_graph_replays}
            if batch == 1:
                extra["roofline_fraction"] = rate / roofline
            record(name, batch, rate, t1, tn, extra)

        def ablation(label, batches, what, *, recapture):
            """Time the engine as the caller changed it, `label` in the table, against the default's tokens."""
            if recapture:  # what a decode step runs changed: capture its graphs again
                engine.program.drop_decode_graphs()
                engine.program.capture_decode_graphs()
            for batch in batches:
                rate, t1, tn = decode_rate(lambda n, batch=batch: generate(batch, n), batch, args.new_tokens,
                                           args.repeats)
                same = [o.token_ids for o in generate(batch, args.new_tokens)] == llmc_tokens[(name, batch)]
                extra = {f"same_tokens_as_{what.replace(' ', '_')}": same}
                if batch == 1:
                    extra["roofline_fraction"] = rate / roofline
                record(label, batch, rate, t1, tn, extra)
                print(f"    same greedy tokens as with {what}: {same}", flush=True)
            if args.profile and recapture:
                results[f"profile/{label}"] = profile_program(engine.program, batches, args.prompt_len)

        small = [b for b in args.batch if b <= 4]
        if name == "llmc bf16" and args.ablate_async:  # the same engine, each step waiting for the last one's tokens
            engine.async_scheduling = False
            ablation("llmc bf16, sync scheduling", args.batch, "async scheduling", recapture=False)
            engine.async_scheduling = True
        if args.ablate_pdl:  # the fused GEMVs (bf16 and quantized) launched plainly
            from kernels_gpu import fused_gemv

            fused_gemv.USE_PDL = False
            ablation(f"{name}, no PDL", small, "PDL", recapture=True)
            fused_gemv.USE_PDL = True
        if name == "llmc bf16" and args.ablate_fusion:  # the same steps with the decode fusions off
            engine.program.fused_gemv = engine.program.fused_rope_kv_write = False
            ablation("llmc bf16, no decode fusions", small, "the fusion", recapture=True)
            engine.program.fused_gemv = engine.program.fused_rope_kv_write = True
        if quant and args.ablate_fusion:  # one-row steps through the norm / SwiGLU kernels and quant_linear's GEMV
            engine.program.fused_gemv = False  # (split-K: memset + atomics + copy), as before kernels_gpu.fused_qgemv
            ablation(f"{name}, no fused quantized GEMVs", small, "the fused quantized GEMVs", recapture=True)
            engine.program.fused_gemv = True
        if args.ablate_pdl or args.ablate_fusion:  # back to the default's graphs
            engine.program.drop_decode_graphs()
            engine.program.capture_decode_graphs()
        batch = max(args.batch)

        def prefill():
            return engine.generate(prompts[:batch], SamplingParams(max_tokens=1, temperature=0.0))

        prefill()
        t_prefill = timed(prefill, args.repeats)
        results["runs"][f"{name} prefill/b{batch}"] = {"prefill_s": t_prefill}
        print(f"  {name}: prefill of {batch} x {args.prompt_len} tokens + 1 token {t_prefill * 1e3:.1f} ms", flush=True)
        if name == "llmc bf16":  # A/B: the same prefill through the unified paged kernel instead of the prefill kernel
            engine.program.prefill_fast_path = False
            prefill()  # warm-up: the paged kernel's prefill tiles compile on first use
            t_paged = timed(prefill, args.repeats)
            engine.program.prefill_fast_path = True
            prefill()
            t_fast = timed(prefill, args.repeats)
            results["runs"][f"llmc prefill A/B/b{batch}"] = {"prefill_kernel_s": t_fast, "paged_kernel_s": t_paged}
            print(f"  prefill of {batch} x {args.prompt_len} tokens + 1 token: prefill kernel {t_fast * 1e3:.1f} ms, "
                  f"paged kernel {t_paged * 1e3:.1f} ms", flush=True)
        if args.profile:
            results["profile/" + name] = profile_program(engine.program, args.batch, args.prompt_len)

    for name, quant in variants:
        bench_variant(name, quant)
        gc.collect()  # the engine's KV pool and graphs must go before the next variant sizes its pool
        torch.cuda.empty_cache()

    # ---- Hugging Face peers ---------------------------------------------------------------------------
    hf_tokens = {}
    for peer in args.peers:
        model = hf
        # "static": a StaticCache, which makes transformers' generate torch.compile the decoding forward
        # itself (CompileConfig defaults: mode "reduce-overhead", i.e. with CUDA graphs)
        model.generation_config.cache_implementation = "static" if peer == "static" else None
        for batch in args.batch:
            ids = torch.tensor(prompts[:batch], device="cuda")

            def run(n, ids=ids, model=model):
                with torch.inference_mode():
                    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                          do_sample=False, pad_token_id=0)

            try:
                rate, t1, tn = decode_rate(run, batch, args.new_tokens, args.repeats)
            except Exception as e:  # a peer that fails is reported, not fatal
                print(f"  HF {peer} batch {batch}: failed: {e!r}"[:400])
                results["runs"][f"HF {peer}/b{batch}"] = {"error": repr(e)[:400]}
                continue
            out = run(args.new_tokens)[:, args.prompt_len:].tolist()
            hf_tokens[(peer, batch)] = out
            record(f"HF {peer}", batch, rate, t1, tn)

    # same greedy tokens? (bf16 kernels differ in rounding, so report the share of identical prefixes)
    for (peer, batch), toks in hf_tokens.items():
        ours = llmc_tokens.get(("llmc bf16", batch))
        if ours:
            agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(ours, toks)]
            results["runs"][f"HF {peer}/b{batch}"]["first_divergence_median"] = statistics.median(agree)

    print("\n| system | batch | decode tok/s | vs HF static | vs HF eager | prefill+1 token ms | note |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for system, batch, rate, t1, tn in rows:
        static = next((r[2] for r in rows if r[0] == "HF static" and r[1] == batch), None)
        eager = next((r[2] for r in rows if r[0] == "HF eager" and r[1] == batch), None)
        note = f"{rate / roofline:.0%} of roofline" if batch == 1 else ""
        bf16 = next((r for r in rows if r[0] == "llmc bf16" and r[1] == batch), None)
        if bf16 and system.startswith("llmc w-"):
            note += f" decode {rate / bf16[2]:.2f}x, prefill {bf16[3] / t1:.2f}x llmc bf16"
        vs = " | ".join(f"{rate / peer:.2f}x" if peer else "" for peer in (static, eager))
        print(f"| {system} | {batch} | {rate:.0f} | {vs} | {t1 * 1e3:.1f} | {note.strip()} |")
    out_dir = Path(os.environ.get("OUT") or "bench_results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_decode.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
