"""Tests of runtime/route_classifier.py: learning, determinism, the JSON file, errors, `llmc train-router`."""
import json
import random

import numpy as np
import pytest

from runtime import cli
from runtime.route_classifier import RouteClassifier, dense_features, hashed_features, read_examples

MATH = ["integral", "derivative", "solve", "equation", "prove", "theorem", "matrix", "probability", "polynomial"]
CHAT = ["hello", "thanks", "weather", "favorite", "movie", "weekend", "friend", "coffee", "music"]
FILLER = ["the", "a", "please", "can", "you", "what", "is", "my", "tell", "me", "about", "how", "do", "i"]


def make_task(num_examples: int, seed: int) -> tuple[list[str], list[str]]:
    """Prompts with two math words -> "large", with two chit-chat words -> "small", in random filler."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(num_examples):
        large = rng.random() < 0.5
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
        words += [rng.choice(MATH if large else CHAT) for _ in range(2)]
        rng.shuffle(words)
        texts.append(" ".join(words) + rng.choice(["?", "."]))
        labels.append("large" if large else "small")
    return texts, labels


@pytest.fixture(scope="module")
def trained() -> RouteClassifier:
    return RouteClassifier(["small", "large"]).fit(*make_task(300, seed=0))


def test_learns_a_separable_task(trained):
    texts, labels = make_task(200, seed=1)
    probs = trained.predict_proba(texts)  # f64[200, 2]
    assert probs.shape == (200, 2) and np.allclose(probs.sum(axis=1), 1.0)
    predicted = [trained.labels[i] for i in probs.argmax(axis=1)]
    assert np.mean([p == y for p, y in zip(predicted, labels)]) >= 0.95
    assert [trained.predict(t) for t in texts] == predicted
    assert trained.predict("please solve this equation and prove the theorem") == "large"
    assert trained.predict("hello, how was your weekend with your friend?") == "small"


def test_fit_is_deterministic(trained):
    again = RouteClassifier(["small", "large"]).fit(*make_task(300, seed=0))
    assert np.array_equal(again.weights, trained.weights) and np.array_equal(again.bias, trained.bias)
    assert trained.weights.shape == (4096 + 5, 2)


def test_save_load_round_trip(trained, tmp_path):
    path = tmp_path / "router.json"
    trained.save(path)
    data = json.loads(path.read_text())
    assert (data["format"], data["version"], data["labels"]) == ("llmc-route-classifier", 1, ["small", "large"])
    loaded = RouteClassifier.load(path)
    texts, _ = make_task(50, seed=2)
    assert np.array_equal(loaded.predict_proba(texts), trained.predict_proba(texts))
    assert (loaded.labels, loaded.num_buckets, loaded.ngram_max, loaded.l2) == (trained.labels, 4096, 2, 1e-3)


def _set(data, key, value):
    data[key] = value


@pytest.mark.parametrize("corrupt, message", [
    (lambda d: _set(d, "format", "pickle"), "unknown format 'pickle'"),
    (lambda d: _set(d, "version", 2), "unknown llmc-route-classifier version 2"),
    (lambda d: d.pop("weights"), "missing key 'weights'"),
    (lambda d: d["hyper_parameters"].pop("l2"), "missing key 'hyper_parameters.l2'"),
    (lambda d: _set(d, "weights", d["weights"][:-1]), r"weights has shape \(4100, 2\), expected \(4101, 2\)"),
    (lambda d: _set(d, "bias", [0.0, float("nan")]), "bias has non-finite values"),
    (lambda d: _set(d, "dense_std", [1.0, 1.0, 1.0, 1.0, "x"]), "dense_std is not an array of numbers"),
    (lambda d: _set(d, "labels", ["small"]), "labels must be >= 2"),
    (lambda d: _set(d, "dense_features", ["log_chars"]), "dense_features is"),
])
def test_bad_files_raise_value_error_naming_the_problem(trained, tmp_path, corrupt, message):
    data = trained.to_dict()
    corrupt(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))  # NaN is written as the non-standard token NaN, which json.loads accepts
    with pytest.raises(ValueError, match=message):
        RouteClassifier.load(path)


def test_a_file_that_is_not_json(tmp_path):
    path = tmp_path / "router.json"
    path.write_bytes(b"\x80\x03}q\x00.")  # the start of a pickle
    with pytest.raises(ValueError, match="not a JSON file"):
        RouteClassifier.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        RouteClassifier.load(path)


@pytest.mark.parametrize("texts, labels, message", [
    (["a b", "c d"], ["small", "medium"], r"labels\[1\] is 'medium', not one of \['small', 'large'\]"),
    ([], [], "no training examples"),
    (["a", "b", "c"], ["small", "large"], "3 texts, 2 labels"),
    (["a", "b"], ["small", "small"], "needs >= 2 classes, every example is 'small'"),
    (["a", 7], ["small", "large"], r"texts\[1\] is a int, expected str"),
    ("ab", ["small", "large"], "got one str"),
])
def test_fit_errors(texts, labels, message):
    with pytest.raises(ValueError, match=message):
        RouteClassifier(["small", "large"]).fit(texts, labels)


def test_untrained_and_bad_constructor_arguments():
    with pytest.raises(ValueError, match="not trained"):
        RouteClassifier(["small", "large"]).predict("hi")
    with pytest.raises(ValueError, match="distinct"):
        RouteClassifier(["small", "small"])
    with pytest.raises(ValueError, match="class_weight"):
        RouteClassifier(["small", "large"], class_weight="auto")


def test_balanced_class_weights_change_the_decision():
    # "gamma" is 70 times small and 30 times large; 100 more examples are plainly small.
    texts = ["gamma"] * 100 + ["hello there"] * 100
    labels = ["small"] * 70 + ["large"] * 30 + ["small"] * 100
    plain = RouteClassifier(["small", "large"]).fit(texts, labels)
    balanced = RouteClassifier(["small", "large"], class_weight="balanced").fit(texts, labels)
    assert plain.predict("gamma") == "small" and balanced.predict("gamma") == "large"
    # balanced = sample weights N / (num_classes * count[label])
    weights = [200 / (2 * (170 if y == "small" else 30)) for y in labels]
    weighted = RouteClassifier(["small", "large"]).fit(texts, labels, sample_weight=weights)
    assert np.allclose(weighted.weights, balanced.weights, atol=1e-9)


def test_hashing_is_stable_across_processes():
    # Computed once and written down: crc32 is the same in every process (Python's hash() is not).
    idx, val = hashed_features("What is 2 plus 2?", num_buckets=4096, ngram_max=2)
    assert idx.tolist() == [241, 371, 610, 663, 688, 850, 1214, 1451, 2028, 3597]
    # 10 n-grams in 10 buckets; "2" occurs twice (log1p(2) vs log1p(1) before L2 normalization)
    expected = np.full(10, np.log1p(1.0))
    expected[9] = np.log1p(2.0)
    assert np.allclose(val, expected / np.linalg.norm(expected))
    assert hashed_features("", 4096)[0].size == 0


def test_dense_features_see_code_digits_and_questions():
    code = dense_features("def f(x):\n    return x == 1\n")
    chat = dense_features("How are you? Fine?")
    assert code[4] == 1.0 and chat[4] == 0.0
    assert code[2] == pytest.approx(1 / 28) and chat[3] == pytest.approx(np.log1p(2))


# ---- llmc train-router ----

def write_jsonl(path, items):
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items))
    return str(path)


def test_train_router_writes_a_classifier(tmp_path, capsys):
    texts, labels = make_task(200, seed=3)
    items = [{"prompt": t, "label": y} if i % 2 else
             {"prompt": t, "scores": {"small": float(y == "small"), "large": 1.0}}
             for i, (t, y) in enumerate(zip(texts, labels))]
    data, out = write_jsonl(tmp_path / "data.jsonl", items), str(tmp_path / "router.json")
    assert cli.main(["train-router", "--data", data, "-o", out, "--labels", "small,large", "--balanced"]) == 0
    report = capsys.readouterr().out
    num_small = labels.count("small")
    assert "examples: 160 train, 40 test" in report and "predict latency:" in report and f"wrote {out}" in report
    assert f"small  {num_small - round(0.2 * num_small):>6}  {round(0.2 * num_small):>6}" in report
    router = RouteClassifier.load(out)
    assert router.labels == ("small", "large") and router.class_weight == "balanced"
    assert router.predict("prove this theorem about the matrix") == "large"


def test_scores_lines_go_to_the_cheapest_best_model(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "scores": {"large": 1.0, "small": 1.0}},
                                              {"prompt": "b", "scores": {"large": 0.9, "small": 0.5}},
                                              {"prompt": "c", "label": "small"}])
    assert read_examples(path, ["small", "large"]) == (["a", "b", "c"], ["small", "large", "small"],
                                                       ("small", "large"))


@pytest.mark.parametrize("lines, extra, message", [
    (['{"prompt": "a", "label": "small"}', '{"prompt": "b", "label": '], [], ":2: not valid JSON"),
    (['{"label": "small"}'], [], ":1: missing string field 'prompt'"),
    (['{"prompt": "a"}'], [], ":1: needs a 'label' or a 'scores' field"),
    (['{"prompt": "a", "label": "huge"}'], ["--labels", "small,large"], ":1: unknown label 'huge'"),
    (['{"prompt": "a", "scores": {"small": 1}}'], [], ":1: a 'scores' line needs --labels"),
    (['{"prompt": "a", "scores": {"small": 1, "xl": 2}}'], ["--labels", "small,large"], "unknown model 'xl'"),
    (['{"prompt": "a", "label": "small"}'], [], "every example is labeled 'small'; routing needs >= 2 labels"),
    (['{"prompt": "a", "label": "small"}'], ["--labels", "small,large"], "needs >= 2 classes"),
    ([], [], "no examples"),
    (['{"prompt": "a", "label": "small"}'], ["--test-fraction", "1"], "--test-fraction must be in [0, 1)"),
])
def test_train_router_bad_input_exits_2_with_one_line(tmp_path, capsys, lines, extra, message):
    data = write_jsonl(tmp_path / "data.jsonl", lines)
    assert cli.main(["train-router", "--data", data, "-o", str(tmp_path / "r.json"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmc: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "r.json").exists()


def test_train_router_missing_file(tmp_path, capsys):
    assert cli.main(["train-router", "--data", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "r.json")]) == 2
    assert capsys.readouterr().err == f"llmc: error: No such file or directory: {tmp_path / 'none.jsonl'}\n"
