"""`make demo`: fetch SmolLM2-135M-Instruct, compile it for the CPU, export, load back, and chat."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from lowering import compile_model
from runtime import Engine, SamplingParams, load

QUESTION = "What is the capital of France?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--artifact", default="artifacts/smollm2", help="where the compiled artifact lives")
    parser.add_argument("--question", default=QUESTION)
    args = parser.parse_args()

    artifact = Path(args.artifact)
    if not (artifact / "manifest.json").exists():
        start = time.perf_counter()
        cm = compile_model("smollm2-135m", target="cpu", verbose=True)
        cm.export(artifact)
        print(f"compiled and exported to {artifact} in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    engine = Engine(load(artifact), max_model_len=1024, max_num_seqs=8)
    print(f"loaded {artifact} in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    out = engine.generate([args.question], SamplingParams(max_tokens=48, temperature=0.0), chat=True)[0]
    seconds = time.perf_counter() - start
    print(f"\nQ: {args.question}\nA: {out.text.strip()}\n")
    print(f"({len(out.token_ids)} tokens in {seconds:.1f} s, first call includes jit compilation)")


if __name__ == "__main__":
    main()
