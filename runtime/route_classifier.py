"""Task-routing classifier: hashed bag of words + a few dense cues -> softmax regression, in numpy, saved as JSON."""
from __future__ import annotations

import json
import math
import os
import re
import time
import zlib
from typing import Callable, Sequence

import numpy as np

FORMAT = "llmc-route-classifier"
VERSION = 1
DEFAULT_EPOCHS = 100
DENSE_CLIP = 3.0  # standardized dense features are clipped to this many standard deviations
DENSE_FEATURES = ("log_chars", "log_words", "digit_frac", "log_questions", "has_code")
CLASS_WEIGHTS = (None, "balanced")

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_DIGIT_RE = re.compile(r"\d")
_CODE_RE = re.compile(r"```|^\s*(def|class|import|from|#include|function|public|private|select)\b"
                      r"|[{};]\s*$|==|!=|=>|->|\w\(\)", re.MULTILINE | re.IGNORECASE)


def tokenize(text: str) -> list[str]:
    """Lower-cased words (runs of \\w) and single punctuation marks."""
    return _TOKEN_RE.findall(text.lower())


def hashed_features(text: str, num_buckets: int, ngram_max: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Sparse hashed bag of n-grams: sorted bucket ids i64[K] and values f64[K] (log1p tf, L2-normalized)."""
    words = [w.encode("utf-8") for w in tokenize(text)]
    # NOTE: crc32, not hash(): Python salts str hashes per process, so saved weights would not line up.
    # An n-gram's hash is crc32 of its words joined by spaces, computed by extending the (n-1)-gram's crc.
    crcs = [zlib.crc32(w) for w in words]
    hashes = list(crcs)
    for n in range(2, ngram_max + 1):
        crcs = [zlib.crc32(b" " + words[i + n - 1], crc) for i, crc in enumerate(crcs[:len(words) - n + 1])]
        hashes += crcs
    if not hashes:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    idx, counts = np.unique(np.array(hashes, np.int64) % num_buckets, return_counts=True)  # i64[K], i64[K]
    val = np.log1p(counts.astype(np.float64))  # f64[K]
    return idx, val / np.linalg.norm(val)


def dense_features(text: str) -> np.ndarray:
    """Unscaled cues in DENSE_FEATURES order: f64[len(DENSE_FEATURES)]."""
    num_chars = len(text)
    num_digits = len(_DIGIT_RE.findall(text))
    return np.array([
        math.log1p(num_chars),
        math.log1p(len(text.split())),
        num_digits / num_chars if num_chars else 0.0,
        math.log1p(text.count("?")),
        1.0 if _CODE_RE.search(text) else 0.0,
    ], np.float64)


class RouteClassifier:
    """Multinomial logistic regression over `labels` (>= 2 route names, e.g. models cheapest first).

    Features of a prompt: `num_buckets` hashed n-gram buckets (see hashed_features) followed by the
    DENSE_FEATURES, standardized with the training set's mean and std and clipped to +-DENSE_CLIP. Weights W: f64[num_buckets + 5, C],
    bias b: f64[C]. Training minimizes the (sample- and class-weighted) mean cross entropy plus
    l2/2 * |W|^2 with full-batch L-BFGS from zero weights: a convex problem, so the same data gives the
    same weights (seed is recorded; the optimizer itself draws no random numbers).
    """

    def __init__(self, labels: Sequence[str], *, num_buckets: int = 4096, ngram_max: int = 2, l2: float = 1e-3,
                 seed: int = 0, class_weight: str | None = None):
        labels = tuple(labels) if not isinstance(labels, str) else (labels,)
        if len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
            raise ValueError(f"labels must be >= 2 non-empty strings, got {list(labels)!r}")
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels must be distinct, got {list(labels)!r}")
        if not (isinstance(num_buckets, int) and num_buckets >= 1):
            raise ValueError(f"num_buckets must be an integer >= 1, got {num_buckets!r}")
        if not (isinstance(ngram_max, int) and ngram_max >= 1):
            raise ValueError(f"ngram_max must be an integer >= 1, got {ngram_max!r}")
        if not (isinstance(l2, (int, float)) and math.isfinite(l2) and l2 >= 0):
            raise ValueError(f"l2 must be a finite number >= 0, got {l2!r}")
        if class_weight not in CLASS_WEIGHTS:
            raise ValueError(f"class_weight must be one of {CLASS_WEIGHTS}, got {class_weight!r}")
        self.labels = labels
        self.num_buckets, self.ngram_max, self.l2, self.seed = num_buckets, ngram_max, float(l2), int(seed)
        self.class_weight = class_weight
        self.dense_mean = np.zeros(len(DENSE_FEATURES))  # f64[D]
        self.dense_std = np.ones(len(DENSE_FEATURES))  # f64[D]
        self.weights: np.ndarray | None = None  # f64[num_buckets + D, C]
        self.bias: np.ndarray | None = None  # f64[C]
        self.training: dict = {}

    @property
    def num_features(self) -> int:
        return self.num_buckets + len(DENSE_FEATURES)

    # ---- features ----

    def _featurize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """COO rows i64[nnz], cols i64[nnz], vals f64[nnz] of the hashed part, and raw dense f64[N, D]."""
        parts = [hashed_features(t, self.num_buckets, self.ngram_max) for t in texts]
        rows = np.repeat(np.arange(len(parts)), [len(idx) for idx, _ in parts])
        cols = np.concatenate([idx for idx, _ in parts]) if parts else np.zeros(0, np.int64)
        vals = np.concatenate([val for _, val in parts]) if parts else np.zeros(0)
        dense = np.stack([dense_features(t) for t in texts]) if parts else np.zeros((0, len(DENSE_FEATURES)))
        return rows, cols, vals, dense

    def _logits(self, rows, cols, vals, dense_std, num_rows: int, weights, bias) -> np.ndarray:
        """f64[N, C] = X @ W + b for X given as hashed COO + standardized dense f64[N, D]."""
        hashed_w, dense_w = weights[:self.num_buckets], weights[self.num_buckets:]
        z = dense_std @ dense_w + bias  # f64[N, C]
        for c in range(len(self.labels)):
            z[:, c] += np.bincount(rows, weights=vals * hashed_w[cols, c], minlength=num_rows)
        return z

    # ---- training ----

    def fit(self, texts: Sequence[str], labels: Sequence[str], *, epochs: int = DEFAULT_EPOCHS,
            sample_weight: Sequence[float] | None = None) -> "RouteClassifier":
        """Train on texts[i] -> labels[i]; `epochs` = L-BFGS iterations (each one or more full passes)."""
        _check_texts(texts)
        if isinstance(labels, str) or len(labels) != len(texts):
            raise ValueError(f"texts and labels differ in length: {len(texts)} texts, "
                             f"{1 if isinstance(labels, str) else len(labels)} labels")
        if len(texts) == 0:
            raise ValueError("no training examples")
        if not (isinstance(epochs, int) and epochs >= 1):
            raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
        column = {name: c for c, name in enumerate(self.labels)}
        for i, name in enumerate(labels):
            if name not in column:
                raise ValueError(f"labels[{i}] is {name!r}, not one of {list(self.labels)}")
        y = np.array([column[name] for name in labels], np.int64)  # i64[N]
        present = np.unique(y)
        if len(present) < 2:
            raise ValueError(f"training needs >= 2 classes, every example is {self.labels[present[0]]!r}")
        w = self._example_weights(y, sample_weight)  # f64[N], sums to 1

        num_rows, num_classes = len(texts), len(self.labels)
        rows, cols, vals, dense = self._featurize(texts)
        self.dense_mean = dense.mean(axis=0)
        std = dense.std(axis=0)
        self.dense_std = np.where(std > 1e-12, std, 1.0)
        dense_std = self._standardize(dense)  # f64[N, D]
        onehot = np.zeros((num_rows, num_classes))
        onehot[np.arange(num_rows), y] = 1.0
        num_w = self.num_features * num_classes

        def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
            weights, bias = theta[:num_w].reshape(self.num_features, num_classes), theta[num_w:]
            z = self._logits(rows, cols, vals, dense_std, num_rows, weights, bias)
            z -= z.max(axis=1, keepdims=True)
            log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))  # f64[N, C]
            loss = -float(w @ (log_p * onehot).sum(axis=1)) + 0.5 * self.l2 * float(weights.ravel() @ weights.ravel())
            g = (np.exp(log_p) - onehot) * w[:, None]  # f64[N, C]: dloss/dz
            grad_w = np.empty_like(weights)
            for c in range(num_classes):
                grad_w[:self.num_buckets, c] = np.bincount(cols, weights=vals * g[rows, c], minlength=self.num_buckets)
            grad_w[self.num_buckets:] = dense_std.T @ g
            grad_w += self.l2 * weights
            return loss, np.concatenate([grad_w.ravel(), g.sum(axis=0)])

        theta0 = np.zeros(num_w + num_classes)
        theta, loss, num_iters = minimize_lbfgs(loss_and_grad, theta0, max_iters=epochs)
        self.weights = theta[:num_w].reshape(self.num_features, num_classes)
        self.bias = theta[num_w:].copy()
        counts = np.bincount(y, minlength=num_classes)
        self.training = {"num_examples": num_rows, "label_counts": dict(zip(self.labels, counts.tolist())),
                         "epochs": epochs, "iterations": num_iters, "loss": loss}
        return self

    def _example_weights(self, y: np.ndarray, sample_weight) -> np.ndarray:
        """f64[N] normalized to sum 1: sample_weight times, with class_weight="balanced", N / (C * count[y])."""
        if sample_weight is None:
            w = np.ones(len(y))
        else:
            w = np.asarray(sample_weight, np.float64)
            if w.shape != y.shape:
                raise ValueError(f"sample_weight has shape {w.shape}, expected ({len(y)},)")
            if not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
                raise ValueError("sample_weight must be finite, >= 0 and not all 0")
        if self.class_weight == "balanced":
            counts = np.bincount(y, minlength=len(self.labels))
            num_present = int((counts > 0).sum())
            w = w * (len(y) / (num_present * counts[y]))
        return w / w.sum()

    # ---- inference ----

    def _check_fitted(self) -> None:
        if self.weights is None:
            raise ValueError("RouteClassifier is not trained: call fit() or RouteClassifier.load()")

    def _standardize(self, dense: np.ndarray) -> np.ndarray:
        """Dense features in training-set standard units, clipped to +-DENSE_CLIP: a prompt far outside what the
        training set spanned (a length feature the training prompts barely varied on) must not outvote its words."""
        return np.clip((dense - self.dense_mean) / self.dense_std, -DENSE_CLIP, DENSE_CLIP)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """f64[N, C]: the probability of each label (columns in self.labels order) for each text."""
        self._check_fitted()
        _check_texts(texts)
        rows, cols, vals, dense = self._featurize(texts)
        z = self._logits(rows, cols, vals, self._standardize(dense), len(texts), self.weights, self.bias)
        return _softmax(z)

    def predict(self, text: str) -> str:
        """The most probable label of one prompt (ties go to the earlier label)."""
        self._check_fitted()
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        idx, val = hashed_features(text, self.num_buckets, self.ngram_max)
        z = val @ self.weights[idx] + self._standardize(dense_features(text)) @ \
            self.weights[self.num_buckets:] + self.bias  # f64[C]
        return self.labels[int(np.argmax(z))]

    # ---- files ----

    def to_dict(self) -> dict:
        self._check_fitted()
        return {
            "format": FORMAT,
            "version": VERSION,
            "labels": list(self.labels),
            "hyper_parameters": {"num_buckets": self.num_buckets, "ngram_max": self.ngram_max, "l2": self.l2,
                                 "seed": self.seed, "class_weight": self.class_weight},
            "dense_features": list(DENSE_FEATURES),
            "dense_mean": self.dense_mean.tolist(),
            "dense_std": self.dense_std.tolist(),
            "bias": self.bias.tolist(),
            "weights": self.weights.tolist(),  # [num_buckets + len(dense_features)][len(labels)]
            "training": self.training,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write one JSON file (floats as repr, so load gives back the exact same weights)."""
        text = json.dumps(self.to_dict(), allow_nan=False, separators=(",", ":"))
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RouteClassifier":
        """Read a file written by save(); ValueError naming the problem if it is not one."""
        with open(path, "rb") as f:
            raw = f.read()
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a JSON file (not UTF-8 text)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a JSON file ({e})") from None
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, data) -> "RouteClassifier":
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"unknown format {data.get('format')!r}, expected {FORMAT!r}")
        if data.get("version") != VERSION:
            raise ValueError(f"unknown {FORMAT} version {data.get('version')!r}, this llmc reads version {VERSION}")
        for key in ("labels", "hyper_parameters", "dense_features", "dense_mean", "dense_std", "bias", "weights"):
            if key not in data:
                raise ValueError(f"missing key {key!r}")
        hp = data["hyper_parameters"]
        if not isinstance(hp, dict):
            raise ValueError("hyper_parameters is not an object")
        hp_keys = ("num_buckets", "ngram_max", "l2", "seed", "class_weight")
        for key in hp_keys:
            if key not in hp:
                raise ValueError(f"missing key 'hyper_parameters.{key}'")
        if not isinstance(hp["seed"], int):
            raise ValueError(f"hyper_parameters.seed must be an integer, got {hp['seed']!r}")
        if not isinstance(data["labels"], list):
            raise ValueError("labels is not a list")
        if data["dense_features"] != list(DENSE_FEATURES):
            raise ValueError(f"dense_features is {data['dense_features']!r}, this llmc computes {list(DENSE_FEATURES)}")
        model = cls(data["labels"], **{key: hp[key] for key in hp_keys})
        num_classes, num_dense = len(model.labels), len(DENSE_FEATURES)
        model.dense_mean = _array(data, "dense_mean", (num_dense,))
        model.dense_std = _array(data, "dense_std", (num_dense,))
        if np.any(model.dense_std <= 0):
            raise ValueError("dense_std has a value <= 0")
        model.bias = _array(data, "bias", (num_classes,))
        model.weights = _array(data, "weights", (model.num_features, num_classes))
        model.training = data.get("training", {})
        return model


def minimize_lbfgs(fun: Callable[[np.ndarray], tuple[float, np.ndarray]], x0: np.ndarray, *, max_iters: int,
                   history: int = 10, gtol: float = 1e-7) -> tuple[np.ndarray, float, int]:
    """Minimize a smooth function with L-BFGS and a backtracking (Armijo) line search.

    `fun(x)` returns (loss, grad f64[P]). Deterministic: no randomness, fixed iteration cap.
    Returns (x, loss, number of iterations run).
    """
    x = x0.copy()
    loss, grad = fun(x)
    s_hist: list[np.ndarray] = []
    y_hist: list[np.ndarray] = []
    for it in range(max_iters):
        if float(np.abs(grad).max()) < gtol:
            return x, loss, it
        # two-loop recursion: direction = -H @ grad
        q = grad.copy()
        alphas = []
        for s, y in zip(reversed(s_hist), reversed(y_hist)):
            a = (s @ q) / (y @ s)
            alphas.append(a)
            q -= a * y
        if s_hist:
            q *= (s_hist[-1] @ y_hist[-1]) / (y_hist[-1] @ y_hist[-1])
        else:
            q /= max(1.0, float(np.linalg.norm(grad)))
        for (s, y), a in zip(zip(s_hist, y_hist), reversed(alphas)):
            q += (a - (y @ q) / (y @ s)) * s
        direction = -q
        slope = float(grad @ direction)
        if slope >= 0:  # not a descent direction: restart from steepest descent
            s_hist.clear()
            y_hist.clear()
            direction, slope = -grad, -float(grad @ grad)
        step = 1.0
        for _ in range(40):
            new_x = x + step * direction
            new_loss, new_grad = fun(new_x)
            if new_loss <= loss + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            return x, loss, it  # no decrease possible at float precision: converged
        s, y = new_x - x, new_grad - grad
        if s @ y > 1e-12:
            s_hist.append(s)
            y_hist.append(y)
            if len(s_hist) > history:
                del s_hist[0], y_hist[0]
        x, loss, grad = new_x, new_loss, new_grad
    return x, loss, max_iters


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _check_texts(texts) -> None:
    if isinstance(texts, str):
        raise ValueError("texts must be a sequence of strings, got one str (use predict() for one prompt)")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"texts[{i}] is a {type(t).__name__}, expected str")


def _array(data: dict, key: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        a = np.array(data[key], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{key} is not an array of numbers") from None
    if a.shape != shape:
        raise ValueError(f"{key} has shape {a.shape}, expected {shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{key} has non-finite values")
    return a


# ---- `llmc train-router` ----

def read_examples(path: str | os.PathLike, labels: Sequence[str] | None = None) -> tuple[list[str], list[str],
                                                                                          tuple[str, ...]]:
    """Read JSONL lines {"prompt", "label"} or {"prompt", "scores": {model: quality}} -> (texts, labels, label set).

    A scores line is labeled with the first model in `labels` order (cheapest first) whose score is the
    line's maximum, so `labels` is required for such lines. Without `labels`, the label set is the sorted
    set of labels the file names. ValueError naming the line for anything malformed.
    """
    known = tuple(labels) if labels is not None else None
    texts, names, score_lines = [], [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(item, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
            if not isinstance(item.get("prompt"), str):
                raise ValueError(f"{where}: missing string field 'prompt'")
            if "label" in item:
                if not isinstance(item["label"], str):
                    raise ValueError(f"{where}: 'label' must be a string, got {item['label']!r}")
                if known is not None and item["label"] not in known:
                    raise ValueError(f"{where}: unknown label {item['label']!r}, --labels are {list(known)}")
                names.append(item["label"])
            elif "scores" in item:
                names.append(_label_from_scores(item["scores"], known, where))
                score_lines.append(line_no)
            else:
                raise ValueError(f"{where}: needs a 'label' or a 'scores' field")
            texts.append(item["prompt"])
    if not texts:
        raise ValueError(f"{path}: no examples")
    if known is None and len(set(names)) < 2:
        raise ValueError(f"{path}: every example is labeled {names[0]!r}; routing needs >= 2 labels")
    return texts, names, known if known is not None else tuple(sorted(set(names)))


def _label_from_scores(scores, known: tuple[str, ...] | None, where: str) -> str:
    if known is None:
        raise ValueError(f"{where}: a 'scores' line needs --labels (the models, cheapest first) to break ties")
    if not isinstance(scores, dict) or not scores:
        raise ValueError(f"{where}: 'scores' must be a non-empty object {{model: quality}}")
    for name, value in scores.items():
        if name not in known:
            raise ValueError(f"{where}: unknown model {name!r} in 'scores', --labels are {list(known)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: score of {name!r} must be a finite number, got {value!r}")
    missing = [name for name in known if name not in scores]
    if missing:
        raise ValueError(f"{where}: 'scores' lacks {missing[0]!r}")
    best = max(scores.values())
    return next(name for name in known if scores[name] == best)


def split_indices(labels: Sequence[str], test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified shuffle split: round(test_fraction * count) of each label's examples go to test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    by_label: dict[str, list[int]] = {}
    for i, name in enumerate(labels):
        by_label.setdefault(name, []).append(i)
    for name in sorted(by_label):
        idx = np.array(by_label[name])[rng.permutation(len(by_label[name]))]
        num_test = int(round(test_fraction * len(idx)))
        test.append(idx[:num_test])
        train.append(idx[num_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def train_router(data: str | os.PathLike, output: str | os.PathLike, *, labels: Sequence[str] | None = None,
                 test_fraction: float = 0.2, seed: int = 0, epochs: int = DEFAULT_EPOCHS, l2: float = 1e-3,
                 balanced: bool = False) -> dict:
    """Read `data`, split, fit on the train part, measure accuracy and predict latency, save to `output`."""
    texts, names, label_set = read_examples(data, labels)
    train, test = split_indices(names, test_fraction, seed)
    model = RouteClassifier(label_set, l2=l2, seed=seed, class_weight="balanced" if balanced else None)
    model.fit([texts[i] for i in train], [names[i] for i in train], epochs=epochs)

    def accuracy(idx: np.ndarray) -> float | None:
        if len(idx) == 0:
            return None
        pred = np.argmax(model.predict_proba([texts[i] for i in idx]), axis=1)
        return float(np.mean([model.labels[p] == names[i] for p, i in zip(pred, idx)]))

    timed = [texts[i] for i in (test if len(test) else train)[:200]]
    model.predict(timed[0])  # warm-up
    start = time.perf_counter()
    for t in timed:
        model.predict(t)
    latency_ms = (time.perf_counter() - start) * 1e3 / len(timed)
    model.save(output)
    counts = {name: [int(sum(names[i] == name for i in idx)) for idx in (train, test)] for name in model.labels}
    return {"data": str(data), "output": str(output), "labels": list(model.labels), "num_train": len(train),
            "num_test": len(test), "train_accuracy": accuracy(train), "test_accuracy": accuracy(test),
            "label_counts": counts, "iterations": model.training["iterations"],
            "predict_ms": latency_ms, "num_timed": len(timed)}


def format_report(result: dict) -> str:
    """The train-router summary: split sizes, per-label counts, accuracy, predict latency."""
    width = max(5, *(len(name) for name in result["labels"]))
    lines = [f"examples: {result['num_train']} train, {result['num_test']} test ({result['data']})",
             f"{'label':<{width}}  {'train':>6}  {'test':>6}"]
    lines += [f"{name:<{width}}  {train:>6}  {test:>6}" for name, (train, test) in result["label_counts"].items()]
    test_acc = "n/a" if result["test_accuracy"] is None else f"{result['test_accuracy']:.3f}"
    lines.append(f"accuracy: train {result['train_accuracy']:.3f}, test {test_acc} "
                 f"({result['iterations']} L-BFGS iterations)")
    lines.append(f"predict latency: {result['predict_ms']:.3f} ms mean over {result['num_timed']} prompts")
    lines.append(f"wrote {result['output']}")
    return "\n".join(lines)
