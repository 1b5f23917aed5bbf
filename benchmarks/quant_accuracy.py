"""Accuracy and memory cost of every quantization format on SmolLM2-135M (and a random-weight model).

For each configuration: compile with llmc's quantization passes, then measure perplexity on fixed windows of
tinyshakespeare (runtime.evaluate.perplexity, the same windows for every configuration) and report the
relative increase over the unquantized model in the same run, the weight bytes, the KV bytes per token (and
as a share of a bf16 KV cache), how many tokens fit in a fixed KV memory budget (from the program's pool
allocator), compile time and what the accuracy guard did. The GGUF checkpoint is already 4-bit, so the
baseline is the dequantized GGUF weights in float32. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "tinyshakespeare.txt"
KV_BUDGET = 256 << 20  # bytes of KV pool for the "tokens that fit" column
HELD_OUT_FROM = 300_000  # --held-out-calibration: first character (the evaluation windows end far before it)

CONFIGS = {
    "base": {},
    "kv bf16": {"kv_cache_dtype": "bfloat16"},
    "kv fp8": {"kv_cache": "fp8"},
    "kv fp8 + rot": {"kv_cache": "fp8", "kv_rotation": True},
    "kv nvfp4": {"kv_cache": "nvfp4"},
    "kv nvfp4 + rot": {"kv_cache": "nvfp4", "kv_rotation": True},
    "kv nvfp4 + rot + score": {"kv_cache": "nvfp4", "kv_rotation": True, "kv_rounding": "score"},
    "w int8": {"weights": "int8"},
    "w fp8 (W8A8)": {"weights": "fp8"},
    "w int4 rtn": {"weights": "int4", "quant_method": "rtn"},
    "w int4 gptq": {"weights": "int4", "quant_method": "gptq"},
    "w nvfp4 rtn": {"weights": "nvfp4", "quant_method": "rtn"},
    "w nvfp4 gptq": {"weights": "nvfp4", "quant_method": "gptq"},
    "w int4 gptq + guard 1%": {"weights": "int4", "quant_method": "gptq", "max_ppl_increase": 0.01},
    "w nvfp4 gptq + kv nvfp4 rot + guard 1%": {"weights": "nvfp4", "kv_cache": "nvfp4", "kv_rotation": True,
                                              "max_ppl_increase": 0.01},
}


def random_model(num_layers: int):
    """SmolLM2-135M's architecture with random weights (fewer layers), and the SmolLM2 tokenizer."""
    from flax import nnx

    from lowering.checkpoints import load_checkpoint
    from lowering.models import llama

    ckpt = load_checkpoint("smollm2-135m", progress=False)
    cfg = ckpt.config.__class__(**{**ckpt.config.to_json(), "num_layers": num_layers})
    return llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), ckpt.tokenizer, cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="registry name / checkpoint, or 'random'")
    parser.add_argument("--random-layers", type=int, default=8, help="layers of the random-weight model")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--held-out-calibration", action="store_true",
                        help="calibrate on 16 x 256 tokens of tinyshakespeare from character 300,000 on (past every "
                             "evaluation window) instead of llmc's bundled calibration text")
    parser.add_argument("--json", default=str(ROOT / "bench_results" / "quant_accuracy.json"))
    args = parser.parse_args(argv)

    from lowering import compile_model
    from runtime.evaluate import memory_report, perplexity

    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}")
    if "base" not in names:
        names.insert(0, "base")
    text = DATA.read_text()
    if args.model == "random":
        model, tokenizer, cfg = random_model(args.random_layers)
        source = dict(source=model, tokenizer=tokenizer, config=cfg)
    else:
        source = dict(source=args.model)
    rows = []
    base_ppl = None
    bf16_kv = None
    for name in names:
        kw = dict(CONFIGS[name])
        kw.setdefault("max_ppl_increase", None)  # raw cost of the format unless the config asks for the guard
        if args.held_out_calibration and name != "base":
            kw.update(calibration=text[HELD_OUT_FROM:HELD_OUT_FROM + 100_000], calibration_windows=16,
                      calibration_window=256)
        start = time.perf_counter()
        cm = compile_model(source["source"], tokenizer=source.get("tokenizer"), config=source.get("config"),
                           progress=False, dtype="float32", **kw)
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        result = perplexity(cm, text, window=args.window, num_windows=args.windows)
        eval_s = time.perf_counter() - start
        mem = memory_report(cm)
        program = cm.make_program(kv_cache_bytes=KV_BUDGET, max_num_seqs=1 << 20, max_model_len=args.window)
        if name == "base":
            base_ppl = result.ppl
            bf16_kv = mem["kv_bytes_per_token"] / 2  # the f32 pools at 2 bytes per value
        report = cm.quant_report.to_json() if cm.quant_report is not None else None
        rows.append({
            "config": name, "options": {k: v for k, v in kw.items() if k != "calibration"}, "ppl": result.ppl,
            "ppl_increase": result.ppl / base_ppl - 1,
            "weight_bytes": mem["weight_bytes"], "kv_bytes_per_token": mem["kv_bytes_per_token"],
            "kv_vs_bf16": mem["kv_bytes_per_token"] / bf16_kv,
            "tokens_in_kv_budget": program.num_blocks * program.block_size,
            "compile_s": compile_s, "eval_s": eval_s,
            "kept": report["kept"] if report else [], "calibration_increase": report["measured_increase"] if report else None,
            "weights_plan": ({f: list(report["weights"].values()).count(f) for f in set(report["weights"].values())}
                             if report else None),
        })
        r = rows[-1]
        print(f"{name:<40s} ppl {r['ppl']:9.4f} {r['ppl_increase']:+8.3%}  kv {r['kv_bytes_per_token']:8.0f} B/tok "
              f"({r['kv_vs_bf16']:6.1%} of bf16)  weights {r['weight_bytes'] / 2**20:7.1f} MiB  "
              f"compile {compile_s:6.1f} s", file=sys.stderr, flush=True)
        del program

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    out = {"date": datetime.date.today().isoformat(), "commit": commit, "machine": platform.processor() or platform.machine(),
           "model": args.model, "text": "tinyshakespeare.txt", "windows": args.windows, "window": args.window,
           "kv_budget_bytes": KV_BUDGET, "rows": rows,
           "calibration": "held-out tinyshakespeare" if args.held_out_calibration else "bundled"}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"\n{args.model}: perplexity on {args.windows} x {args.window} tokens of tinyshakespeare "
          f"(base ppl {base_ppl:.4f}); KV budget {KV_BUDGET >> 20} MiB")
    print("| config | ppl | increase | weights MiB | KV B/token | KV vs bf16 | tokens in budget | kept | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['ppl']:.4f} | {r['ppl_increase']:+.3%} | {r['weight_bytes'] / 2**20:.1f} | "
              f"{r['kv_bytes_per_token']:.0f} | {r['kv_vs_bf16']:.1%} | {r['tokens_in_kv_budget']} | {len(r['kept'])} | "
              f"{r['compile_s']:.0f} |")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
