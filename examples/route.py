"""Two tiers of SmolLM2-135M-Instruct behind one OpenAI endpoint, with a cascade router ("model": "auto").

    .venv/bin/python examples/route.py                    # a few chat requests, then the router's /metrics
    .venv/bin/python examples/route.py --keep-serving     # then point any OpenAI client at http://127.0.0.1:8000/v1

The small tier keeps the GGUF file's own 4/8-bit blocks (`weights="gguf"`), the large one is float32. Each
request goes to the small model first; an answer whose mean token log-probability is under the threshold is
escalated, and the large model checks the small answer as a draft in one pass (cascade-as-speculation).
`llmc serve --router router.json` does the same from the command line (see README.md).
"""
from __future__ import annotations

import argparse

from lowering import compile_model
from runtime import Engine
from runtime.async_engine import AsyncEngine
from runtime.router import AsyncRouter, CascadePolicy
from runtime.server import BackgroundServer

QUESTIONS = ["What is the capital of France?", "Name three primary colors.",
             "Explain why the sum of two odd numbers is even, step by step.", "Write a haiku about the sea."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threshold", type=float, default=-0.8, help="mean log-prob under which to escalate")
    parser.add_argument("--keep-serving", action="store_true", help="keep the server up after the demo requests")
    args = parser.parse_args()

    tiers = {"small": compile_model("smollm2-135m", weights="gguf", progress=False),
             "large": compile_model("smollm2-135m", progress=False)}
    engines = {name: AsyncEngine(Engine(model, max_model_len=1024)) for name, model in tiers.items()}
    router = AsyncRouter(engines, CascadePolicy("small", "large", threshold=args.threshold), default="large")
    for name, cost in router.costs.items():
        print(f"{name}: {cost.decode_s * 1e3:.1f} ms per generated token (measured)")
    server = BackgroundServer(router, port=args.port)
    print(f"serving {sorted(engines)} and 'auto' on {server.url}/v1")
    try:
        import httpx

        for q in QUESTIONS:
            r = httpx.post(server.url + "/v1/chat/completions", timeout=120,
                           json={"model": "auto", "messages": [{"role": "user", "content": q}], "max_tokens": 48,
                                 "temperature": 0})
            body = r.json()
            route = body["route"]
            print(f"\n{q}\n  -> {route['model']} (confidence {route['confidence']:.2f}, "
                  f"escalated {route['escalated']}, draft accepted {route['num_accepted_draft_tokens']}/"
                  f"{route['num_draft_tokens']}, cost saved {route['cost_saved_s'] * 1e3:.0f} ms)\n  "
                  + body["choices"][0]["message"]["content"].replace("\n", " ")[:200])
        metrics = httpx.get(server.url + "/metrics").text
        print("\n" + "\n".join(line for line in metrics.splitlines() if line.startswith("llmc_router_")
                                and "_created" not in line))
        if args.keep_serving:
            print("serving; Ctrl-C to stop")
            server.thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
