"""Model routing (runtime/router.py): scores, policies, cascade-as-speculation, fallbacks, accounting, server."""
import asyncio
import math

import numpy as np
import pytest

from runtime import Engine, SamplingParams
from runtime.router import (CONFIDENCE_KINDS, AsyncRouter, CascadePolicy, ModelCost, RandomPolicy, Router,
                            SizePolicy, SizeRule, TaskPolicy, confidence_score, load_router_config,
                            policy_from_config, prompt_features, size_score)
from tests.runtime.toy_program import ToyModel

SCRIPT = "Hello there! The capital of France is Paris. " * 3
PROMPTS = ["Hello", "The cap", "What is 2+2?", "Explain why the sky is blue", "Paris", "Once upon a time"]
COSTS = {"small": ModelCost(1e-4, 1e-3), "large": ModelCost(3e-4, 3e-3)}
GREEDY = SamplingParams(max_tokens=20, temperature=0.0)


def toy_engine(seed, script=None, **kwargs):
    kw = dict(max_num_seqs=8, max_num_batched_tokens=128) | kwargs
    return Engine(ToyModel(seed=seed, default_num_blocks=96, script_text=script), **kw)


@pytest.fixture(scope="module")
def engines():
    return {"small": toy_engine(1), "large": toy_engine(0)}


@pytest.fixture(scope="module")
def direct(engines):
    return {name: [o.token_ids for o in e.generate(PROMPTS, GREEDY)] for name, e in engines.items()}


# -- scores ------------------------------------------------------------------------------------


def test_confidence_kinds_on_hand_values():
    lps, ents = [-0.1, -2.0, -0.3], [0.5, 1.5, 1.0]
    assert confidence_score(lps, ents, "mean_logprob") == pytest.approx(-0.8)
    assert confidence_score(lps, ents, "min_logprob") == pytest.approx(-2.0)
    assert confidence_score(lps, ents, "neg_mean_entropy") == pytest.approx(-1.0)
    for kind in CONFIDENCE_KINDS:
        assert confidence_score([], [], kind) == -math.inf
    with pytest.raises(ValueError, match="unknown confidence kind"):
        confidence_score(lps, ents, "max")
    with pytest.raises(ValueError, match="needs the entropies"):
        confidence_score(lps, None, "neg_mean_entropy")


def test_size_score_grows_with_length_and_complexity():
    plain = size_score(prompt_features("hi there", 3, 16))
    assert size_score(prompt_features("hi there", 300, 16)) > plain
    assert size_score(prompt_features("hi there", 3, 1024)) > plain
    maths = prompt_features("Calculate 12 * 7 + 3 and explain why, step by step?", 3, 16)
    assert maths["math"] >= 2 and maths["reasoning"] >= 2 and maths["digit_frac"] > 0
    assert size_score(maths) > plain
    code = prompt_features("```python\ndef f(x):\n    return x\n```", 3, 16)
    assert code["code"] >= 2


# -- policies ----------------------------------------------------------------------------------


def _ctx(text, n=8, max_tokens=16):
    from runtime.router import RouteContext

    return RouteContext(text, n, max_tokens, prompt_features(text, n, max_tokens))


def test_size_rules_first_match_wins():
    policy = SizePolicy([SizeRule("small", max_prompt_tokens=10, max_tokens=32),
                         SizeRule("mid", max_prompt_tokens=100)], otherwise="large")
    assert policy.choose(_ctx("a", 5, 16)).model == "small"
    assert policy.choose(_ctx("a", 5, 64)).model == "mid"
    assert policy.choose(_ctx("a", 500, 16)).model == "large"
    assert policy.models() == {"small", "mid", "large"}


def test_random_policy_is_a_deterministic_seeded_coin():
    policy = RandomPolicy("small", "large", p_large=0.3, seed=7)
    picks = [policy.choose(_ctx(f"prompt {i}")).model for i in range(400)]
    assert picks == [policy.choose(_ctx(f"prompt {i}")).model for i in range(400)]
    assert 0.2 < picks.count("large") / 400 < 0.4
    assert [RandomPolicy("small", "large", seed=8).choose(_ctx(f"prompt {i}")).model for i in range(50)] != picks[:50]


class KeywordClassifier:
    """A stand-in for RouteClassifier: P(large) = 0.9 for prompts with a digit."""

    labels = ("weak", "strong")

    def predict_proba(self, texts):
        return np.array([[0.1, 0.9] if any(c.isdigit() for c in t) else [0.8, 0.2] for t in texts])


def test_task_policy_maps_labels_and_thresholds():
    routes = {"weak": "small", "strong": "large"}
    argmax = TaskPolicy(KeywordClassifier(), routes)
    assert argmax.choose(_ctx("what is 2+2")).model == "large"
    assert argmax.choose(_ctx("hello")).model == "small"
    strict = TaskPolicy(KeywordClassifier(), routes, threshold=0.95, positive="strong")
    assert strict.choose(_ctx("what is 2+2")).model == "small"
    loose = TaskPolicy(KeywordClassifier(), routes, threshold=0.1, positive="strong")
    assert loose.choose(_ctx("hello")).model == "large"
    partial = TaskPolicy(KeywordClassifier(), {"weak": "small"})  # "strong" names a model of its own
    assert partial.models() == {"small", "strong"}
    with pytest.raises(ValueError, match=r"names model\(s\) \['strong'\]"):
        Router({"small": None, "large": None}, partial, default="large", costs=COSTS)
    with pytest.raises(ValueError, match="positive"):
        TaskPolicy(KeywordClassifier(), routes, threshold=0.5, positive="other")


def test_task_policy_with_a_trained_route_classifier(tmp_path):
    from runtime.route_classifier import RouteClassifier

    names = ["ann", "bob", "cy", "dee", "ed", "flo"] * 5
    texts = [f"calculate {i} plus {i + 3} and the total" for i in range(30)] + \
            [f"hello friend {n}, how are you today" for n in names]
    labels = ["large"] * 30 + ["small"] * 30
    clf = RouteClassifier(["small", "large"]).fit(texts, labels)
    clf.save(tmp_path / "router.json")
    policy = policy_from_config({"kind": "task", "classifier": str(tmp_path / "router.json")})
    assert policy.choose(_ctx("calculate 4 plus 9, the total")).model == "large"
    assert policy.choose(_ctx("hello friend max, how are you today")).model == "small"


def test_policy_configs_and_their_errors(tmp_path):
    assert isinstance(policy_from_config({"kind": "size", "rules": [{"model": "a", "max_tokens": 8}],
                                          "otherwise": "b"}), SizePolicy)
    assert policy_from_config({"kind": "cascade", "small": "a", "large": "b", "threshold": -0.5}).threshold == -0.5
    for bad, match in [({"small": "a"}, "'kind'"), ({"kind": "oracle"}, "unknown routing policy"),
                       ({"kind": "size", "rules": [{"model": "a", "max_len": 3}], "otherwise": "b"}, "bad 'size'"),
                       ({"kind": "cascade", "small": "a", "large": "b", "confidence": "vibes"}, "confidence kind"),
                       ({"kind": "cascade", "small": "a", "large": "a"}, "two different models")]:
        with pytest.raises(ValueError, match=match):
            policy_from_config(bad)
    path = tmp_path / "r.json"
    path.write_text('{"models": {"a": {"source": "x"}}, "default": "a"}')
    with pytest.raises(ValueError, match="no 'policy'"):
        load_router_config(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_router_config(path)


# -- cascade drafts in the engine --------------------------------------------------------------


def test_engine_checks_a_whole_draft_in_the_prefill_pass(engines, direct):
    large = engines["large"]
    steps = large.num_steps
    outs = large.generate(PROMPTS, GREEDY, drafts=direct["large"])  # its own answers: every token accepted
    assert [o.token_ids for o in outs] == direct["large"]
    for o in outs:  # the step's token budget (128) checks part of a draft, the next step the rest
        assert o.num_accepted_draft_tokens == o.num_draft_tokens >= len(o.token_ids) - 3
    assert large.num_steps - steps <= 3  # instead of 20 decode steps
    wrong = [d[:3] + [(t + 7) % 200 + 3 for t in d[3:]] for d in direct["large"]]
    outs = large.generate(PROMPTS, GREEDY, drafts=wrong)
    assert [o.token_ids for o in outs] == direct["large"]
    assert all(o.num_accepted_draft_tokens >= 3 for o in outs if len(o.token_ids) > 3)


def test_drafts_survive_chunked_prefill_and_prefix_hits_and_skip_sampling():
    engine = toy_engine(0, max_num_batched_tokens=24)
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 2  # 90 tokens: four chunks
    want = engine.generate([long_prompt], GREEDY)[0].token_ids
    out = engine.generate([long_prompt], GREEDY, drafts=[want])[0]  # the prefix cache now holds its blocks too
    assert out.token_ids == want and out.num_accepted_draft_tokens > 0
    sampled = SamplingParams(max_tokens=8, temperature=0.8, seed=3)
    plain = engine.generate(["Hello"], sampled)[0].token_ids
    with_draft = engine.generate(["Hello"], sampled, drafts=[[5, 6, 7]])[0]
    assert with_draft.token_ids == plain and with_draft.num_draft_tokens == 0  # sampling ignores drafts
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate(["Hello"], GREEDY, drafts=[[10**6]])
    with pytest.raises(ValueError, match="2 drafts for 1 prompts"):
        engine.generate(["Hello"], GREEDY, drafts=[[5], [6]])


def test_drafts_with_preemption_stay_exact():
    engine = toy_engine(0, max_num_batched_tokens=64)
    small_pool = Engine(ToyModel(seed=0, default_num_blocks=6), max_num_seqs=4, max_num_batched_tokens=64)
    want = engine.generate(PROMPTS, SamplingParams(max_tokens=30, temperature=0.0))
    outs = small_pool.generate(PROMPTS, SamplingParams(max_tokens=30, temperature=0.0),
                               drafts=[o.token_ids[:5] + [7] * 20 for o in want])  # right, then wrong
    assert [o.token_ids for o in outs] == [o.token_ids for o in want]
    assert small_pool.scheduler.num_preemptions > 0


# -- the Router ----------------------------------------------------------------------------------


def test_cascade_keeps_confident_answers_and_escalates_the_rest_exactly(engines, direct):
    policy = CascadePolicy("small", "large", threshold=-0.2)
    router = Router(engines, policy, default="large", costs=COSTS)
    outs = router.generate(PROMPTS, GREEDY)
    assert {o.route.escalated for o in outs} == {True, False}
    for i, o in enumerate(outs):
        d = o.route
        assert d.first_model == "small" and d.policy == "cascade" and d.confidence is not None
        assert d.escalated == (d.confidence < -0.2)
        assert o.output.token_ids == direct["large" if d.escalated else "small"][i]
        assert o.output.logprobs is None and o.output.entropies is None  # the user asked for none
        if d.escalated:  # cascade-as-speculation: the small answer was the large model's draft
            assert 0 < d.num_draft_tokens <= len(direct["small"][i])
    again = router.generate(PROMPTS, GREEDY)
    assert [o.route.model for o in again] == [o.route.model for o in outs]  # deterministic
    s = router.stats.snapshot()
    n_esc = sum(o.route.escalated for o in outs)
    assert s["num_requests"] == 2 * len(PROMPTS)
    assert s["escalations"] == {("small", "large"): 2 * n_esc}
    assert s["decisions"][("cascade", "small")] == 2 * (len(PROMPTS) - n_esc)
    assert s["draft_tokens"] == 2 * sum(o.route.num_draft_tokens for o in outs)


def test_cascade_cost_accounting(engines, direct):
    router = Router(engines, CascadePolicy("small", "large", threshold=-0.2, speculate=False), default="large",
                    costs=COSTS)
    for o in router.generate(PROMPTS, GREEDY):
        d, out = o.route, o.output
        n_prompt, n_out = len(out.prompt_token_ids), len(out.token_ids)
        large = COSTS["large"].request(n_prompt, n_out)
        assert d.reference_cost_s == pytest.approx(large)
        if d.escalated:  # both models' work is paid
            i = PROMPTS.index(out.prompt)
            assert d.cost_s == pytest.approx(COSTS["small"].request(n_prompt, len(direct["small"][i])) + large)
            assert d.num_draft_tokens == 0
        else:
            assert d.cost_s == pytest.approx(COSTS["small"].request(n_prompt, n_out))
            assert d.cost_saved_s > 0


def test_router_errors_fall_back_to_the_default_model(engines, direct):
    class Broken:
        name = "broken"

        def models(self):
            return {"small"}

        def choose(self, ctx):
            raise RuntimeError("classifier file vanished")

    router = Router(engines, Broken(), default="large", costs=COSTS)
    outs = router.generate(PROMPTS[:2], GREEDY)
    assert [o.output.token_ids for o in outs] == direct["large"][:2]
    assert all(o.route.model == "large" and "classifier file vanished" in o.route.fallback for o in outs)
    assert router.stats.snapshot()["fallbacks"] == {"policy": 2}
    # a prompt the small model's context cannot hold goes to the default model
    short = {"small": toy_engine(1, max_model_len=32), "large": engines["large"]}
    router = Router(short, SizePolicy([SizeRule("small")], "large"), default="large", costs=COSTS)
    outs = router.generate(["x" * 40, "Hello"], GREEDY)
    assert outs[0].route.model == "large" and "refused" in outs[0].route.fallback
    assert outs[1].route.model == "small" and outs[1].route.fallback is None
    with pytest.raises(ValueError, match="not among the router's models"):
        Router(engines, SizePolicy([], "large"), default="medium", costs=COSTS)
    with pytest.raises(ValueError, match="does not have"):
        Router(engines, SizePolicy([SizeRule("tiny")], "large"), default="large", costs=COSTS)


def test_measured_costs_are_positive_and_name_the_reference(engines):
    router = Router(engines, SizePolicy([], "large"), default="large")
    for cost in router.costs.values():
        assert cost.prefill_s > 0 and cost.decode_s > 0
    assert router.reference in engines


# -- the server ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def routed_server(engines):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from runtime.async_engine import AsyncEngine
    from runtime.server import BackgroundServer

    small, large = toy_engine(1), toy_engine(0)
    router = AsyncRouter({"small": AsyncEngine(small), "large": AsyncEngine(large)},
                         CascadePolicy("small", "large", threshold=-0.2), default="large", costs=COSTS)
    server = BackgroundServer(router)
    yield server, router
    server.stop()


def test_server_auto_routes_and_reports_the_decision(routed_server, direct):
    httpx = pytest.importorskip("httpx")
    server, router = routed_server
    ids = [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
    assert ids == ["small", "large", "auto"]
    tok = router.engines["large"].tokenizer
    seen = set()
    for i, prompt in enumerate(PROMPTS):
        r = httpx.post(server.url + "/v1/completions", json={"model": "auto", "prompt": prompt, "max_tokens": 20,
                                                              "temperature": 0}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        route = body["route"]
        assert body["model"] == route["model"] and r.headers["x-llmc-route"].startswith(f"model={route['model']}")
        want = direct["large" if route["escalated"] else "small"][i]
        assert body["choices"][0]["text"] == tok.decode(want)
        seen.add(route["escalated"])
    assert seen == {True, False}
    # streaming: the same text, the route in the final chunk
    with httpx.stream("POST", server.url + "/v1/completions", json={"model": "auto", "prompt": PROMPTS[0],
                                                                    "max_tokens": 20, "temperature": 0,
                                                                    "stream": True}, timeout=30) as r:
        assert "x-llmc-route" in r.headers
        import json

        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "route" in chunks[-1]
    # a named model bypasses the router
    r = httpx.post(server.url + "/v1/completions", json={"model": "small", "prompt": PROMPTS[0], "max_tokens": 20,
                                                          "temperature": 0})
    assert "route" not in r.json() and r.json()["choices"][0]["text"] == tok.decode(direct["small"][0])
    metrics = httpx.get(server.url + "/metrics").text
    assert 'llmc_router_decisions_total{model="large",policy="cascade"}' in metrics
    assert 'llmc_router_escalations_total{from_model="small",to_model="large"}' in metrics
    assert "llmc_router_cost_saved_seconds_total" in metrics and "llmc_router_decision_seconds_count" in metrics
    assert 'llmc_generation_tokens_total{model="small"}' in metrics
    r = httpx.post(server.url + "/v1/completions", json={"model": "medium", "prompt": "x"})
    assert r.status_code == 400 and "not served here" in r.json()["error"]["message"]


def test_async_router_falls_back_when_the_small_model_refuses():
    from runtime.async_engine import AsyncEngine

    router = AsyncRouter({"small": AsyncEngine(toy_engine(1, max_model_len=32)), "large": AsyncEngine(toy_engine(0))},
                         CascadePolicy("small", "large"), default="large", costs=COSTS)

    async def run():
        handle = await router.start("y" * 40, GREEDY)
        events = []
        while not events or events[-1].finish_reason is None:
            events.append(await handle.queue.get())
        handle.on_finish(events[-1])
        return handle.decision, events

    try:
        decision, events = asyncio.run(run())
    finally:
        router.shutdown()
    assert decision.model == "large" and decision.escalated and "refused" in decision.fallback
    assert events[-1].finish_reason in ("stop", "length")
    assert router.stats.snapshot()["fallbacks"] == {"model": 1}


# -- the CLI: llmc serve --router ----------------------------------------------------------------


def test_build_router_from_a_config_file(tmp_path, monkeypatch):
    import json
    import sys
    import types

    import lowering
    from runtime import cli

    art = tmp_path / "small_art"
    art.mkdir()
    (art / "manifest.json").write_text("{}")
    fake = types.ModuleType("runtime.artifact")
    fake.load = lambda path: ToyModel(seed=1)
    monkeypatch.setitem(sys.modules, "runtime.artifact", fake)
    compiled = []

    def compile_model(source, **kwargs):
        compiled.append((source, kwargs))
        return ToyModel(seed=0)

    monkeypatch.setattr(lowering, "compile_model", compile_model)
    config = {"models": {"small": {"source": str(art)}, "large": {"source": "some-checkpoint", "weights": "int8",
                                                                   "engine": {"max_num_seqs": 4}}},
              "default": "large", "policy": {"kind": "cascade", "small": "small", "large": "large"},
              "costs": {"small": {"prefill_s_per_token": 1e-4, "decode_s_per_token": 1e-3},
                        "large": {"prefill_s_per_token": 2e-4, "decode_s_per_token": 2e-3}}}
    path = tmp_path / "router.json"
    path.write_text(json.dumps(config))
    router = cli.build_router(str(path), target="cpu", engine_kwargs={"max_num_batched_tokens": 64}, max_pending=8)
    try:
        assert sorted(router.async_engines) == ["large", "small"] and router.reference == "large"
        assert compiled == [("some-checkpoint", {"target": "cpu", "verbose": False, "weights": "int8"})]
        assert router.engines["large"].max_num_seqs == 4
        assert router.costs["small"] == ModelCost(1e-4, 1e-3)
    finally:
        router.shutdown()
    config["models"]["small"]["weights"] = "int4"  # compile options on an artifact
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="compiled artifact"):
        cli.build_router(str(path), target="cpu", engine_kwargs={}, max_pending=8)


@pytest.mark.parametrize("argv, message", [
    (["serve"], "needs SOURCE"),
    (["serve", "x", "--router", "r.json"], "not both"),
    (["serve", "--router", "missing.json"], "missing.json"),
])
def test_serve_router_errors_are_one_clean_line(argv, message, capsys, tmp_path, monkeypatch):
    from runtime import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cascade_drafts_on_the_cuda_program():
    """The CUDA program checks a cascade draft on the prompt's last chunk (ragged rows, eager) and then decodes with
    CUDA graphs: escalated answers equal the large model's own, as on the cpu target."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU (the cpu target's cascade tests cover the engine logic)")
    from lowering import compile_model
    from lowering.models import llama
    from tests.lowering.helpers import tiny_config

    config = tiny_config(head_dim=16, num_heads=4, hidden_size=64)
    engines = {}
    for name, seed in (("small", 5), ("large", 6)):
        cm = compile_model(llama.build_model(config, seed=seed), target="cuda", block_size=4, max_model_len=128,
                           dtype="float32", progress=False)
        engines[name] = Engine(cm, num_blocks=96, max_num_seqs=4, max_num_batched_tokens=48)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(1, config.vocab_size, n)] for n in (5, 11, 23, 30)]
    params = SamplingParams(max_tokens=16, temperature=0.0)
    want = [o.token_ids for o in engines["large"].generate(prompts, params)]
    own = engines["large"].generate(prompts, params, drafts=want)
    assert [o.token_ids for o in own] == want and all(o.num_accepted_draft_tokens > 0 for o in own)
    router = Router(engines, CascadePolicy("small", "large", threshold=math.inf), default="large", costs=COSTS)
    outs = router.generate(prompts, params)
    assert [o.output.token_ids for o in outs] == want and all(o.route.escalated for o in outs)
