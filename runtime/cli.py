"""Command line: `llmc compile SOURCE -o OUT`, `llmc generate SOURCE --prompt TEXT`, `llmc serve SOURCE`,
`llmc train-draft SOURCE --method medusa|eagle -o HEADS_DIR`, `llmc train-router --data FILE.jsonl -o ROUTER.json`,
`llmc eval-router --weak SOURCE --strong SOURCE`."""
from __future__ import annotations

import argparse
import os
import sys

PROG = "llmc"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Compile LLM checkpoints and run them.")
    parser.add_argument("--version", action="version", version=f"{PROG} {get_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("compile", help="compile a checkpoint into an artifact directory")
    p.add_argument("source", metavar="SOURCE", help="registry name, checkpoint path (GGUF, safetensors dir, orbax dir)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="artifact directory to write")
    add_compile_arguments(p)
    p.add_argument("--quiet", action="store_true", help="print nothing while compiling")
    p.set_defaults(func=run_compile)

    p = sub.add_parser("generate", help="generate completions for prompts")
    add_source_argument(p)
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT", help="a prompt; repeat for a batch")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message via the chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="extend", nargs="+", default=None, metavar="S", help="stop strings")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--num-blocks", type=int, default=None, help="KV pool size in blocks (default: the program's)")
    add_compile_arguments(p)
    p.set_defaults(func=run_generate)

    p = sub.add_parser("serve", help="serve a model over the OpenAI HTTP API (/v1/completions, /v1/chat/completions)")
    p.add_argument("source", metavar="SOURCE", nargs="?", default=None,
                   help="artifact directory (has manifest.json) or anything `compile` accepts; omit with --router")
    p.add_argument("--router", default=None, metavar="CONFIG.json",
                   help="serve several models with a routing policy (\"model\": \"auto\"); the JSON names each "
                        "model's source and compile options, the default model, the policy and the costs "
                        "(see runtime/router.py load_router_config)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the model id clients send (default: SOURCE's name)")
    p.add_argument("--api-key", default=os.environ.get("LLMC_API_KEY"), help="require 'Authorization: Bearer KEY' "
                   "(default: $LLMC_API_KEY; none = open)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests computed together")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per step (chunked prefill)")
    p.add_argument("--max-pending", type=int, default=1024, help="requests in flight before answering 429")
    p.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                   help="each step waits for the last one's tokens (default: the next step is launched first where "
                        "the target supports it, target='cuda')")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--num-blocks", type=int, default=None, help="KV pool size in blocks (default: the program's)")
    add_compile_arguments(p)
    p.set_defaults(func=run_serve)

    p = sub.add_parser("eval", help="measure perplexity, GSM8K accuracy and memory of a model")
    add_source_argument(p)
    p.add_argument("--tasks", default="ppl,gsm8k", metavar="LIST",
                   help="comma-separated tasks: ppl, gsm8k (default: both; memory is always reported)")
    p.add_argument("--data", default=None, metavar="DIR", help="folder with tinyshakespeare.txt and "
                   "gsm8k_train.jsonl (default: $LLMC_DATA, else ../shared/data next to the llmc checkout)")
    p.add_argument("--ppl-windows", type=int, default=16, help="perplexity windows (default 16)")
    p.add_argument("--ppl-window", type=int, default=256, help="tokens per perplexity window (default 256)")
    p.add_argument("--gsm8k-problems", type=int, default=32, help="GSM8K problems (default 32)")
    p.add_argument("--gsm8k-shots", type=int, default=4, help="GSM8K few-shot exemplars (default 4)")
    p.add_argument("--max-tokens", type=int, default=256, help="GSM8K tokens to generate per problem")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the full result as JSON to OUT")
    g = p.add_argument_group("long context (--long): accuracy vs KV memory for each KV setting")
    g.add_argument("--long", action="store_true", help="instead of --tasks: long-window perplexity and needle "
                   "retrieval for each of --settings, compiled from SOURCE (a checkpoint or registry name)")
    g.add_argument("--settings", default=",".join(DEFAULT_LONG_SETTINGS), metavar="LIST",
                   help="comma-separated KV settings: full, h2o:<budget>[:<recent>], streaming:<sinks>:<window>"
                        "[:original], share:<pairs|auto> (default: %(default)s)")
    g.add_argument("--long-window", type=int, default=8192, help="tokens per perplexity window (default 8192)")
    g.add_argument("--long-windows", type=int, default=1, help="perplexity windows (default 1)")
    g.add_argument("--needle-context", type=int, default=4096,
                   help="prompt tokens of each needle trial (default 4096; 0 skips the needle test)")
    g.add_argument("--needle-depths", default="0.1,0.3,0.5,0.7,0.9", metavar="LIST",
                   help="where the needle sits in the prompt, fractions (default %(default)s)")
    g.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots of accuracy vs KV memory to DIR")
    add_compile_arguments(p)
    p.set_defaults(func=run_eval)

    p = sub.add_parser("train-draft", help="train Medusa heads or an EAGLE head for speculative decoding")
    p.add_argument("source", metavar="SOURCE", help="registry name or checkpoint path of the target model")
    p.add_argument("--method", required=True, choices=["medusa", "eagle"])
    p.add_argument("-o", "--output", required=True, metavar="HEADS_DIR", help="directory to write the heads to")
    p.add_argument("--num-heads", type=int, default=4, help="Medusa heads K (default 4)")
    p.add_argument("--prompts", type=int, default=48, help="GSM8K train prompts, lines [0:N) (default 48)")
    p.add_argument("--mt-bench-prompts", type=int, default=16,
                   help="MT-Bench first turns of odd question_id (default 16)")
    p.add_argument("--eval-prompts", type=int, default=12,
                   help="held-out prompts for the accuracy report: N GSM8K lines from the file's end and N/3 "
                        "even-id MT-Bench questions (default 12; 0 = no report)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per prompt (default 128)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the data (default: medusa 3, eagle 5)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="medusa: positions per step (default 256); eagle: sequences per step (default 4)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: medusa 1e-3, eagle 2e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, metavar="DIR", help="folder with gsm8k_train.jsonl and "
                   "mt_bench_questions.jsonl (default: $LLMC_DATA, else ../shared/data next to the llmc checkout)")
    p.add_argument("--generations", default=None, metavar="FILE.npz",
                   help="reuse the target's generations from this file when it matches, else write them there "
                        "(lets medusa and eagle training share one generation run)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests generated together (default 64)")
    p.add_argument("--mt-bench-samples", type=int, default=0,
                   help="also continue each MT-Bench training prompt N times with temperature 0.8 sampling (more "
                        "varied chat contexts; the heads still learn the target's greedy tokens) (default 0)")
    p.add_argument("--depth", type=int, default=3,
                   help="eagle: chain steps trained on the head's own predicted features, as drafting feeds them "
                        "(default 3; 1 = teacher forcing only)")
    p.add_argument("--target", default="cpu", choices=["cpu", "cuda", "tpu"],
                   help="compile target whose Program generates the training sequences and computes their "
                        "features (default cpu; cuda on a GPU machine: the bf16 features drafting will read); "
                        "training runs in JAX on its default device")
    p.add_argument("--quiet", action="store_true", help="print only the final summary")
    p.set_defaults(func=run_train_draft)

    p = sub.add_parser("train-router", help="train the task-routing classifier on labeled prompts")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help='one example a line: {"prompt": ..., "label": '
                   '...} or {"prompt": ..., "scores": {model: quality}} (labeled with the cheapest best model)')
    p.add_argument("-o", "--output", required=True, metavar="ROUTER.json", help="classifier file to write")
    p.add_argument("--labels", default=None, metavar="LIST", help="comma-separated route labels, cheapest model "
                   "first (required for 'scores' lines; default: the labels the file names, sorted)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of each label (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split (default 0)")
    p.add_argument("--epochs", type=int, default=100, help="L-BFGS iterations at most (default 100)")
    p.add_argument("--l2", type=float, default=1e-3, help="L2 penalty on the weights (default 1e-3)")
    p.add_argument("--balanced", action="store_true", help="weight classes inversely to their counts")
    p.set_defaults(func=run_train_router)

    p = sub.add_parser("eval-router", help="evaluate routing policies between a weak and a strong model "
                       "(APGR, CPT, cost at equal quality; RouteLLM's method)")
    p.add_argument("--weak", required=True, metavar="SOURCE", help="the cheap model: artifact dir or anything "
                   "`compile` accepts")
    p.add_argument("--strong", required=True, metavar="SOURCE", help="the expensive model")
    weight_formats = ["int8", "fp8", "int4", "nvfp4", "gguf"]
    p.add_argument("--weak-weights", default=None, choices=weight_formats, help="quantize the weak model's weights")
    p.add_argument("--strong-weights", default=None, choices=weight_formats,
                   help="quantize the strong model's weights")
    p.add_argument("--max-ppl-increase", default=None, type=_budget, metavar="X",
                   help="accuracy guard budget when quantizing (default: off, the format as is)")
    p.add_argument("--task", default="shakespeare", choices=["shakespeare", "gsm8k"],
                   help="shakespeare: next line of a play among 4; gsm8k: final answer among 4 (default shakespeare)")
    p.add_argument("--num-items", type=int, default=600, help="items scored by both models (default 600)")
    p.add_argument("--train-fraction", type=float, default=0.5,
                   help="share of items that train the task classifier; the rest are held out (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the items, the split and the classifier")
    p.add_argument("--data", default=None, metavar="DIR", help="folder with tinyshakespeare.txt and "
                   "gsm8k_train.jsonl (default: $LLMC_DATA, else ../shared/data next to the llmc checkout)")
    p.add_argument("--class-weight", default="balanced", choices=["balanced", "none"],
                   help="task classifier class weights (default balanced)")
    p.add_argument("--batch-items", type=int, default=8, help="items scored per step (default 8)")
    p.add_argument("--random-seeds", type=int, default=100, help="seeds of the random-routing baseline (default 100)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="keep each model's per-item scores and cost in DIR and reuse them when they match")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the full result as JSON to OUT")
    p.set_defaults(func=run_eval_router)
    return parser


def add_source_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="artifact directory (has manifest.json) or anything `compile` accepts")


def add_compile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="cpu", help="backend: cpu (default), cuda, tpu")
    p.add_argument("--block-size", type=int, default=None,
                   help="tokens per KV block (default 16; on a TPU the page its generation prefers)")
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16"], help="default: float32 on cpu, else bfloat16"
    )
    q = p.add_argument_group("quantization")
    q.add_argument("--weights", default=None, metavar="FMT",
                   help="quantize linear weights: int8, fp8 (W8A8), int4, nvfp4 (the logits weight stays unquantized); "
                        "gguf keeps a GGUF file's Q4_1/Q8_0 blocks as stored (cpu and tpu targets)")
    q.add_argument("--kv-cache", default=None, metavar="FMT", help="KV cache format: fp8 or nvfp4")
    q.add_argument("--kv-rotation", action="store_true", help="Hadamard-rotate K/V head dims before quantizing them")
    q.add_argument("--kv-rounding", default="nearest", choices=["nearest", "score"],
                   help="nvfp4 K codes: nearest (default) or score (minimize the calibration queries' score error; "
                        "a slower KV write)")
    q.add_argument("--quant-method", default="auto", choices=["auto", "rtn", "gptq"],
                   help="auto: GPTQ for int4/nvfp4, round-to-nearest otherwise")
    q.add_argument("--max-ppl-increase", default=0.01, type=_budget, metavar="X",
                   help="accuracy guard budget: relative perplexity increase on the calibration text (default "
                        "0.01 = 1%%; 'off' disables the guard)")
    q.add_argument("--calibration", default=None, metavar="TEXT_FILE",
                   help="calibration text file (default: llmc's bundled text)")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallelism: shard the model Megatron-style over N devices (cuda: one process per "
                        "GPU, NCCL; cpu / tpu: a JAX device mesh) (default 1)")
    p.add_argument("--kv-policy", default=None, type=_kv_policy, metavar="SPEC",
                   help="KV eviction: h2o:<budget>[:<recent>] (budget: a fraction of max_model_len like 0.2, or "
                        "tokens) or streaming:<sinks>:<window>[:original] (attention sinks + window)")
    p.add_argument("--share-kv-layers", default=None, type=_share_kv, metavar="SPEC",
                   help="cross-layer KV sharing (unquantized KV): 'auto' (as many of the most similar adjacent pairs of "
                        "the deeper half as --max-ppl-increase allows), N (the N most similar), or pairs '10-11,12-13'")


def _kv_policy(text: str):
    from runtime.long_context import parse_setting

    text = text.strip().lower()
    if text in ("off", "none", "full"):
        return None
    try:
        kw = parse_setting(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if "kv_policy" not in kw:
        raise argparse.ArgumentTypeError(f"expected h2o:<budget>[:<recent>] or streaming:<sinks>:<window>[:original], "
                                         f"got {text!r}")
    return kw["kv_policy"]


def _share_kv(text: str):
    text = text.strip().lower()
    if text in ("auto", "off", "none"):
        return None if text != "auto" else "auto"
    try:
        if "-" not in text:
            return int(text)
        return [[int(x) for x in pair.split("-")] for pair in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'auto', a number of pairs or pairs like '10-11,12-13', got {text!r}") from None


def _budget(text: str):
    if text.strip().lower() in ("off", "none"):
        return None
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 or 'off', got {text}")
    return value


def compile_kwargs(args: argparse.Namespace) -> dict:
    """compile_model keyword arguments from the compile options every command takes."""
    if args.calibration is not None and not os.path.isfile(args.calibration):
        raise ValueError(f"--calibration {args.calibration!r} is not a file")
    return dict(target=args.target, block_size=args.block_size, dtype=args.dtype, weights=args.weights,
                kv_cache=args.kv_cache, kv_rotation=args.kv_rotation,
                kv_rounding=getattr(args, "kv_rounding", "nearest"), quant_method=args.quant_method,
                max_ppl_increase=args.max_ppl_increase, tensor_parallel=getattr(args, "tp", 1),
                **({} if getattr(args, "share_kv_layers", None) is None else {"share_kv_layers": args.share_kv_layers}),
                **({} if getattr(args, "kv_policy", None) is None else {"kv_policy": args.kv_policy}),
                calibration=open(args.calibration, encoding="utf-8").read() if args.calibration else None)


def get_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmc")
    except PackageNotFoundError:
        return "unknown"


def run_compile(args: argparse.Namespace) -> int:
    from lowering import compile_model

    cm = compile_model(args.source, verbose=not args.quiet, progress=not args.quiet, **compile_kwargs(args))
    cm.export(args.output)
    if not args.quiet:
        print(f"wrote {args.output}")
    return 0


def load_or_compile(args: argparse.Namespace):
    from runtime import load_if_artifact

    quantization = [flag for flag, value in (("--weights", args.weights), ("--kv-cache", args.kv_cache),
                                             ("--kv-rotation", args.kv_rotation),
                                             ("--kv-rounding", getattr(args, "kv_rounding", "nearest") != "nearest"))
                    if value]
    model = load_if_artifact(args.source, set_options=quantization, tensor_parallel=getattr(args, "tp", 1))
    if model is not None:
        return model
    from lowering import compile_model

    return compile_model(args.source, verbose=False, **compile_kwargs(args))


def run_serve(args: argparse.Namespace) -> int:
    from runtime import Engine
    from runtime.async_engine import AsyncEngine
    from runtime.server import serve_forever

    for name in ("max_num_seqs", "max_num_batched_tokens", "max_pending"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    engine_kwargs = dict(num_blocks=args.num_blocks, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                         max_num_batched_tokens=args.max_num_batched_tokens)
    if not args.async_scheduling:
        engine_kwargs["async_scheduling"] = False
    if args.router is not None:
        if args.source is not None:
            raise ValueError("give either SOURCE or --router, not both")
        if getattr(args, "tp", 1) != 1:
            raise ValueError("--tp applies to one model; with --router give each model its own \"tensor_parallel\"")
        async_engine = build_router(args.router, target=args.target, engine_kwargs=engine_kwargs,
                                    max_pending=args.max_pending)
        name = None
        served = f"models {sorted(async_engine.async_engines)} and {async_engine.name!r}"
    else:
        if args.source is None:
            raise ValueError("serve needs SOURCE (a model) or --router CONFIG.json (several)")
        engine = Engine(load_or_compile(args), **engine_kwargs)
        name = args.model_name or os.path.basename(os.path.normpath(args.source))
        async_engine = AsyncEngine(engine, max_pending=args.max_pending)
        served = repr(name)
        tp = getattr(engine.model, "tensor_parallel", 1)
        if tp > 1:
            served += f" tensor-parallel over {tp} devices"
    print(f"llmc: serving {served} on http://{args.host}:{args.port}/v1 "
          f"({'API key required' if args.api_key else 'no API key'})", file=sys.stderr)
    try:
        serve_forever(async_engine, model_name=name, host=args.host, port=args.port, api_key=args.api_key)
    finally:
        async_engine.shutdown()
    return 0


def build_router(path: str, *, target: str, engine_kwargs: dict, max_pending: int):
    """An AsyncRouter from a router config file: each model loaded (an artifact directory) or compiled (any
    other source, with the model's own compile options), its Engine and AsyncEngine, the policy, the costs."""
    from runtime import Engine, load_if_artifact
    from runtime.async_engine import AsyncEngine
    from runtime.router import AsyncRouter, load_router_config, policy_from_config

    config = load_router_config(path)
    async_engines = {}
    try:
        for name, spec in config["models"].items():
            options = {k: v for k, v in spec.items() if k not in ("source", "engine")}
            try:
                model = load_if_artifact(spec["source"], set_options=sorted(set(options) - {"tensor_parallel"}),
                                         tensor_parallel=options.get("tensor_parallel", 1))
            except ValueError as e:
                raise ValueError(f"router model {name!r}: {e}") from None
            if model is None:
                from lowering import compile_model

                model = compile_model(spec["source"], **({"target": target, "verbose": False} | options))
            engine = Engine(model, **(engine_kwargs | dict(spec.get("engine") or {})))
            async_engines[name] = AsyncEngine(engine, max_pending=max_pending)
        router = AsyncRouter(async_engines, policy_from_config(config["policy"]), default=config["default"],
                             costs=config.get("costs", "measure"), name=config.get("name", "auto"))
    except BaseException:
        for async_engine in async_engines.values():
            async_engine.shutdown()
        raise
    for model, cost in router.costs.items():
        print(f"llmc: {model}: {cost.prefill_s * 1e3:.3f} ms per prompt token, {cost.decode_s * 1e3:.2f} ms per "
              f"generated token{' (reference)' if model == router.reference else ''}", file=sys.stderr)
    return router


def run_generate(args: argparse.Namespace) -> int:
    from runtime import Engine, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
    )
    model = load_or_compile(args)
    engine = Engine(model, num_blocks=args.num_blocks, max_model_len=args.max_model_len)
    outputs = engine.generate(args.prompt, params, chat=args.chat)
    for i, out in enumerate(outputs):
        if len(outputs) > 1:
            print(f"--- [{i}] {out.prompt!r} ({out.finish_reason})")
        print(out.text)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import json

    from runtime import evaluate as ev

    if args.long:
        return run_eval_long(args)
    known = ("ppl", "gsm8k")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in known]
    if not tasks or unknown:
        problem = f"unknown task {unknown[0]!r}" if unknown else "no task given"
        raise ValueError(f"--tasks: {problem}; choose from {', '.join(known)}")
    for flag, value in (("--ppl-windows", args.ppl_windows), ("--gsm8k-problems", args.gsm8k_problems),
                        ("--max-tokens", args.max_tokens)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.ppl_window < 2:
        raise ValueError(f"--ppl-window must be >= 2, got {args.ppl_window}")
    if args.gsm8k_shots < 0:
        raise ValueError(f"--gsm8k-shots must be >= 0, got {args.gsm8k_shots}")
    # NOTE: data files are found before the model loads, so a wrong --data fails in a moment.
    ppl_path = ev.data_file(ev.PPL_FILE, args.data) if "ppl" in tasks else None
    gsm8k_path = ev.data_file(ev.GSM8K_FILE, args.data) if "gsm8k" in tasks else None
    model = load_or_compile(args)
    result = ev.evaluate(model, ppl_text_path=ppl_path, gsm8k_path=gsm8k_path, ppl_window=args.ppl_window,
                         ppl_num_windows=args.ppl_windows, gsm8k_problems=args.gsm8k_problems,
                         gsm8k_shots=args.gsm8k_shots, max_tokens=args.max_tokens)
    result = {"source": args.source, "tasks": tasks, **result}
    print(ev.format_report(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, ensure_ascii=False)
            f.write("\n")
    return 0


DEFAULT_LONG_SETTINGS = ("full", "h2o:0.2", "streaming:4:1024", "streaming:0:1024", "share:2")


def run_eval_long(args: argparse.Namespace) -> int:
    import json

    from runtime import evaluate as ev
    from runtime import long_context as lc

    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if not settings:
        raise ValueError("--settings: no KV setting given")
    for s in settings:
        lc.parse_setting(s)  # a bad one fails before anything compiles
    for flag, value, lo in (("--long-window", args.long_window, 16), ("--long-windows", args.long_windows, 1),
                            ("--needle-context", args.needle_context, 0)):
        if value < lo:
            raise ValueError(f"{flag} must be >= {lo}, got {value}")
    try:
        depths = [float(x) for x in args.needle_depths.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--needle-depths must be comma-separated fractions, got {args.needle_depths!r}") from None
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"--needle-depths must be fractions in [0, 1], got {args.needle_depths!r}")
    from runtime import is_artifact

    if is_artifact(args.source):
        raise ValueError("--long compiles SOURCE once per KV setting: give a checkpoint or registry name, not an "
                         "artifact")
    text = ev.data_file(ev.PPL_FILE, args.data).read_text(encoding="utf-8")
    kw = compile_kwargs(args)
    for name in ("kv_policy", "share_kv_layers"):
        if kw.pop(name, None) is not None:
            raise ValueError(f"--long sweeps its own KV settings (--settings); drop --{name.replace('_', '-')}")
    print(f"llmc eval --long: {args.source}, {args.long_windows} window(s) of {args.long_window} tokens, needle at "
          f"{args.needle_context} tokens", file=sys.stderr)
    result = lc.sweep(args.source, text, settings=settings, window=args.long_window, num_windows=args.long_windows,
                      needle_context=args.needle_context, depths=depths, compile_kw=kw)
    result["source"] = args.source
    if args.plot:
        result["plots"] = lc.plot(result, args.plot)
        print("\n".join(f"wrote {p}" for p in result["plots"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


def run_train_draft(args: argparse.Namespace) -> int:
    import json

    from runtime import draft_heads as dh

    for flag, value, low in (("--num-heads", args.num_heads, 1), ("--prompts", args.prompts, 0),
                             ("--mt-bench-prompts", args.mt_bench_prompts, 0), ("--eval-prompts", args.eval_prompts, 0),
                             ("--max-tokens", args.max_tokens, 2), ("--max-num-seqs", args.max_num_seqs, 1),
                             ("--depth", args.depth, 1), ("--mt-bench-samples", args.mt_bench_samples, 0)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.num_heads > 16:
        raise ValueError(f"--num-heads must be <= 16, got {args.num_heads}")
    if args.prompts + args.mt_bench_prompts < 1:
        raise ValueError("no training prompts: --prompts and --mt-bench-prompts are both 0")
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    result = dh.train_draft_heads(
        args.source, method=args.method, output=args.output, num_heads=args.num_heads, num_gsm8k=args.prompts,
        num_mt_bench=args.mt_bench_prompts, num_eval=args.eval_prompts, max_tokens=args.max_tokens,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, data=args.data,
        generations=args.generations, max_num_seqs=args.max_num_seqs, target=args.target,
        depth=args.depth, mt_bench_samples=args.mt_bench_samples,
        log=None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True)))
    print(json.dumps(result, indent=2))
    return 0


def run_train_router(args: argparse.Namespace) -> int:
    import math

    from runtime import route_classifier as rc

    if not 0.0 <= args.test_fraction < 1.0:
        raise ValueError(f"--test-fraction must be in [0, 1), got {args.test_fraction}")
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if not (math.isfinite(args.l2) and args.l2 >= 0):
        raise ValueError(f"--l2 must be a finite number >= 0, got {args.l2}")
    labels = None
    if args.labels is not None:
        labels = [x.strip() for x in args.labels.split(",") if x.strip()]
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"--labels must name >= 2 distinct labels, got {args.labels!r}")
    result = rc.train_router(args.data, args.output, labels=labels, test_fraction=args.test_fraction,
                             seed=args.seed, epochs=args.epochs, l2=args.l2, balanced=args.balanced)
    print(rc.format_report(result))
    return 0


def run_eval_router(args: argparse.Namespace) -> int:
    import json

    from runtime import router_eval as re_

    for flag, value, low in (("--num-items", args.num_items, 4), ("--batch-items", args.batch_items, 1),
                             ("--random-seeds", args.random_seeds, 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if not 0.0 <= args.train_fraction < 1.0:
        raise ValueError(f"--train-fraction must be in [0, 1), got {args.train_fraction}")
    if args.num_items - round(args.train_fraction * args.num_items) < 2:
        raise ValueError(f"--train-fraction {args.train_fraction} leaves fewer than 2 of {args.num_items} items held out")
    result = re_.eval_router(args.weak, args.strong, task=args.task, num_items=args.num_items,
                             train_fraction=args.train_fraction, seed=args.seed, data_dir=args.data,
                             weak_weights=args.weak_weights, strong_weights=args.strong_weights,
                             max_ppl_increase=args.max_ppl_increase, batch_items=args.batch_items,
                             class_weight=args.class_weight, num_random_seeds=args.random_seeds,
                             cache_dir=args.cache, log=re_.print_log)
    print(re_.format_report(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


def is_user_error(e: BaseException) -> bool:
    """Errors whose message is the whole story: bad arguments, missing files, bad checkpoints."""
    if isinstance(e, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return True
    # NOTE: loaders raise their own exception classes (CheckpointError, ...); any exception the
    # project defines carries a message meant for the user.
    module = type(e).__module__ or ""
    return module.split(".")[0] in ("lowering", "runtime") and bool(str(e))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:  # noqa: BLE001 - turned into a one-line message below, or re-raised
        if not is_user_error(e):
            raise
        message = e.strerror + f": {e.filename}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
