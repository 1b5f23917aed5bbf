"""Compile a checkpoint (registry name, GGUF file, HF or orbax dir) and export the artifact."""
from __future__ import annotations

import argparse

from lowering import compile_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source", nargs="?", default="smollm2-135m")
    parser.add_argument("--out", default="artifacts/smollm2")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dump-ir", default=None, help="write the IR after every pass into this folder")
    args = parser.parse_args()

    cm = compile_model(args.source, target="cpu", block_size=args.block_size, verbose=True, dump_ir=args.dump_ir)
    print(cm.graph.__str__().splitlines()[0])
    print("ops:", dict(sorted(cm.graph.ops_count().items())))
    path = cm.export(args.out)
    print(f"exported to {path}")


if __name__ == "__main__":
    main()
