"""Tests of runtime/router_eval.py and `llmc eval-router`: curves, APGR and CPT by hand, task construction,
scoring on a tiny random model against whole sequences, the policy table, CLI errors."""
import json

import numpy as np
import pytest

from runtime import cli
from runtime import router_eval as re_
from runtime.step import window_step
from tests.runtime.test_evaluate import tiny, tiny_tokenizer  # noqa: F401 - tiny is a fixture

# ---------------------------------------------------------------------------------------------
# Curves, APGR, CPT

# 4 items: the strong model alone is right on items 0 and 1, both right on 2, both wrong on 3.
Q_WEAK = [0, 0, 1, 0]
Q_STRONG = [1, 1, 1, 0]
ORACLE = [1, 1, 0, 0]


def metrics(scores, **kw):
    curve = re_.routing_curve(scores, Q_WEAK, Q_STRONG, **kw)
    return curve, re_.policy_metrics(curve, 0.25, 0.75, all_strong_cost=kw.get("cost_strong", [1] * 4)[0])


def test_oracle_curve_apgr_and_cpt():
    curve, m = metrics(ORACLE)
    # two items that gain first, then a tie group of two that gains nothing: (0, .25), (.5, .75), (1, .75)
    assert curve.share.tolist() == [0, 0.5, 1] and curve.quality.tolist() == [0.25, 0.75, 0.75]
    assert m["apgr"] == pytest.approx(0.25 + 0.5)  # PGR 0 -> 1 over [0, .5], then 1
    assert m["gain"] == pytest.approx(0.625 - 0.5) == pytest.approx((m["apgr"] - 0.5) * 0.5)  # area - random's
    assert m["cpt50"]["share"] == pytest.approx(0.25) and m["cpt80"]["share"] == pytest.approx(0.4)
    assert m["cpt100"]["share"] == pytest.approx(0.5)
    assert m["best"] == {"share": 0.5, "quality": 0.75}


def test_random_is_the_straight_line_and_its_expectation():
    curve, m = metrics([0.0] * 4)  # one tie group: the expected curve of random routing
    assert curve.share.tolist() == [0, 1] and m["apgr"] == pytest.approx(0.5)
    assert m["cpt50"]["share"] == pytest.approx(0.5) and m["cpt80"]["share"] == pytest.approx(0.8)
    # random orders of 40 items with a real gap average to APGR 0.5
    rng = np.random.default_rng(0)
    qw, qs = rng.integers(0, 2, 40), rng.integers(0, 2, 40)
    qs[:8], qw[:8] = 1, 0  # make sure the strong model is ahead
    values = [re_.apgr(re_.routing_curve(rng.permutation(40), qw, qs), qw.mean(), qs.mean()) for _ in range(3000)]
    assert np.mean(values) == pytest.approx(0.5, abs=0.01)


def test_ties_give_the_average_over_tie_orders():
    scores = [2.0, 1.0, 1.0, 1.0]  # item 0 first, then items 1-3 together
    want = np.mean([re_.apgr(re_.routing_curve([4, *order], Q_WEAK, Q_STRONG), 0.25, 0.75)
                    for order in ([3, 2, 1], [3, 1, 2], [2, 3, 1], [2, 1, 3], [1, 3, 2], [1, 2, 3])])
    assert re_.apgr(re_.routing_curve(scores, Q_WEAK, Q_STRONG), 0.25, 0.75) == pytest.approx(want)
    curve = re_.routing_curve(scores, Q_WEAK, Q_STRONG)
    assert curve.share.tolist() == [0, 0.25, 1]  # the tie group is one step


def test_a_perfectly_wrong_policy():
    curve, m = metrics([-s for s in ORACLE])  # the useless items first
    assert curve.quality.tolist() == [0.25, 0.25, 0.75]
    assert m["apgr"] == pytest.approx(0.25) and m["gain"] == pytest.approx(-0.125)
    assert m["cpt50"]["share"] == pytest.approx(0.75) and m["cpt80"]["share"] == pytest.approx(0.9)


def test_cpt_never_reached_and_undefined_pgr():
    # the strong model is right only where the weak one also is; a policy that never sends that item
    curve = re_.routing_curve([1, 1, 0], [0, 1, 0], [1, 1, 0])
    assert re_.cpt(curve, 0.5, 1 / 3, 2 / 3) == pytest.approx(0.5 * 2 / 3)
    capped = re_.RoutingCurve(np.array([0, 1.0]), np.array([0.2, 0.3]), np.array([0, 1.0]))
    assert re_.cpt(capped, 0.8, 0.2, 0.5) is None
    with pytest.raises(ValueError, match="not better"):
        re_.apgr(re_.routing_curve([0, 1], [0, 1], [1, 0]), 0.5, 0.5)
    with pytest.raises(ValueError, match="one length"):
        re_.routing_curve([0, 1, 2], [0, 1], [1, 0])


def test_costs_along_the_curve_and_for_a_cascade():
    cw, cs = [1.0] * 4, [3.0] * 4
    curve = re_.routing_curve(ORACLE, Q_WEAK, Q_STRONG, cw, cs)
    assert curve.cost.tolist() == [1, 2, 3]  # half the items cost 3 instead of 1
    m = re_.policy_metrics(curve, 0.25, 0.75, all_strong_cost=3.0)
    assert m["cpt100"]["cost"] == pytest.approx(2.0) and m["cpt100"]["saved"] == pytest.approx(1 / 3)
    assert m["cpt50"]["cost"] == pytest.approx(1.5)
    cascade = re_.routing_curve(ORACLE, Q_WEAK, Q_STRONG, cw, cs, cascade=True)
    assert cascade.cost.tolist() == [1, 2.5, 4]  # the weak model is always paid


# ---------------------------------------------------------------------------------------------
# Tasks


def fake_play(num_speeches: int = 120) -> str:
    rng = np.random.default_rng(5)
    words = "thou art the lord of all my love and yet I fear thy heart doth break upon this night".split()
    out = []
    for s in range(num_speeches):
        out.append(["KING HENRY:", "Second Citizen:", "ROMEO:"][s % 3])
        for _ in range(int(rng.integers(2, 5))):
            out.append(" ".join(rng.choice(words, int(rng.integers(4, 12)))).capitalize() + f" {s},")
        out.append("")
    return "\n".join(out)


def fake_gsm8k(n: int = 30) -> list[dict]:
    return [{"question": f"Ann has {i + 3} apples and buys {2 * i + 1} more. Then she eats 2. How many are left?",
             "answer": f"She has {i + 3} + {2 * i + 1} = <<{i + 3}+{2 * i + 1}={3 * i + 4}>>{3 * i + 4} apples.\n"
                       f"After eating 2: {3 * i + 4} - 2 = {3 * i + 2}.\n#### {3 * i + 2}"} for i in range(n)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    (folder / "tinyshakespeare.txt").write_text(fake_play(), encoding="utf-8")
    with open(folder / "gsm8k_train.jsonl", "w", encoding="utf-8") as f:
        for rec in fake_gsm8k():
            f.write(json.dumps(rec) + "\n")
    return folder


def test_shakespeare_items_are_deterministic_and_well_formed(data_dir):
    text = fake_play()
    lines = text.split("\n")
    items = re_.build_task("shakespeare", 40, seed=3, data_dir=data_dir)
    assert items == re_.build_task("shakespeare", 40, seed=3, data_dir=data_dir)
    assert items != re_.build_task("shakespeare", 40, seed=4, data_dir=data_dir)
    assert len({it.answer for it in items}) == 4  # the true line sits in every position
    for it in items:
        line = int(it.id.split(":")[1]) - 1
        assert it.context == "\n".join(lines[line - 8 : line]) + "\n"
        assert it.choices[it.answer] == lines[line] + "\n" and lines[line - 1].strip()
        assert len(it.choices) == 4 and len(set(it.choices)) == 4
        for c in it.choices:
            assert c.endswith("\n") and abs(len(c) - len(it.choices[it.answer])) <= 3 * max(3, len(c) // 10)
            assert not re_._SPEAKER.match(c.strip())


def test_gsm8k_items_are_deterministic_and_well_formed(data_dir):
    items = re_.build_task("gsm8k", 25, seed=1, data_dir=data_dir)
    assert items == re_.build_task("gsm8k", 25, seed=1, data_dir=data_dir)
    assert len({it.answer for it in items}) > 1
    recs = fake_gsm8k()
    for it in items:
        i = int(it.id.split(":")[1])
        assert it.context.startswith(f"Question: {recs[i]['question']}\nAnswer: She has ")
        assert "<<" not in it.context and "After eating" not in it.context  # the last step is left out
        assert it.context.endswith("apples.\nThe answer is")
        assert it.choices[it.answer] == f" {3 * i + 2}." and len(set(it.choices)) == 4
        assert all(c.startswith(" ") and c.endswith(".") for c in it.choices)


def test_task_errors(data_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        re_.build_task("mmlu", 4, data_dir=data_dir)
    with pytest.raises(ValueError, match="fewer than num_items"):
        re_.build_task("gsm8k", 31, data_dir=data_dir)
    with pytest.raises(FileNotFoundError, match="--data"):
        re_.build_task("shakespeare", 4, data_dir=tmp_path)
    with pytest.raises(ValueError, match="num_items"):
        re_.build_task("gsm8k", 0, data_dir=data_dir)


# ---------------------------------------------------------------------------------------------
# Scoring on a tiny random model


def reference_scores(cm, pairs):
    """Log-probs and entropies (float64) of each (context, continuation) pair, every pair run whole as its own
    sequence of one prefill step (no shared context blocks, no padding)."""
    seqs = [np.asarray(ctx + cont, np.int32) for ctx, cont in pairs]
    num_blocks = sum(-(-len(x) // cm.block_size) for x in seqs)
    program = cm.make_program(num_blocks=num_blocks, max_num_seqs=len(seqs) + 1, max_model_len=64)
    logits = np.asarray(program.step(window_step(seqs, block_size=cm.block_size)), np.float64)
    out, at = [], 0
    for (ctx, cont), seq in zip(pairs, seqs):
        rows = logits[at + len(ctx) - 1 : at + len(seq) - 1]
        at += len(seq)
        logp = rows - rows.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        out.append((logp[np.arange(len(cont)), cont], -(np.exp(logp) * logp).sum(-1)))
    return out


def test_scoring_matches_whole_sequences(tiny):
    _, cm = tiny
    contexts = ["the", "the quick brown fox", "where are you going? into the woods", "a bag of apples and three"]
    items = [re_.ChoiceItem(f"t:{k}", c, (" then", " silver coins", " the dog sleeps in the sun", "!"), k % 4)
             for k, c in enumerate(contexts + contexts[1:3])]
    scores, timing = re_.score_items(cm, items, batch_items=4)  # contexts end mid-block and on block ends
    assert timing["tokens"] > 0 and timing["num_steps"] + timing["num_compiled_steps"] == 4
    pairs = [(ctx, cont) for ctx, conts in (re_.encode_item(cm.tokenizer, it) for it in items) for cont in conts]
    want = iter(reference_scores(cm, pairs))
    for it, s in zip(items, scores):
        ctx, conts = re_.encode_item(cm.tokenizer, it)
        assert s.num_context_tokens == len(ctx) and s.num_tokens() == len(ctx) + sum(map(len, conts))
        for c in range(len(conts)):
            lp, ent = next(want)
            np.testing.assert_allclose(s.token_logprobs[c], lp, atol=2e-4)
            np.testing.assert_allclose(s.token_entropies[c], ent, atol=2e-4)
    s = scores[0]
    assert s.choice() == int(np.argmax([sum(x) for x in s.token_logprobs]))
    p = np.exp(s.sum_logprobs() - s.sum_logprobs().max())
    assert s.max_choice_prob() == pytest.approx(p.max() / p.sum())
    assert s.choice(normalize=True) == int(np.argmax([np.mean(x) for x in s.token_logprobs]))


def test_encode_item_splits_at_the_context():
    tok = tiny_tokenizer()
    ctx, conts = re_.encode_item(tok, re_.ChoiceItem("x", "the quick", (" brown", "er"), 0))
    assert ctx == tok.encode("the quick")
    assert ctx + conts[0] == tok.encode("the quick brown")
    assert conts[1]  # 'k' + 'er' may merge differently; the choice keeps its own tokens either way
    with pytest.raises(ValueError, match="no tokens"):
        re_.encode_item(tok, re_.ChoiceItem("x", "", ("a",), 0))


# ---------------------------------------------------------------------------------------------
# Policies on synthetic scores, the report, the CLI


def synthetic(n: int = 80, seed: int = 0):
    """Items whose weak model is right on 40% and strong on 70%; the weak model is unsure where it is wrong."""
    rng = np.random.default_rng(seed)
    items, weak, strong = [], [], []
    for i in range(n):
        answer = int(rng.integers(0, 4))
        q_w, q_s = rng.random() < 0.4, rng.random() < 0.7
        items.append(re_.ChoiceItem(f"s:{i}", ("hard " if q_s and not q_w else "easy ") * int(rng.integers(1, 4))
                                    + f"question {i}", ("a", "b", "c", "d"), answer))
        for right, out, margin in ((q_w, weak, 3.0 if q_w else 0.3), (q_s, strong, 2.0)):
            pick = answer if right else (answer + 1) % 4
            lps = [[-2.0 - margin * (k != pick), -1.0] for k in range(4)]
            out.append(re_.ItemScores(5, lps, [[1.0, 0.5 + (not right)]] * 4))
    return items, weak, strong


def test_evaluate_policies_table(capsys):
    items, weak, strong = synthetic()
    result = re_.evaluate_policies(items, weak, strong, cost_weak=np.full(80, 1.0), cost_strong=np.full(80, 4.0),
                                   train_fraction=0.5, seed=0, num_random_seeds=20, num_bootstrap=20)
    json.loads(json.dumps(result))
    assert result["num_train"] == 40 and result["num_test"] == 40
    p = result["policies"]
    assert set(p) >= {"random", "random (seeds)", "size", "task classifier", "cascade mean_logprob",
                      "cascade min_logprob", "cascade neg_mean_entropy", "cascade choice max-prob", "oracle"}
    assert p["random"]["apgr"] == pytest.approx(0.5) and p["random"]["gain"] == pytest.approx(0.0, abs=1e-12)
    assert p["oracle"]["gain_std"] > 0 and p["oracle"]["apgr_std"] > 0
    assert abs(p["random (seeds)"]["apgr"] - 0.5) < 0.15 and p["random (seeds)"]["apgr_std"] > 0
    assert p["oracle"]["apgr"] >= max(v["apgr"] for k, v in p.items() if k != "oracle")
    # the weak model's choice probability separates its right and wrong answers here
    assert p["cascade choice max-prob"]["apgr"] > 0.8 and p["cascade choice max-prob"]["cascade"]
    assert p["task classifier"]["apgr"] > 0.6  # 'hard' marks the items only the strong model gets right
    t = result["test"]
    assert t["gap"] == pytest.approx(t["q_strong"] - t["q_weak"]) and t["gap_se"] > 0
    table = re_.format_report({"task": "shakespeare", "num_items": 80, "seed": 0, "models": {
        role: {"source": role, "weights": "float32", "accuracy": 0.5, "accuracy_se": 0.05,
               "accuracy_per_token_mean": 0.5, "cost": {"prefill_s_per_token": 1e-3, "decode_s_per_token": 1e-2},
               "mean_tokens_per_item": 10, "mean_cost_per_item": 0.01} for role in ("weak", "strong")}, **result})
    assert "| oracle |" in table and "| cascade choice max-prob |" in table and "APGR" in table


def test_evaluate_policies_errors():
    items, weak, strong = synthetic(8)
    with pytest.raises(ValueError, match="train_fraction"):
        re_.evaluate_policies(items, weak, strong, cost_weak=np.ones(8), cost_strong=np.ones(8), train_fraction=1.0)
    with pytest.raises(ValueError, match="held-out"):
        re_.evaluate_policies(items, weak, strong, cost_weak=np.ones(8), cost_strong=np.ones(8),
                              train_fraction=0.9)
    same = re_.evaluate_policies(items, weak, weak, cost_weak=np.ones(8), cost_strong=np.ones(8))
    assert "undefined" in same["note"] and same["policies"] == {}


def test_cli_end_to_end_on_an_artifact(tiny, data_dir, tmp_path, capsys):
    _, cm = tiny
    art = tmp_path / "art"
    cm.export(art)
    out = tmp_path / "r.json"
    argv = ["eval-router", "--weak", str(art), "--strong", str(art), "--task", "gsm8k", "--num-items", "12",
            "--data", str(data_dir), "--cache", str(tmp_path / "cache"), "--json", str(out), "--random-seeds", "3"]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["models"]["weak"]["accuracy"] == result["models"]["strong"]["accuracy"]
    assert "undefined" in result["note"] and "undefined" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("router_scores_*.json"))) == 1  # one model, one file
    assert cli.main(argv) == 0  # again, from the cache
    assert "cached scores" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--num-items", "2"], "--num-items must be >= 4"),
    (["--train-fraction", "1"], "--train-fraction must be in [0, 1)"),
    (["--num-items", "8", "--train-fraction", "0.9"], "fewer than 2 of 8 items held out"),
    (["--batch-items", "0"], "--batch-items must be >= 1"),
    (["--data", "/nonexistent/folder"], "pass --data DIR"),
])
def test_cli_eval_router_bad_arguments(capsys, extra, message):
    assert cli.main(["eval-router", "--weak", "w", "--strong", "s", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_eval_router_bad_choices(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval-router", "--weak", "w", "--strong", "s", "--task", "mmlu"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
