"""The OpenAI-compatible server over a live uvicorn on loopback: the official client, bad input, disconnects, load."""
import asyncio
import json
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from runtime import Engine, SamplingParams  # noqa: E402
from runtime.async_engine import AsyncEngine, QueueFullError  # noqa: E402
from runtime.server import BackgroundServer  # noqa: E402
from tests.runtime.toy_program import NUM_SPECIAL, ToyModel  # noqa: E402

SCRIPT = "Hello there! The capital of France is Paris. " * 3
MODEL = "toy"


def LiveServer(async_engine, **kwargs):
    return BackgroundServer(async_engine, model_name=MODEL, **kwargs)


def make_engine(**kwargs):
    return Engine(ToyModel(script_text=SCRIPT, default_num_blocks=96), max_num_seqs=32, max_num_batched_tokens=256,
                  **kwargs)


@pytest.fixture(scope="module")
def live():
    server = LiveServer(AsyncEngine(make_engine(), max_pending=512))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def blocks_in_use(async_engine) -> int:
    return async_engine.num_blocks_used()


def wait_idle(async_engine, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if async_engine.num_in_flight == 0 and not async_engine.engine.scheduler.has_unfinished_requests():
            return True
        time.sleep(0.02)
    return False


def test_models_and_health(live, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


def test_completion_matches_the_engine(live, client):
    want = make_engine().generate(["Hello"], SamplingParams(max_tokens=12, temperature=0.0))[0]
    got = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == want.finish_reason
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    pieces = []
    for chunk in client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0, stream=True):
        pieces.append(chunk.choices[0].text)
    assert "".join(pieces) == want.text


def test_chat_completion_sync_and_streaming(live, client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    text = got.choices[0].message.content
    assert got.choices[0].message.role == "assistant" and len(text) > 0
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens


def test_stop_strings_and_seeded_sampling(live, client):
    got = client.completions.create(model=MODEL, prompt="Hello", max_tokens=40, temperature=0, stop=["France"])
    assert "France" not in got.choices[0].text and got.choices[0].finish_reason == "stop"
    a = client.completions.create(model=MODEL, prompt="Hi", max_tokens=8, temperature=1.0, seed=5)
    b = client.completions.create(model=MODEL, prompt="Hi", max_tokens=8, temperature=1.0, seed=5)
    assert a.choices[0].text == b.choices[0].text


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", "not valid JSON"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, "not served here"),
    ("/v1/completions", {"prompt": "x"}, "'model' is required"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "5"}, "must be an integer"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, "'max_tokens' must be >= 1"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10_000}, "does not fit the context"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 300, "max_tokens": 4}, "leaves no room"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, "'temperature' must be >= 0"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, "'top_p' must be > 0"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": "high"}, "must be a number"),
    ("/v1/completions", {"model": MODEL, "prompt": "", "max_tokens": 4}, "must not be empty"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 2, 9999]}, "outside the vocabulary"),
    ("/v1/completions", {"model": MODEL, "prompt": 42}, "'prompt' must be"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 17}, "'n' must be <= 16"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, "'n' must be >= 1"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 2, "best_of": 3}, "'best_of' other than n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": "yes"}, "'stream' must be a boolean"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "frequency_penalty": 2.5}, "'frequency_penalty' must be <= 2"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "echo": True, "logprobs": 1}, "'echo' with 'logprobs'"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "echo": "yes"}, "'echo' must be a boolean"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "suffix": "y"}, "'suffix' is not supported"),
    ("/v1/completions", {"model": MODEL, "prompt": ["x", 5]}, "or a list of those"),
    ("/v1/completions", {"model": MODEL, "prompt": [[1], []]}, "or a list of those"),
    ("/v1/completions", {"model": MODEL, "prompt": ["x"] * 257}, "at most 256 prompts"),
    ("/v1/completions", {"model": MODEL, "prompt": ["x"] * 17, "n": 16}, "more than 256 choices"),
    ("/v1/completions", {"model": MODEL, "prompt": ["x", [1, 9999]]}, "prompt 1 has token ids outside"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 50}, "'logprobs' must be <= 20"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"abc": 1}}, "keys must be token ids"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"5": 200}}, "'logit_bias' must be <= 100"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": [5]}, "must be an object"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"9999": 1}}, "outside the vocabulary"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 4, "min_tokens": 5}, "must not exceed"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "min_tokens": -1}, "'min_tokens' must be >= 0"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "repetition_penalty": 0}, "'repetition_penalty' must be > 0"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": True, "stream_options": {"include_usage": "y"}},
     "include_usage' must be a boolean"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "user": 5}, "'user' must be a string"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "ignore_eos": "no"}, "'ignore_eos' must be a boolean"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     "needs 'logprobs': true"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "bogus": 1}, "unsupported field"),
    ("/v1/completions", [1, 2], "must be a JSON object"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "non-empty list"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0]"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 3}]}, "messages[0]"),
]


@pytest.mark.parametrize("path, body, message", BAD_REQUESTS)
def test_bad_input_gets_400_with_an_openai_error(live, path, body, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(live.url + path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error"


def test_bad_input_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="not served here"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_api_key_is_enforced():
    server = LiveServer(AsyncEngine(make_engine()), api_key="sekret")
    try:
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert httpx.get(server.url + "/health").status_code == 200  # health stays open for probes
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0).choices[0].text
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        server.stop()


def test_queue_full_gets_429():
    async_engine = AsyncEngine(make_engine(), max_pending=1)
    server = LiveServer(async_engine)
    try:
        async def two():
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
                body = {"model": MODEL, "prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
                async with c.stream("POST", "/v1/completions", json=body) as first:
                    await first.aiter_lines().__anext__()  # the first request is running
                    second = await c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
                    return second

        second = asyncio.run(two())
        assert second.status_code == 429 and second.json()["error"]["type"] == "rate_limit_error"
        assert wait_idle(async_engine) and blocks_in_use(async_engine) == 0
    finally:
        server.stop()


def test_client_disconnect_mid_stream_frees_the_blocks(live, monkeypatch):
    async_engine = live.async_engine
    assert wait_idle(async_engine)
    # the toy model decodes 200 tokens in well under 0.1 s on a fast machine, which could finish the request before the
    # server sees the disconnect; a slowed step keeps it running for seconds, so the abort path is what frees it
    engine, real_step = async_engine.engine, async_engine.engine._step

    def slow_step(on_token=None):
        time.sleep(0.01)
        return real_step(on_token)

    monkeypatch.setattr(engine, "_step", slow_step)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert blocks_in_use(async_engine) > 0
    # the response is closed after one chunk: the server aborts the request and returns its blocks
    assert wait_idle(async_engine)
    assert blocks_in_use(async_engine) == 0
    assert async_engine.stats().aborted_requests >= 1


def test_engine_queue_limit_and_failed_step_fail_only_their_requests():
    engine = make_engine()
    async_engine = AsyncEngine(engine, max_pending=1)

    async def run():
        async_engine.add_request("Hello", SamplingParams(max_tokens=50, ignore_eos=True))
        with pytest.raises(QueueFullError):
            async_engine.add_request("Hello", SamplingParams(max_tokens=2))

    asyncio.run(run())
    assert wait_idle(async_engine)
    # a step that raises fails the requests in it, and the loop keeps serving new ones
    real_step = engine._step
    calls = {"n": 0}

    def flaky(on_token=None):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real_step(on_token)

    engine._step = flaky
    async_engine.max_pending = 8

    async def collect(prompt):
        return [e async for e in async_engine.generate(prompt, SamplingParams(max_tokens=4, temperature=0.0))]

    failed = asyncio.run(collect("Hello"))
    assert failed[-1].finish_reason == "error" and "boom" in failed[-1].error
    ok = asyncio.run(collect("Hello"))
    assert ok[-1].finish_reason in ("stop", "length") and "".join(e.text for e in ok)
    assert wait_idle(async_engine) and blocks_in_use(async_engine) == 0
    async_engine.shutdown()


def test_200_concurrent_streams_complete_without_leaking_blocks(live):
    async def one(c, i):
        body = {"model": MODEL, "prompt": f"Hello {i}", "max_tokens": 8 + i % 9, "temperature": 0, "stream": True}
        text, done = [], False
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    text.append(json.loads(line[6:])["choices"][0]["text"])
        return done, "".join(text)

    async def main():
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(base_url=live.url, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(one(c, i) for i in range(200)))

    results = asyncio.run(main())
    assert all(done for done, _ in results) and all(text for _, text in results)
    assert wait_idle(live.async_engine) and blocks_in_use(live.async_engine) == 0
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    metrics = httpx.get(live.url + "/metrics").text
    assert "llmc_time_to_first_token_seconds_count" in metrics and f'llmc_kv_blocks_used{{model="{MODEL}"}} 0.0' in metrics


def test_logprobs_and_penalties_over_http(live, client):
    got = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0, logprobs=2)
    lp = got.choices[0].logprobs
    assert len(lp.token_logprobs) == got.usage.completion_tokens == len(lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) == 2 for t in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(abs(max(top.values()) - v) < 1e-9 for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    penalised = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised.usage.completion_tokens == 12  # accepted (the scripted toy model outweighs any penalty)


def test_logit_bias_and_min_tokens_over_http():
    """OpenAI's logit_bias (string token ids) and vLLM's min_tokens reach the sampler; a plain random toy model (no
    script), so a bias of +-100 decides the greedy pick."""
    async_engine = AsyncEngine(Engine(ToyModel(seed=3), max_num_seqs=4))
    server = LiveServer(async_engine)
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        plain = c.completions.create(model=MODEL, prompt="ab", max_tokens=8, temperature=0)
        ids = async_engine.engine.generate(["ab"], SamplingParams(max_tokens=8, temperature=0.0))[0].token_ids
        favourite = next(t for t in range(NUM_SPECIAL + 32, NUM_SPECIAL + 127) if t not in ids)
        forced = c.completions.create(model=MODEL, prompt="ab", max_tokens=5, temperature=0,
                                      logit_bias={str(favourite): 100})
        assert forced.choices[0].text == chr(favourite - NUM_SPECIAL) * 5
        banned = c.completions.create(model=MODEL, prompt="ab", max_tokens=8, temperature=0,
                                      logit_bias={str(ids[0]): -100})
        assert banned.choices[0].text != plain.choices[0].text
        # min_tokens: a stop token cannot end the answer before 6 tokens, even when every step would pick it
        held = c.completions.create(model=MODEL, prompt="ab", max_tokens=10, temperature=0,
                                    logit_bias={str(favourite): 100},
                                    extra_body={"min_tokens": 6, "stop_token_ids": [favourite]})
        assert held.usage.completion_tokens == 7 and held.choices[0].finish_reason == "stop"
        assert chr(favourite - NUM_SPECIAL) not in held.choices[0].text
        assert wait_idle(async_engine) and blocks_in_use(async_engine) == 0
    finally:
        server.stop()


def test_n_choices_sync_and_streaming():
    """n > 1: n requests of one prompt; with a seed, choice i is what a single request seeded seed + i gives; usage
    counts the prompt once; a stream interleaves the choices by index and ends each with its finish reason."""
    async_engine = AsyncEngine(Engine(ToyModel(seed=3), max_num_seqs=8))
    server = LiveServer(async_engine)
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        kw = dict(model=MODEL, prompt="ab", max_tokens=12, temperature=1.0, extra_body={"ignore_eos": True})
        got = c.completions.create(n=3, seed=5, **kw)
        singles = [c.completions.create(seed=5 + i, **kw) for i in range(3)]
        assert [ch.index for ch in got.choices] == [0, 1, 2]
        assert [ch.text for ch in got.choices] == [s.choices[0].text for s in singles]
        assert len({ch.text for ch in got.choices}) > 1  # distinct samples
        assert got.usage.prompt_tokens == singles[0].usage.prompt_tokens and got.usage.completion_tokens == 36
        body = {"model": MODEL, "prompt": "ab", "max_tokens": 12, "temperature": 1.0, "ignore_eos": True, "n": 3,
                "seed": 5, "stream": True, "stream_options": {"include_usage": True}}
        texts, reasons, usage = {}, {}, None
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage = event["usage"]
                for ch in event["choices"]:
                    texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
                    if ch["finish_reason"]:
                        reasons[ch["index"]] = ch["finish_reason"]
        assert texts == {i: ch.text for i, ch in enumerate(got.choices)}
        assert reasons == {0: "length", 1: "length", 2: "length"} and usage["completion_tokens"] == 36
        chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                         temperature=0, n=2)
        assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content
        assert wait_idle(async_engine) and blocks_in_use(async_engine) == 0
    finally:
        server.stop()


def test_prompt_batches_and_echo(live, client):
    """OpenAI's batch form ("prompt": [...], strings or token-id lists): choice index = prompt index x n + i, usage
    counts each prompt once; echo puts the prompt before each choice's text, streamed or not."""
    engine = make_engine()
    prompts = ["Hello", "Hello there! The", [5, 6, 7]]
    want = [engine.generate([p], SamplingParams(max_tokens=6, temperature=0.0))[0] for p in prompts]
    got = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in got.choices] == list(range(6))
    assert [c.text for c in got.choices] == [w.text for w in want for _ in range(2)]
    assert got.usage.prompt_tokens == sum(len(w.prompt_token_ids) for w in want)
    assert got.usage.completion_tokens == 2 * sum(len(w.token_ids) for w in want)
    echoed = client.completions.create(model=MODEL, prompt=["Hello", [5, 6, 7]], max_tokens=6, temperature=0,
                                       echo=True)
    tok = engine.tokenizer
    assert echoed.choices[0].text == "Hello" + want[0].text
    assert echoed.choices[1].text == tok.decode([5, 6, 7], skip_special_tokens=True) + want[2].text
    streamed = {}
    for chunk in client.completions.create(model=MODEL, prompt=["Hello", "Hello there! The"], max_tokens=6,
                                           temperature=0, echo=True, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {0: "Hello" + want[0].text, 1: "Hello there! The" + want[1].text}
    assert wait_idle(live.async_engine) and blocks_in_use(live.async_engine) == 0


def test_penalties_change_greedy_repetition_in_the_engine():
    engine = Engine(ToyModel(seed=3), max_num_seqs=4)  # no script: plain random logits, greedy loops
    plain = engine.generate(["ab"], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))[0].token_ids
    penalised = engine.generate(["ab"], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                                                       frequency_penalty=2.0, presence_penalty=2.0))[0].token_ids
    assert penalised != plain and len(set(penalised)) > len(set(plain))
    repeated = engine.generate(["ab"], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                                                      repetition_penalty=10.0))[0].token_ids
    assert repeated != plain and len(set(repeated)) > len(set(plain))


def test_staggered_arrivals_give_the_tokens_of_each_request_alone():
    engine = make_engine()
    async_engine = AsyncEngine(engine)
    prompts = ["Hello", "The capital", "Hello there! The", "x"]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)

    async def staggered():
        async def one(i, prompt):
            await asyncio.sleep(0.01 * i)
            return [t for e in [e async for e in async_engine.generate(prompt, params)] for t in e.token_ids]

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    got = asyncio.run(staggered())
    alone = [make_engine().generate([p], params)[0].token_ids for p in prompts]
    assert got == alone
    async_engine.shutdown()


def test_speculative_server_streams_the_same_text_and_reports_metrics(client):
    """A server whose engine speculates (prompt lookup) streams what the plain server does; /metrics shows the
    acceptance rate, mean accepted length and chosen draft length; aborted streams free their blocks."""
    from lowering import Speculative

    async_engine = AsyncEngine(make_engine(speculative=Speculative("ngram", num_tokens=4, adaptive=False)))
    server = LiveServer(async_engine)
    try:
        spec_client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        prompt = "Hello there! The capital"
        want = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0).choices[0].text
        chunks = spec_client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in chunks) == want
        with httpx.stream("POST", server.url + "/v1/completions",
                          json={"model": MODEL, "prompt": prompt, "max_tokens": 200, "stream": True}) as r:
            next(r.iter_lines())  # disconnect after the first event
        assert wait_idle(async_engine) and blocks_in_use(async_engine) == 0
        metrics = httpx.get(server.url + "/metrics").text
        rate = float(next(line.split()[1] for line in metrics.splitlines()
                          if line.startswith(f'llmc_spec_acceptance_rate{{model="{MODEL}"}} ')))
        assert 0 < rate <= 1
        assert "llmc_spec_mean_accepted_length" in metrics and f'llmc_spec_draft_length{{model="{MODEL}"}} 4.0' in metrics
        assert f'llmc_spec_device_steps_total{{model="{MODEL}"}} 0.0' in metrics  # (a Program without the loop)
    finally:
        server.stop()
