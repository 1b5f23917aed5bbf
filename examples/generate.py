"""Load an exported artifact and generate for a batch of prompts with different sampling settings."""
from __future__ import annotations

import argparse

from runtime import Engine, SamplingParams, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifact", nargs="?", default="artifacts/smollm2")
    args = parser.parse_args()

    engine = Engine(load(args.artifact), max_model_len=1024)
    prompts = ["What is the capital of France?", "Write a haiku about compilers.", "Name three primary colors."]
    params = [
        SamplingParams(max_tokens=32, temperature=0.0),  # greedy
        SamplingParams(max_tokens=48, temperature=0.8, top_p=0.95, seed=0),  # nucleus sampling, reproducible
        SamplingParams(max_tokens=32, temperature=0.7, top_k=20, seed=1, stop=["\n\n"]),
    ]
    for prompt, out in zip(prompts, engine.generate(prompts, params, chat=True)):
        print(f"### {prompt}\n{out.text.strip()}\n[{len(out.token_ids)} tokens, finish: {out.finish_reason}]\n")


if __name__ == "__main__":
    main()
