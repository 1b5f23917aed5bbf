"""Serve a model over the OpenAI API and query it with the official `openai` client (sync and streaming).

    .venv/bin/python examples/serve.py                    # artifacts/smollm2 if exported, else smollm2-135m
    .venv/bin/python examples/serve.py --keep-serving     # then point any OpenAI client at http://127.0.0.1:8000/v1

`llmc serve SOURCE --port 8000` does the same from the command line.
"""
from __future__ import annotations

import argparse
import os

from runtime import Engine, load_if_artifact
from runtime.async_engine import AsyncEngine
from runtime.server import BackgroundServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", default="artifacts/smollm2", help="artifact dir or registry name")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--keep-serving", action="store_true", help="keep the server up after the demo requests")
    args = parser.parse_args()

    model = load_if_artifact(args.source)
    if model is None:
        from lowering import compile_model

        model = compile_model(args.source if os.path.exists(args.source) else "smollm2-135m", progress=False)
    server = BackgroundServer(AsyncEngine(Engine(model, max_model_len=1024)), model_name="smollm2", port=args.port)
    print(f"serving on {server.url}/v1")
    try:
        from openai import OpenAI

        client = OpenAI(base_url=server.url + "/v1", api_key="unused")
        question = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.create(model="smollm2", messages=question, max_tokens=32, temperature=0)
        print("chat:", reply.choices[0].message.content, f"({reply.usage.completion_tokens} tokens)")
        print("stream: ", end="", flush=True)
        for chunk in client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=32,
                                               temperature=0.8, seed=0, stream=True):
            print(chunk.choices[0].text, end="", flush=True)
        print()
        if args.keep_serving:
            print("Ctrl-C to stop")
            server.thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
