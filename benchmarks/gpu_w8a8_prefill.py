"""W8A8 (fp8 weights and activations) prefill vs our bf16 prefill, one GPU, same run, program level.

Model: the Llama-3.2-1B-shaped checkpoint of benchmarks/gpu_decode.py (random bf16 weights), compiled bf16 and
with weights={"*": "fp8", "lm_head": "fp8"} (RTN; the quantization passes make every linear W8A8: fp8 weights with
per-channel scales, activations quantized per token). Each prefill is one eager step of the CUDA program
(`program.step_greedy` on a StepInput of fresh prompts, logits of each prompt's last token): 64 x 128, 8 x 1024 and
1 x 4096 tokens. Variants:
  bf16            the bf16 program
  fp8             W8A8 as compiled: the norms and the SwiGLU write fp8 rows and their scales for the GEMM
                  (kernels_gpu.norms.add_rms_norm_fp8, kernels_gpu.activations.silu_and_mul_fp8), torch._scaled_mm
                  (row-wise scales, fast accumulation: quant_linear.SCALED_MM_FAST_ACCUM, the default) for the GEMMs
  fp8 accurate    the same with SCALED_MM_FAST_ACCUM off (fp8 MMAs promoted to f32 periodically)
  fp8 unfused     program.fused_act_quant off: bf16 rows stored, then quant_linear's activation quantizer
Columns: wall time of the step (host launches included: these steps run eagerly, ~200 launches), CUDA-event time,
and the sum of the step's kernel times (torch profiler): the device time, what the step costs when the host keeps
ahead of the GPU. Every fp8 step's greedy tokens are compared with the bf16 program's (random weights: most agree).
--breakdown also prints each variant's ten dearest kernels (device time) at the first shape.

Prints a table last; writes JSON to $OUT/gpu_w8a8_prefill.json (or ./bench_results/).
    PYTHONPATH=. python3 benchmarks/gpu_w8a8_prefill.py [--shapes 64x128 8x1024 1x4096] [--repeats 7]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def prefill_input(program, batch: int, plen: int):
    """Fresh prompts of plen tokens for batch sequences, each on its own blocks; logits of each last token."""
    from runtime.step import StepInput

    width = -(-plen // program.block_size)
    tables = np.arange(batch * width, dtype=np.int32).reshape(batch, width)
    pos = np.tile(np.arange(plen, dtype=np.int32), batch)
    slots = (tables[np.repeat(np.arange(batch), plen), pos // program.block_size] * program.block_size
             + pos % program.block_size).astype(np.int32)
    rng = np.random.default_rng(batch * 7919 + plen)
    return StepInput(token_ids=rng.integers(10, 120000, batch * plen).astype(np.int32), positions=pos,
                     slot_mapping=slots, query_start=(np.arange(batch + 1) * plen).astype(np.int32),
                     seq_lens=np.full(batch, plen, np.int32), block_tables=tables,
                     logit_rows=(np.arange(batch) * plen + plen - 1).astype(np.int32))


def time_step(program, inp, repeats: int):
    """(median wall ms, median CUDA-event ms, kernel-sum ms, greedy tokens) of one prefill step."""
    for _ in range(2):
        program.step_greedy(inp)
    torch.cuda.synchronize()
    walls, events = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t = time.perf_counter()
        start.record()
        tokens = program.step_greedy(inp)
        end.record()
        end.synchronize()
        walls.append((time.perf_counter() - t) * 1e3)
        events.append(start.elapsed_time(end))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        program.step_greedy(inp)
        torch.cuda.synchronize()
    kernels = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    return statistics.median(walls), statistics.median(events), kernels, np.asarray(tokens)


def kernel_table(program, inp, top: int = 10):
    """[(kernel name, device ms, calls)] of one step, dearest first."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        program.step_greedy(inp)
        torch.cuda.synchronize()
    rows = [(e.key[:90], e.self_device_time_total / 1e3, e.count) for e in prof.key_averages()
            if e.self_device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])[:top]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["64x128", "8x1024", "1x4096"], help="BATCHxPROMPT_LEN")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (smoke runs)")
    ap.add_argument("--breakdown", action="store_true", help="print the dearest kernels of each variant (first shape)")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]

    from benchmarks.gpu_decode import make_checkpoint
    from kernels_gpu import quant_linear as ql
    from lowering import compile_model

    tmp = Path(tempfile.mkdtemp(prefix="llmc_w8a8_"))
    hf, _ = make_checkpoint(tmp / "ckpt", args.layers)
    del hf
    torch.cuda.empty_cache()
    max_len = max(plen for _, plen in shapes)
    blocks = max(batch * -(-plen // 16) for batch, plen in shapes) + 16
    results = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "rows": []}
    rows, bf16_tokens, breakdown = [], {}, {}
    for quant in (None, "fp8"):
        kw = {} if quant is None else dict(weights={"*": quant, "lm_head": quant}, quant_method="rtn",
                                           max_ppl_increase=None)
        cm = compile_model(str(tmp / "ckpt"), target="cuda", progress=False, max_model_len=max_len, **kw)
        program = cm.make_program(num_blocks=blocks, max_num_seqs=max(b for b, _ in shapes), max_model_len=max_len)
        variants = [("bf16", False, True)] if quant is None else \
            [("fp8", True, True), ("fp8 accurate", False, True), ("fp8 unfused", True, False)]
        for label, fast, fused in variants:
            ql.SCALED_MM_FAST_ACCUM = fast
            program.fused_act_quant = fused
            for batch, plen in shapes:
                inp = prefill_input(program, batch, plen)
                wall, event, kernels, tokens = time_step(program, inp, args.repeats)
                if args.breakdown and (batch, plen) == shapes[0]:
                    breakdown[label] = kernel_table(program, inp)
                shape = f"{batch}x{plen}"
                if quant is None:
                    bf16_tokens[shape] = tokens
                agree = float(np.mean(tokens == bf16_tokens[shape]))
                rows.append({"variant": label, "shape": shape, "wall_ms": wall, "event_ms": event,
                             "kernel_ms": kernels, "tokens_agree_with_bf16": agree})
                print(f"  {label:15s} {shape:8s} wall {wall:7.2f} ms  events {event:7.2f} ms  kernels {kernels:7.2f} ms"
                      f"  greedy tokens = bf16's: {agree:.0%}", flush=True)
        del cm, program
        torch.cuda.empty_cache()
    ql.SCALED_MM_FAST_ACCUM = True
    results["rows"] = rows
    out_dir = Path(os.environ.get("OUT") or "bench_results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_w8a8_prefill.json").write_text(json.dumps(results, indent=2))
    for label, table in breakdown.items():
        print(f"\n{label}, {args.shapes[0]}: dearest kernels (ms of device time, calls)")
        for name, ms, calls in table:
            print(f"  {ms:7.3f} {calls:4d}  {name}")
    base = {r["shape"]: r for r in rows if r["variant"] == "bf16"}
    print(f"\n{results['device']}, torch {results['torch']}")
    print("| variant | prefill | wall ms | vs bf16 | kernel ms (device time) | vs bf16 |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        b = base[r["shape"]]
        print(f"| {r['variant']} | {r['shape']} | {r['wall_ms']:.2f} | {b['wall_ms'] / r['wall_ms']:.2f}x | "
              f"{r['kernel_ms']:.2f} | {b['kernel_ms'] / r['kernel_ms']:.2f}x |")


if __name__ == "__main__":
    main()
