"""SmolLM2-135M served over HTTP on the CPU: `llmc serve` answers a chat request; 200 concurrent streams complete."""
import asyncio
import os
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from runtime import Engine  # noqa: E402
from runtime.async_engine import AsyncEngine  # noqa: E402
from tests.runtime.test_server import LiveServer, wait_idle  # noqa: E402

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_llmc_serve_command_answers_a_chat_request(smollm2_gguf_path):
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # the registry name, as a user types it (the fixture has fetched the GGUF into the cache already)
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "smollm2-135m", "--port", str(port),
                             "--max-model-len", "512"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "llmc serve did not come up"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=16, temperature=0)
        assert "Paris" in reply.choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(30)


def test_200_concurrent_smollm2_streams_on_the_cpu(smollm2_compiled):
    engine = Engine(smollm2_compiled, max_model_len=256, max_num_seqs=64, max_num_batched_tokens=512)
    server = LiveServer(AsyncEngine(engine))
    try:
        async def one(c, i):
            # short raw prompts: the model's compute is not what this test is about (the chat template would make
            # each prompt ~35 tokens; test_llmc_serve_command_answers_a_chat_request covers chat)
            body = {"model": "toy", "prompt": f"{i} +", "max_tokens": 3, "temperature": 0, "stream": True}
            done = False
            async with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    done = done or line == "data: [DONE]"
                    assert not line.startswith("data: {\"error\"")
            return done

        async def main():
            limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
            async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as c:
                return await asyncio.gather(*(one(c, i) for i in range(200)))

        assert all(asyncio.run(main()))
        assert wait_idle(server.async_engine) and server.async_engine.num_blocks_used() == 0
        assert httpx.get(server.url + "/health").json()["status"] == "ok"
        assert server.async_engine.stats().finished_requests >= 200
    finally:
        server.stop()
