"""Trained draft heads for speculative decoding: Medusa heads and an EAGLE-style (chain) draft head.

Both read the target's *features*: the final-norm hidden state h_t at position t (the lm_head's input,
which the lm_head turns into the token at t+1). The target's lm_head (and, for EAGLE, its embedding table)
is frozen and shared; only the heads' own weights are trained and saved.

Medusa (Cai et al. 2024)   K heads; head i (1..K) maps h_t to the token at t+1+i:
                           h_i = h + silu(W_i h + b_i) (W_i starts at zero), logits_i = lm_head(h_i).
EAGLE (Li et al. 2024)     one decoder layer over the sequence of (embedding of token t+1, feature f_t):
                           x_t = fc([E(x_{t+1}); f_t]) -> decoder layer (causal, its own K/V cache)
                           -> f^_{t+1} -> lm_head -> token t+2. Drafting runs it autoregressively, feeding
                           its own predicted feature and drafted token back (a chain).

Training data are the target's own greedy generations (runtime Engine) on prompts of GSM8K train and the
odd-id MT-Bench questions (the benchmark holds out GSM8K lines from the end and even ids), teacher-forced
once through `LlamaForCausalLM.hidden_states` to get the features.

Saved heads are a directory: config.json (method, sizes, a fingerprint of the target) and weights.npz
(loaded with allow_pickle=False). `make_head_proposer` builds the runtime Proposer
(runtime/speculative.py) from such a directory and the target's parameters.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from runtime.sampler import draw_token, sampling_weights

__all__ = ["HEAD_METHODS", "DraftHeads", "target_fingerprint", "init_medusa", "init_eagle", "save_heads",
           "load_heads", "MedusaProposer", "EagleProposer", "make_head_proposer", "lm_head_of",
           "TrainingSet", "load_prompts", "generate_sequences", "compute_features", "build_training_set",
           "train_medusa", "train_eagle", "evaluate_heads", "simulate_acceptance", "train_draft_heads"]

HEAD_METHODS = ("medusa", "eagle")
FORMAT = "llmc-draft-heads"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.npz"
MAX_DRAFT = 16  # the longest chain an EagleProposer drafts by default (lowering.speculation.MAX_NUM_TOKENS)


# ---------------------------------------------------------------------------------------------
# Heads: parameters, target fingerprint, save / load


@dataclasses.dataclass
class DraftHeads:
    """Trained draft heads: `params` maps names to float32 arrays; `config` is JSON (see save_heads)."""

    method: str
    config: dict[str, Any]
    params: dict[str, np.ndarray]

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def num_heads(self) -> int:  # Medusa: K heads; EAGLE: 1
        return int(self.config.get("num_heads", 1))

    def check_target(self, config, embed: np.ndarray) -> None:
        """ValueError unless these heads were trained for this target (config + embedding table)."""
        want = self.config.get("target") or {}
        have = target_fingerprint(config, embed)
        diff = [k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
        if diff:
            detail = ", ".join(f"{k}: heads {want.get(k)!r} vs target {have.get(k)!r}" for k in diff[:3])
            raise ValueError(f"these {self.method} heads were trained for a different target model ({detail}); "
                             f"train heads for this model with `llmc train-draft`")


def target_fingerprint(config, embed: np.ndarray) -> dict[str, Any]:
    """What identifies a target for its heads: sizes and a sha256 of the first 2048 embedding values, rounded
    to bfloat16 first so that a float32 and a bfloat16 compilation of one checkpoint match."""
    import ml_dtypes

    flat = np.asarray(embed).reshape(-1)[:2048]
    data = np.ascontiguousarray(np.asarray(flat, np.float32).astype(ml_dtypes.bfloat16)).tobytes()
    return {"vocab_size": int(config.vocab_size), "hidden_size": int(config.hidden_size),
            "num_layers": int(config.num_layers), "embed_sha256": hashlib.sha256(data).hexdigest()}


def _eagle_layer_config(config) -> dict[str, Any]:
    return {"num_heads": int(config.num_heads), "num_kv_heads": int(config.num_kv_heads),
            "head_dim": int(config.head_dim), "intermediate_size": int(config.intermediate_size),
            "rms_norm_eps": float(config.rms_norm_eps), "rope_theta": float(config.rope_theta),
            "rope_scaling": config.rope_scaling}


def _expected_shapes(method: str, cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    d = int(cfg["hidden_size"])
    if method == "medusa":
        k = int(cfg["num_heads"])
        return {"weight": (k, d, d), "bias": (k, d)}
    lay = cfg["layer"]
    hq, hkv, dh, inter = (int(lay[n]) for n in ("num_heads", "num_kv_heads", "head_dim", "intermediate_size"))
    return {"fc.weight": (d, 2 * d), "fc.bias": (d,),
            "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
            "q_proj.weight": (hq * dh, d), "k_proj.weight": (hkv * dh, d), "v_proj.weight": (hkv * dh, d),
            "o_proj.weight": (d, hq * dh), "gate_proj.weight": (inter, d), "up_proj.weight": (inter, d),
            "down_proj.weight": (d, inter)}


def _heads_config(method: str, model_config, embed: np.ndarray, **extra) -> dict[str, Any]:
    cfg = {"format": FORMAT, "version": FORMAT_VERSION, "method": method,
           "hidden_size": int(model_config.hidden_size), "vocab_size": int(model_config.vocab_size),
           "target": target_fingerprint(model_config, embed)}
    if method == "eagle":
        cfg["layer"] = _eagle_layer_config(model_config)
        cfg["num_heads"] = 1
    cfg.update(extra)
    return cfg


def init_medusa(model_config, embed: np.ndarray, num_heads: int = 4, *, seed: int = 0) -> DraftHeads:
    """K Medusa heads; W starts at zero (each head starts as the identity), b small random."""
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or not 1 <= num_heads <= 16:
        raise ValueError(f"num_heads must be an integer in [1, 16], got {num_heads!r}")
    d = int(model_config.hidden_size)
    cfg = _heads_config("medusa", model_config, embed, num_heads=num_heads)
    params = {"weight": np.zeros((num_heads, d, d), np.float32), "bias": np.zeros((num_heads, d), np.float32)}
    return DraftHeads("medusa", cfg, params)


def init_eagle(model_config, embed: np.ndarray, *, seed: int = 0) -> DraftHeads:
    """An EAGLE head: fc starts as [small random | identity] (so x_t ~ f_t) and the layer's output projections
    start small, so the initial prediction is f^_{t+1} ~ f_t."""
    cfg = _heads_config("eagle", model_config, embed)
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in _expected_shapes("eagle", cfg).items():
        if name.endswith("layernorm.weight"):
            params[name] = np.ones(shape, np.float32)
        elif name == "fc.bias":
            params[name] = np.zeros(shape, np.float32)
        else:
            fan_in = shape[1]
            scale = 1.0 / math.sqrt(fan_in)
            if name in ("o_proj.weight", "down_proj.weight"):
                scale *= 0.1
            params[name] = rng.uniform(-scale, scale, shape).astype(np.float32)
    d = cfg["hidden_size"]
    params["fc.weight"][:, :d] *= 0.1
    params["fc.weight"][:, d:] = np.eye(d, dtype=np.float32)
    return DraftHeads("eagle", cfg, params)


def save_heads(path: str, heads: DraftHeads) -> None:
    """Write path/config.json and path/weights.npz (no pickles)."""
    _validate(heads.method, heads.config, heads.params)
    os.makedirs(path, exist_ok=True)
    arrays = {name: np.ascontiguousarray(np.asarray(value, np.float32)) for name, value in heads.params.items()}
    tmp = os.path.join(path, WEIGHTS_FILE + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, os.path.join(path, WEIGHTS_FILE))
    with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(heads.config, f, indent=2, sort_keys=True)
        f.write("\n")


def load_heads(path: str) -> DraftHeads:
    """Read a directory save_heads wrote; any problem is a ValueError naming it."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise ValueError(f"draft heads directory {path!r} does not exist (write one with `llmc train-draft`)")
    cfg_path, w_path = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise ValueError(f"draft heads directory {path!r} has no {os.path.basename(p)}")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path}: not a valid JSON file ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: not a draft-heads config (format must be {FORMAT!r})")
    if cfg.get("version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: unsupported draft-heads version {cfg.get('version')!r}")
    method = cfg.get("method")
    try:
        with np.load(w_path, allow_pickle=False) as npz:
            params = {name: np.asarray(npz[name]) for name in npz.files}
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: say which
        raise ValueError(f"{w_path}: cannot read the weights ({type(e).__name__}: {e})") from None
    _validate(method, cfg, params)
    return DraftHeads(method, cfg, {k: v.astype(np.float32) for k, v in params.items()})


def _validate(method: Any, cfg: dict, params: dict) -> None:
    if method not in HEAD_METHODS:
        raise ValueError(f"unknown draft-head method {method!r}; expected one of {', '.join(HEAD_METHODS)}")
    for key in ("hidden_size", "vocab_size"):
        v = cfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"draft-heads config: {key} must be a positive integer, got {v!r}")
    if method == "medusa":
        k = cfg.get("num_heads")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
            raise ValueError(f"draft-heads config: num_heads must be an integer in [1, 16], got {k!r}")
    else:
        lay = cfg.get("layer")
        keys = ("num_heads", "num_kv_heads", "head_dim", "intermediate_size")
        if not isinstance(lay, dict) or not all(isinstance(lay.get(n), int) and lay[n] > 0 for n in keys) \
                or lay["num_heads"] % lay["num_kv_heads"] or lay["head_dim"] % 2:
            raise ValueError(f"draft-heads config: bad EAGLE layer description {lay!r}")
        for n in ("rms_norm_eps", "rope_theta"):
            if not isinstance(lay.get(n), (int, float)) or not lay[n] > 0:
                raise ValueError(f"draft-heads config: EAGLE layer {n} must be a positive number, got {lay.get(n)!r}")
        if lay.get("rope_scaling") is not None and not isinstance(lay["rope_scaling"], dict):
            raise ValueError("draft-heads config: EAGLE layer rope_scaling must be a dict or null")
    if not isinstance(cfg.get("target"), dict):
        raise ValueError("draft-heads config has no target fingerprint")
    expected = _expected_shapes(method, cfg)
    missing, extra = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
    if missing or extra:
        raise ValueError(f"{method} heads: weights do not match the config (missing {missing[:3]}, "
                         f"unexpected {extra[:3]})")
    for name, shape in expected.items():
        value = params[name]
        if tuple(np.shape(value)) != shape:
            raise ValueError(f"{method} heads: {name} has shape {tuple(np.shape(value))}, the config implies {shape}")
        if not np.issubdtype(np.asarray(value).dtype, np.floating):
            raise ValueError(f"{method} heads: {name} has dtype {np.asarray(value).dtype}, expected floats")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{method} heads: {name} has non-finite values")


def lm_head_of(target_params: dict, config) -> tuple[np.ndarray, np.ndarray]:
    """(embedding table f32[V, D], lm_head f32[V, D]) from HF-named target parameters."""
    name = "model.embed_tokens.weight"
    if name not in target_params:
        raise ValueError(f"draft heads need the target's {name} as a plain array; this model's parameters do not "
                         f"have it (quantized embeddings, e.g. weights='gguf', are not supported)")
    embed = np.asarray(target_params[name], np.float32)
    if config.tie_word_embeddings:
        head = embed
    elif "lm_head.weight" in target_params:
        head = np.asarray(target_params["lm_head.weight"], np.float32)
    else:
        raise ValueError("draft heads need the target's lm_head.weight as a plain array; this model's parameters "
                         "do not have it (a quantized lm_head is not supported)")
    want = (int(config.vocab_size), int(config.hidden_size))
    if embed.shape != want or head.shape != want:
        raise ValueError(f"target embedding {embed.shape} / lm_head {head.shape} do not match the config {want}")
    return embed, head


# ---------------------------------------------------------------------------------------------
# JAX forwards (pure functions of param dicts)


def _bucket(n: int, minimum: int = 1) -> int:
    """Padded size: powers of two, so only a few shapes are ever compiled."""
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


def _medusa_hidden(params, h):
    """h f32[B, D] -> f32[B, K, D]: h + silu(W_i h + b_i) for each head."""
    import jax
    import jax.numpy as jnp

    z = jnp.einsum("bd,ked->bke", h, params["weight"]) + params["bias"][None]
    return h[:, None, :] + jax.nn.silu(z)


def _rms(x, w, eps):
    import jax.numpy as jnp

    var = jnp.mean(x * x, axis=-1, keepdims=True)
    return x * (1.0 / jnp.sqrt(var + eps)) * w


def _rope(x, positions, lay, num_heads):
    """x [..., H*Dh] with positions i32[...] -> rotated (Hugging Face rotate-half)."""
    from lowering import ops

    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    cos, sin = ops.rope_tables(positions.reshape(-1), flat.dtype, head_dim=lay["head_dim"], theta=lay["rope_theta"],
                               rope_scaling=lay.get("rope_scaling"))
    return ops.rotate_with_tables(flat, cos, sin, num_heads=num_heads, head_dim=lay["head_dim"]).reshape(shape)


def _eagle_inputs(params, embed, tokens, feats):
    """fc([E(token); feature]): tokens i32[B, Q], feats f32[B, Q, D] -> f32[B, Q, D]."""
    import jax.numpy as jnp

    e = jnp.take(embed, tokens, axis=0)
    x = jnp.concatenate([e, feats], axis=-1)
    return x @ params["fc.weight"].T + params["fc.bias"]


def _eagle_layer(params, lay, x, positions, ctx_k=None, ctx_v=None, ctx_len=None):
    """The head's decoder layer. x f32[B, Q, D] at positions i32[B, Q].

    Without a cache (training): causal attention over the Q rows themselves (padded rows sit at the end).
    With a cache ctx_k/ctx_v f32[B, C, Hkv*Dh] holding ctx_len[b] entries: row q's K/V are written at index
    ctx_len[b] + q and it attends to indices <= that. Returns (out f32[B, Q, D], ctx_k, ctx_v).
    """
    import jax
    import jax.numpy as jnp

    hq, hkv, dh = lay["num_heads"], lay["num_kv_heads"], lay["head_dim"]
    eps = lay["rms_norm_eps"]
    b, q_len, _ = x.shape
    h = _rms(x, params["input_layernorm.weight"], eps)
    q = _rope(h @ params["q_proj.weight"].T, positions, lay, hq)
    k = _rope(h @ params["k_proj.weight"].T, positions, lay, hkv)
    v = h @ params["v_proj.weight"].T
    if ctx_k is None:
        keys, values = k, v
        limit = jnp.broadcast_to(jnp.arange(q_len)[None, :], (b, q_len))  # row q sees keys <= q
    else:
        write = jax.vmap(lambda pool, new, at: jax.lax.dynamic_update_slice(pool, new, (at, 0)))
        ctx_k = write(ctx_k, k.astype(ctx_k.dtype), ctx_len)
        ctx_v = write(ctx_v, v.astype(ctx_v.dtype), ctx_len)
        keys, values = ctx_k, ctx_v
        limit = ctx_len[:, None] + jnp.arange(q_len)[None, :]
    c = keys.shape[1]
    g = hq // hkv
    qh = q.reshape(b, q_len, hkv, g, dh)
    kh = keys.reshape(b, c, hkv, dh)
    vh = values.reshape(b, c, hkv, dh)
    scores = jnp.einsum("bqkgd,bckd->bkgqc", qh, kh) / math.sqrt(dh)
    mask = jnp.arange(c)[None, None, :] <= limit[:, :, None]  # [B, Q, C]
    scores = jnp.where(mask[:, None, None], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum("bkgqc,bckd->bqkgd", probs, vh).reshape(b, q_len, hq * dh)
    x = x + o @ params["o_proj.weight"].T
    h = _rms(x, params["post_attention_layernorm.weight"], eps)
    x = x + (jax.nn.silu(h @ params["gate_proj.weight"].T) * (h @ params["up_proj.weight"].T)) @ params["down_proj.weight"].T
    return x, ctx_k, ctx_v


# ---------------------------------------------------------------------------------------------
# Proposers


_JIT_CACHE: dict[Any, Any] = {}


def _medusa_fns():
    """(logits(params, lm, h f32[B, D]) -> f32[B, K, V], argmax(...) -> i32[B, K]), jitted once per process."""
    if "medusa" not in _JIT_CACHE:
        import jax
        import jax.numpy as jnp

        def logits_fn(params, lm, h):
            return _medusa_hidden(params, h) @ lm.T

        _JIT_CACHE["medusa"] = (jax.jit(logits_fn), jax.jit(
            lambda params, lm, h: jnp.argmax(logits_fn(params, lm, h), axis=-1).astype(jnp.int32)))
    return _JIT_CACHE["medusa"]


def _eagle_fns(lay_json: str):
    """(run, gather) for an EAGLE layer description, jitted once per process and description.

    run(params, embed, lm_head, tokens i32[B, Q], feats f32[B, Q, D], positions i32[B, Q], ctx_k, ctx_v
        f32[B, C, KV] (donated), ctx_len i32[B], last i32[B], want_logits) -> (ctx_k, ctx_v, the predicted
        feature of row `last` f32[B, D], its argmax token i32[B], its logits f32[B, V] or None)
    gather(ctx i32[B, C, KV], at i32[B], n) -> [B, n, KV] rows at..at+n-1 of each.
    """
    key = ("eagle", lay_json)
    if key not in _JIT_CACHE:
        import jax
        import jax.numpy as jnp

        lay = json.loads(lay_json)

        def run(params, emb, lm, tokens, feats, positions, ctx_k, ctx_v, ctx_len, last, want_logits):
            x = _eagle_inputs(params, emb, tokens, feats)
            out, ctx_k, ctx_v = _eagle_layer(params, lay, x, positions, ctx_k, ctx_v, ctx_len)
            pred = jnp.take_along_axis(out, last[:, None, None], axis=1)[:, 0]  # [B, D]
            logits = pred @ lm.T
            top = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return ctx_k, ctx_v, pred, top, (logits if want_logits else None)

        gather = jax.vmap(lambda pool, at, n: jax.lax.dynamic_slice_in_dim(pool, at, n, axis=0), in_axes=(0, 0, None))
        _JIT_CACHE[key] = (jax.jit(run, static_argnums=(10,), donate_argnums=(6, 7)),
                           jax.jit(gather, static_argnums=(2,)))
    return _JIT_CACHE[key]


def _sample_rows(logits: np.ndarray, req) -> tuple[int, np.ndarray]:
    """Draw one token from the request's processed distribution of logits f32[V] -> (token, q f32[V])."""
    w = sampling_weights(np.asarray(logits, np.float32), req.params)
    q = w / w.sum()
    return draw_token(q, req.generator.random()), q.astype(np.float32)


class MedusaProposer:
    """Medusa: the K heads read the feature of each request's last emitted token and propose K tokens at once."""

    name = "medusa"
    needs_hidden = True

    def __init__(self, heads: DraftHeads, *, lm_head: np.ndarray):
        import jax.numpy as jnp

        if heads.method != "medusa":
            raise ValueError(f"MedusaProposer needs medusa heads, got {heads.method!r}")
        lm_head = np.asarray(lm_head, np.float32)
        if lm_head.shape != (heads.vocab_size, heads.hidden_size):
            raise ValueError(f"lm_head has shape {lm_head.shape}, the heads expect {(heads.vocab_size, heads.hidden_size)}")
        self.heads = heads
        self.num_heads = heads.num_heads
        self._params = {k: jnp.asarray(v) for k, v in heads.params.items()}
        self._lm_head = jnp.asarray(lm_head)
        self._last: dict[Any, tuple[int, np.ndarray]] = {}  # request -> (position, feature f32[D])
        self._logits, self._argmax = _medusa_fns()

    def observe(self, rows) -> None:
        for r in rows:
            if r.num_valid < 1:
                continue
            self._last[r.request] = (int(r.start) + int(r.num_valid) - 1,
                                     np.array(r.hidden[int(r.num_valid) - 1], np.float32))

    def release(self, request) -> None:
        self._last.pop(request, None)

    def propose(self, requests, lengths) -> list:
        from runtime.speculative import Draft

        drafts = [Draft([]) for _ in requests]
        active = []
        for i, req in enumerate(requests):
            last = self._last.get(req)
            # the stored feature must be the one that produced the request's newest token
            if last is not None and last[0] == len(req.token_ids) - 2 and int(lengths[i]) >= 1:
                active.append(i)
        if not active:
            return drafts
        d = self.heads.hidden_size
        h = np.zeros((_bucket(len(active)), d), np.float32)
        for row, i in enumerate(active):
            h[row] = self._last[requests[i]][1]
        sampling = [i for i in active if not requests[i].params.is_greedy]
        if sampling:
            logits = np.asarray(self._logits(self._params, self._lm_head, h))  # [B, K, V]
            tokens = np.argmax(logits, axis=-1)
        else:
            logits, tokens = None, np.asarray(self._argmax(self._params, self._lm_head, h))
        for row, i in enumerate(active):
            req, k = requests[i], min(int(lengths[i]), self.num_heads)
            if req.params.is_greedy:
                drafts[i].tokens = [int(t) for t in tokens[row, :k]]
                continue
            probs = []
            for j in range(k):
                tok, q = _sample_rows(logits[row, j], req)
                drafts[i].tokens.append(tok)
                probs.append(q)
            drafts[i].probs = np.stack(probs)
        return drafts


@dataclasses.dataclass(eq=False)
class _EagleState:
    """One request's EAGLE state: real features of positions offset.. and the head's K/V entries over them.

    Entry i (position offset + i) is the head's row for (feature f_{offset+i}, token at offset+i+1); it
    can be computed once that token exists, so n_cached <= n_feats.
    """

    offset: int
    feats: np.ndarray  # f32[cap, D]
    keys: np.ndarray  # f32[cap, Hkv*Dh]  (after RoPE)
    values: np.ndarray  # f32[cap, Hkv*Dh]
    n_feats: int = 0
    n_cached: int = 0

    def reserve(self, n: int) -> None:
        cap = self.feats.shape[0]
        if n <= cap:
            return
        new = max(n, 2 * cap)
        for name in ("feats", "keys", "values"):
            old = getattr(self, name)
            grown = np.zeros((new, old.shape[1]), np.float32)
            grown[:cap] = old
            setattr(self, name, grown)


class EagleProposer:
    """EAGLE-1 style chain drafting with a one-layer head over the target's features and its own K/V cache."""

    name = "eagle"
    needs_hidden = True

    def __init__(self, heads: DraftHeads, *, embed: np.ndarray, lm_head: np.ndarray, config=None,
                 max_len: int = MAX_DRAFT):
        import jax.numpy as jnp

        if heads.method != "eagle":
            raise ValueError(f"EagleProposer needs eagle heads, got {heads.method!r}")
        shape = (heads.vocab_size, heads.hidden_size)
        embed, lm_head = np.asarray(embed, np.float32), np.asarray(lm_head, np.float32)
        if embed.shape != shape or lm_head.shape != shape:
            raise ValueError(f"embedding {embed.shape} / lm_head {lm_head.shape} do not match the heads' {shape}")
        if config is not None:
            heads.check_target(config, embed)
        self.heads = heads
        self.max_len = int(max_len)
        self.lay = dict(heads.config["layer"])
        self.kv_width = self.lay["num_kv_heads"] * self.lay["head_dim"]
        self._params = {k: jnp.asarray(v) for k, v in heads.params.items()}
        self._embed = jnp.asarray(embed)
        self._lm_head = self._embed if lm_head is embed else jnp.asarray(lm_head)  # tied embeddings: one copy
        self._states: dict[Any, _EagleState] = {}
        self._run, self._gather = _eagle_fns(json.dumps(self.lay, sort_keys=True))

    def observe(self, rows) -> None:
        d = self.heads.hidden_size
        for r in rows:
            n = int(r.num_valid)
            if n < 1:
                continue
            st = self._states.get(r.request)
            start = int(r.start)
            if st is None or start < st.offset or start > st.offset + st.n_feats:
                # new request, or a gap (e.g. the prompt's start came from the prefix cache): start over here
                cap = max(64, _bucket(n + 16))
                st = self._states[r.request] = _EagleState(start, np.zeros((cap, d), np.float32),
                                                           np.zeros((cap, self.kv_width), np.float32),
                                                           np.zeros((cap, self.kv_width), np.float32))
            at = start - st.offset  # rows from `at` on are (re)computed by this step; later ones are gone
            st.reserve(at + n)
            st.feats[at:at + n] = np.asarray(r.hidden[:n], np.float32)
            st.n_feats = at + n
            st.n_cached = min(st.n_cached, at)

    def release(self, request) -> None:
        self._states.pop(request, None)

    def propose(self, requests, lengths) -> list:
        from runtime.speculative import Draft

        drafts = [Draft([]) for _ in requests]
        active = []  # (index, state, k)
        for i, req in enumerate(requests):
            st = self._states.get(req)
            k = min(int(lengths[i]), self.max_len)
            if st is not None and k >= 1 and st.n_feats >= 1 and st.offset + st.n_feats == len(req.token_ids) - 1:
                st.n_cached = min(st.n_cached, st.n_feats - 1)  # the last entry's output gives the first token
                active.append((i, st, k))
        if not active:
            return drafts
        d, kvw = self.heads.hidden_size, self.kv_width
        b = _bucket(len(active))
        k_max = max(k for *_, k in active)
        pending = [st.n_feats - st.n_cached for _, st, _ in active]
        q = _bucket(max(pending))
        c = _bucket(max(st.n_cached for _, st, _ in active) + q + k_max)
        tokens = np.zeros((b, q), np.int32)
        feats = np.zeros((b, q, d), np.float32)
        positions = np.zeros((b, q), np.int32)
        ctx_k = np.zeros((b, c, kvw), np.float32)
        ctx_v = np.zeros((b, c, kvw), np.float32)
        ctx_len = np.zeros(b, np.int32)
        last = np.zeros(b, np.int32)
        for row, (i, st, _) in enumerate(active):
            ids = requests[i].token_ids
            a, n = st.n_cached, st.n_feats - st.n_cached
            tokens[row, :n] = ids[st.offset + a + 1: st.offset + st.n_feats + 1]
            feats[row, :n] = st.feats[a:st.n_feats]
            positions[row, :n] = st.offset + a + np.arange(n)
            positions[row, n:] = positions[row, n - 1] if n else st.offset + a
            ctx_k[row, :a], ctx_v[row, :a] = st.keys[:a], st.values[:a]
            ctx_len[row], last[row] = a, n - 1
        greedy = all(requests[i].params.is_greedy for i, _, _ in active)
        ctx_k, ctx_v, pred, top, logits = self._run(self._params, self._embed, self._lm_head, tokens, feats, positions,
                                                    ctx_k, ctx_v, ctx_len, last, not greedy)
        # keep the real entries just computed
        new_k = np.asarray(self._gather(ctx_k, ctx_len, q))
        new_v = np.asarray(self._gather(ctx_v, ctx_len, q))
        for row, (i, st, _) in enumerate(active):
            a, n = st.n_cached, st.n_feats - st.n_cached
            st.keys[a:a + n], st.values[a:a + n] = new_k[row, :n], new_v[row, :n]
            st.n_cached = st.n_feats
        probs: dict[int, list[np.ndarray]] = {i: [] for i, _, _ in active}
        cur_len = ctx_len + last + 1  # entries in the context now (padding rows: anything in range)
        for j in range(k_max):
            top = np.asarray(top)
            logits_np = None if logits is None else np.asarray(logits)
            step_tokens = np.zeros((b, 1), np.int32)
            for row, (i, st, k) in enumerate(active):
                if j >= k:
                    continue
                req = requests[i]
                if req.params.is_greedy:
                    tok = int(top[row])
                else:
                    tok, qd = _sample_rows(logits_np[row], req)
                    probs[i].append(qd)
                drafts[i].tokens.append(tok)
                step_tokens[row, 0] = tok
            if j + 1 >= k_max:
                break
            step_pos = np.zeros((b, 1), np.int32)
            for row, (i, st, _) in enumerate(active):
                step_pos[row, 0] = st.offset + st.n_feats + j
            ctx_k, ctx_v, pred, top, logits = self._run(
                self._params, self._embed, self._lm_head, step_tokens, pred[:, None, :], step_pos,
                ctx_k, ctx_v, cur_len.astype(np.int32), np.zeros(b, np.int32), not greedy)
            cur_len = cur_len + 1
        for i, _, _ in active:
            if probs[i]:
                drafts[i].probs = np.stack(probs[i])
        return drafts


def make_head_proposer(method: str, heads_path: str, target_params: dict, config):
    """The Proposer for `llmc train-draft` heads at heads_path over a target with HF-named parameters."""
    if method not in HEAD_METHODS:
        raise ValueError(f"unknown draft-head method {method!r}; expected one of {', '.join(HEAD_METHODS)}")
    if config is None:
        raise ValueError(f"speculative method {method!r} needs the target's model config")
    heads = load_heads(heads_path)
    if heads.method != method:
        raise ValueError(f"{heads_path} holds {heads.method} heads, but speculative method {method!r} was asked for")
    embed, lm_head = lm_head_of(target_params, config)
    heads.check_target(config, embed)
    if method == "medusa":
        return MedusaProposer(heads, lm_head=lm_head)
    return EagleProposer(heads, embed=embed, lm_head=lm_head, config=config)


# ---------------------------------------------------------------------------------------------
# Training data: prompts -> the target's greedy generations -> teacher-forced features


@dataclasses.dataclass
class TrainingSet:
    """Sequences (prompt + the target's greedy continuation) with their features."""

    tokens: list[np.ndarray]  # i32[L] each
    prompt_lens: list[int]
    features: list[np.ndarray]  # f32[L, D] each

    @property
    def num_generated(self) -> int:
        return int(sum(len(t) - p for t, p in zip(self.tokens, self.prompt_lens)))


def _data_dir(data: str | None) -> str:
    if data is not None:
        return data
    env = os.environ.get("LLMC_DATA")
    if env:
        return env
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(os.path.dirname(here), "shared", "data")


def load_prompts(data: str | None = None, *, num_gsm8k: int = 64, num_mt_bench: int = 40,
                 split: str = "train") -> list[str]:
    """User questions. split="train": GSM8K train lines [0:num_gsm8k) and MT-Bench first turns of odd
    question_id; split="heldout": the last num_gsm8k GSM8K lines and even question_ids."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    folder = _data_dir(data)
    gsm, mt = os.path.join(folder, "gsm8k_train.jsonl"), os.path.join(folder, "mt_bench_questions.jsonl")
    out = []
    if num_gsm8k > 0:
        if not os.path.isfile(gsm):
            raise ValueError(f"no GSM8K prompts: {gsm} is not a file (pass --data DIR)")
        with open(gsm, encoding="utf-8") as f:
            lines = [ln for ln in f if ln.strip()]
        picked = lines[:num_gsm8k] if split == "train" else lines[len(lines) - num_gsm8k:]
        out += [json.loads(ln)["question"] for ln in picked]
    if num_mt_bench > 0:
        if not os.path.isfile(mt):
            raise ValueError(f"no MT-Bench prompts: {mt} is not a file (pass --data DIR)")
        with open(mt, encoding="utf-8") as f:
            rows = [json.loads(ln) for ln in f if ln.strip()]
        parity = 1 if split == "train" else 0
        out += [r["turns"][0] for r in rows if int(r["question_id"]) % 2 == parity][:num_mt_bench]
    return out


def chat_prompt_ids(tokenizer, questions: Sequence[str]) -> list[list[int]]:
    out = []
    for q in questions:
        text = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        out.append(list(tokenizer.encode(text, add_special_tokens=False)))
    return out


def generate_sequences(compiled, prompt_ids: Sequence[Sequence[int]], *, max_tokens: int,
                       max_num_seqs: int = 64, max_num_batched_tokens: int = 2048) -> list[np.ndarray]:
    """prompt + the target's greedy continuation (llmc's Engine, all prompts in one continuously batched run)."""
    from runtime import Engine, SamplingParams

    engine = Engine(compiled, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                    speculative=False)
    outs = engine.generate([list(p) for p in prompt_ids], SamplingParams(max_tokens=max_tokens, temperature=0))
    return [np.asarray(list(o.prompt_token_ids) + list(o.token_ids), np.int32) for o in outs]


def compute_features(model, sequences: Sequence[np.ndarray], *, tokens_per_batch: int = 1024) -> list[np.ndarray]:
    """Teacher-forced final-norm hidden states f32[L, D] of each sequence: ragged batches of tokens_per_batch
    rows (a longer sequence gets a batch of its own, rounded up to 256 rows) under one jit."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def hidden(state, token_ids, positions, query_start):
        return nnx.merge(graphdef, state).hidden_states(token_ids, positions, query_start)

    out: list[np.ndarray | None] = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    batch: list[int] = []

    def flush():
        lens = [len(sequences[i]) for i in batch]
        total = max(tokens_per_batch, -(-sum(lens) // 256) * 256)
        tokens = np.zeros(total, np.int32)
        positions = np.zeros(total, np.int32)
        starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        for s, i in enumerate(batch):
            tokens[starts[s]:starts[s + 1]] = sequences[i]
            positions[starts[s]:starts[s + 1]] = np.arange(lens[s])
        # the padding rows form one more sequence, so real rows attend to nothing of them
        query_start = (np.concatenate([starts, [total]]) if total > starts[-1] else starts).astype(np.int32)
        h = np.asarray(hidden(state, tokens, positions, query_start))
        for s, i in enumerate(batch):
            out[i] = np.array(h[starts[s]:starts[s + 1]], np.float32)
        batch.clear()

    used = 0
    for i in order:
        if batch and used + len(sequences[i]) > tokens_per_batch:
            flush()
            used = 0
        batch.append(i)
        used += len(sequences[i])
    if batch:
        flush()
    return out  # type: ignore[return-value]


def build_training_set(compiled, model, questions: Sequence[str], *, max_tokens: int, max_num_seqs: int = 64,
                       log: Callable[[str], None] | None = None) -> TrainingSet:
    """Chat-render the questions, generate greedily with the compiled target, then compute features."""
    log = log or (lambda s: None)
    prompts = chat_prompt_ids(compiled.tokenizer, questions)
    t0 = time.time()
    seqs = generate_sequences(compiled, prompts, max_tokens=max_tokens, max_num_seqs=max_num_seqs)
    gen = sum(len(s) - len(p) for s, p in zip(seqs, prompts))
    log(f"generated {gen} tokens for {len(prompts)} prompts in {time.time() - t0:.1f}s")
    t0 = time.time()
    feats = compute_features(model, seqs)
    log(f"features of {sum(map(len, seqs))} tokens in {time.time() - t0:.1f}s")
    return TrainingSet(seqs, [len(p) for p in prompts], feats)


# ---------------------------------------------------------------------------------------------
# Training


def _optimizer(lr: float, total_steps: int, weight_decay: float = 0.0):
    import optax

    warmup = max(1, min(50, total_steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))


def _medusa_examples(data: TrainingSet, num_heads: int, lm_head: np.ndarray | None = None, soft_top: int = 0):
    """(features f32[N, D], targets i32[N, K] (-1 = none), soft_ids i32[N, K, S], soft_probs f32[N, K, S]): every
    position t >= prompt_len - 1; head i's target is the token at t+1+i, and (soft_top = S > 0) the target's own
    distribution for that token (softmax of lm_head(f_{t+i}) over its S best tokens; probs 0 = none)."""
    feats, targets, soft_ids, soft_probs = [], [], [], []
    s = max(int(soft_top), 1)
    lm = None if lm_head is None or soft_top <= 0 else np.asarray(lm_head, np.float32)
    for toks, p, f in zip(data.tokens, data.prompt_lens, data.features):
        length = len(toks)
        ts = np.arange(max(p - 1, 0), length - 1)
        if ts.size == 0:
            continue
        tgt = np.full((ts.size, num_heads), -1, np.int32)
        sid = np.zeros((ts.size, num_heads, s), np.int32)
        spr = np.zeros((ts.size, num_heads, s), np.float32)
        if lm is not None:
            rows = f[ts[0]:] @ lm.T  # f32[L', V]: the target's logits at positions ts[0]..
            top = np.argpartition(-rows, s - 1, axis=-1)[:, :s]
            top_logits = np.take_along_axis(rows, top, axis=-1)
            top_p = np.exp(top_logits - top_logits.max(axis=-1, keepdims=True))
            top_p /= top_p.sum(axis=-1, keepdims=True)
        for i in range(1, num_heads + 1):
            idx = ts + 1 + i
            ok = idx < length
            tgt[ok, i - 1] = toks[idx[ok]]
            if lm is not None:
                rel = (ts + i - ts[0])[ok]  # the feature f_{t+i} gives the token at t+1+i
                sid[ok, i - 1], spr[ok, i - 1] = top[rel], top_p[rel]
        feats.append(f[ts])
        targets.append(tgt)
        soft_ids.append(sid)
        soft_probs.append(spr)
    if not feats:
        raise ValueError("no training examples: every sequence is empty")
    return np.concatenate(feats), np.concatenate(targets), np.concatenate(soft_ids), np.concatenate(soft_probs)


def _medusa_loss_fn(weights, soft_weight: float):
    import jax
    import jax.numpy as jnp

    def loss_fn(params, lm_head, h, targets, soft_ids, soft_probs):  # lm_head is frozen (no gradient)
        logits = _medusa_hidden(params, h) @ lm_head.T  # [N, K, V]
        logp = jax.nn.log_softmax(logits, axis=-1)
        valid = targets >= 0
        picked = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]  # [N, K]
        ce = -picked
        if soft_weight > 0:  # distillation from the target's own distribution for that token
            soft = -jnp.sum(soft_probs * jnp.take_along_axis(logp, soft_ids, axis=-1), axis=-1)  # [N, K]
            ce = (1.0 - soft_weight) * ce + soft_weight * soft
        per_head = jnp.sum(jnp.where(valid, ce, 0.0), axis=0) / jnp.maximum(jnp.sum(valid, axis=0), 1)
        correct = jnp.sum(valid & (jnp.argmax(logits, axis=-1) == targets), axis=0)
        return jnp.sum(per_head * weights), (per_head, correct, jnp.sum(valid, axis=0))

    return loss_fn


def train_medusa(data: TrainingSet, heads: DraftHeads, lm_head: np.ndarray, *, epochs: int = 2,
                 batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.0, soft_weight: float = 0.0,
                 soft_top: int = 32, seed: int = 0, max_steps: int | None = None,
                 log: Callable[[str], None] | None = None) -> tuple[DraftHeads, list[float]]:
    """Train Medusa heads: cross-entropy of head i on the token at t+1+i (weighted 0.8^(i-1)), mixed with
    soft_weight x cross-entropy on the target's own distribution for that token (its soft_top best tokens);
    returns the trained heads and the loss of every step."""
    import jax
    import jax.numpy as jnp
    import optax

    log = log or (lambda s: None)
    k = heads.num_heads
    feats, targets, soft_ids, soft_probs = _medusa_examples(data, k, lm_head, soft_top if soft_weight > 0 else 0)
    n = feats.shape[0]
    batch_size = min(batch_size, n)
    steps_per_epoch = max(1, n // batch_size)
    total = steps_per_epoch * epochs if max_steps is None else max_steps
    opt = _optimizer(lr, total, weight_decay)
    lm = jnp.asarray(np.asarray(lm_head, np.float32))
    loss_fn = _medusa_loss_fn(jnp.asarray(0.8 ** np.arange(k), jnp.float32), float(soft_weight))

    @jax.jit
    def step(params, opt_state, lm, *batch):  # the big frozen arrays are arguments, not folded constants
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, lm, *batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, aux

    params = {name: jnp.asarray(v) for name, v in heads.params.items()}
    opt_state = opt.init(params)
    losses, t0 = [], time.time()
    for done, idx in enumerate(_minibatches(n, batch_size, steps_per_epoch, total, seed), start=1):
        params, opt_state, loss, (per_head, correct, count) = step(params, opt_state, lm, feats[idx], targets[idx],
                                                              soft_ids[idx], soft_probs[idx])
        losses.append(float(loss))
        if done % 20 == 0 or done == total:
            acc = np.asarray(correct) / np.maximum(np.asarray(count), 1)
            log(f"medusa step {done}/{total} loss {float(loss):.3f} train top-1 "
                f"{' '.join(f'{a:.2f}' for a in acc)} ({time.time() - t0:.0f}s)")
    trained = DraftHeads("medusa", dict(heads.config), {name: np.asarray(v) for name, v in params.items()})
    return trained, losses


def _minibatches(n: int, batch_size: int, steps_per_epoch: int, total: int, seed: int):
    """`total` index arrays of batch_size examples out of n, a fresh permutation every epoch."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < total:
        perm = rng.permutation(n)
        for s in range(min(steps_per_epoch, total - done)):
            yield perm[s * batch_size:(s + 1) * batch_size]
        done += min(steps_per_epoch, total - done)


def _eagle_batches(data: TrainingSet, lm_head: np.ndarray, seq_len: int):
    """Fixed-length windows for EAGLE training: per window tokens i32[W+1], features f32[W+1, D], the target's
    greedy token after each feature i32[W+1], and a mask of rows that count."""
    windows = []
    lm = np.asarray(lm_head, np.float32)
    for toks, p, f in zip(data.tokens, data.prompt_lens, data.features):
        pred = np.argmax(f @ lm.T, axis=-1).astype(np.int32)  # the target's own next token at every position
        length = len(toks)
        for a in range(0, max(length - 1, 1), seq_len):
            b = min(a + seq_len + 1, length)
            if b - a < 3:
                continue
            windows.append((toks[a:b], f[a:b], pred[a:b], a, p))
    return windows


def _eagle_loss_fn(lay, cls_weight: float, noise: float):
    import jax
    import jax.numpy as jnp

    def loss_fn(params, embed, lm_head, tokens, feats, preds, positions, mask, key):
        # input at t: (f_t, token t+1); predicts f_{t+1} and the target's token after it, preds[t+1]
        f_in = feats[:, :-1]
        if noise > 0:
            f_in = f_in + jax.random.uniform(key, f_in.shape, minval=-noise, maxval=noise)
        x = _eagle_inputs(params, embed, tokens[:, 1:], f_in)
        out, _, _ = _eagle_layer(params, lay, x, positions[:, :-1])
        target = feats[:, 1:]
        diff = jnp.abs(out - target)
        reg = jnp.mean(jnp.where(diff < 1.0, 0.5 * diff * diff, diff - 0.5), axis=-1)  # smooth L1  [B, W]
        logits = out @ lm_head.T
        logp = jax.nn.log_softmax(logits, axis=-1)
        y = preds[:, 1:]
        ce = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
        m = mask[:, 1:]
        count = jnp.maximum(jnp.sum(m), 1.0)
        reg_l = jnp.sum(reg * m) / count
        ce_l = jnp.sum(ce * m) / count
        correct = jnp.sum((jnp.argmax(logits, axis=-1) == y) * m)
        return reg_l + cls_weight * ce_l, (reg_l, ce_l, correct, jnp.sum(m))

    return loss_fn


def train_eagle(data: TrainingSet, heads: DraftHeads, embed: np.ndarray, lm_head: np.ndarray, *, epochs: int = 2,
                batch_size: int = 4, seq_len: int = 512, lr: float = 2e-3, cls_weight: float = 1.0,
                noise: float = 0.05, seed: int = 0, max_steps: int | None = None,
                log: Callable[[str], None] | None = None) -> tuple[DraftHeads, list[float]]:
    """Train an EAGLE head: smooth-L1 regression of the next feature + cls_weight x cross-entropy of the target's
    greedy token, with uniform noise on the input features (Li et al. 2024). Returns (heads, step losses)."""
    import jax
    import jax.numpy as jnp
    import optax

    log = log or (lambda s: None)
    lay = dict(heads.config["layer"])
    windows = _eagle_batches(data, lm_head, seq_len)
    if not windows:
        raise ValueError("no training examples: every sequence is shorter than 3 tokens")
    width = -(-max(len(w[0]) for w in windows) // 32) * 32
    d = heads.hidden_size
    n = len(windows)
    batch_size = min(batch_size, n)
    steps_per_epoch = max(1, n // batch_size)
    total = steps_per_epoch * epochs if max_steps is None else max_steps
    opt = _optimizer(lr, total)
    loss_fn = _eagle_loss_fn(lay, cls_weight, noise)
    emb = jnp.asarray(np.asarray(embed, np.float32))
    lm = emb if lm_head is embed else jnp.asarray(np.asarray(lm_head, np.float32))

    @jax.jit
    def step(params, opt_state, emb, lm, tokens, feats, preds, positions, mask, key):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, emb, lm, tokens, feats, preds, positions,
                                                                       mask, key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, aux

    def make_batch(idx):
        tokens = np.zeros((len(idx), width), np.int32)
        feats = np.zeros((len(idx), width, d), np.float32)
        preds = np.zeros((len(idx), width), np.int32)
        positions = np.zeros((len(idx), width), np.int32)
        mask = np.zeros((len(idx), width), np.float32)
        for r, i in enumerate(idx):
            t, f, p, a, plen = windows[i]
            m = len(t)
            tokens[r, :m], feats[r, :m], preds[r, :m] = t, f, p
            positions[r, :m] = a + np.arange(m)
            mask[r, :m] = 1.0
        return tokens, feats, preds, positions, mask

    params = {name: jnp.asarray(v) for name, v in heads.params.items()}
    opt_state = opt.init(params)
    key = jax.random.PRNGKey(seed)
    losses, t0 = [], time.time()
    for done, idx in enumerate(_minibatches(n, batch_size, steps_per_epoch, total, seed), start=1):
        key, sub = jax.random.split(key)
        params, opt_state, loss, (reg, ce, correct, count) = step(params, opt_state, emb, lm, *make_batch(idx), sub)
        losses.append(float(loss))
        if done % 20 == 0 or done == total:
            log(f"eagle step {done}/{total} loss {float(loss):.3f} (reg {float(reg):.3f} ce {float(ce):.3f}) "
                f"train top-1 {float(correct) / max(float(count), 1):.2f} ({time.time() - t0:.0f}s)")
    trained = DraftHeads("eagle", dict(heads.config), {name: np.asarray(v) for name, v in params.items()})
    return trained, losses


# ---------------------------------------------------------------------------------------------
# Evaluation: teacher-forced top-1 accuracy and a simulated greedy verification loop


def evaluate_heads(heads: DraftHeads, data: TrainingSet, *, embed: np.ndarray, lm_head: np.ndarray) -> dict[str, Any]:
    """Teacher-forced top-1 accuracy on the generated part of data: Medusa per head; EAGLE one step."""
    import jax
    import jax.numpy as jnp

    if heads.method == "medusa":
        feats, targets, _, _ = _medusa_examples(data, heads.num_heads)
        params = {k: jnp.asarray(v) for k, v in heads.params.items()}
        lm = jnp.asarray(np.asarray(lm_head, np.float32))
        top = jax.jit(lambda p, lm, h: jnp.argmax(_medusa_hidden(p, h) @ lm.T, axis=-1))
        correct = np.zeros(heads.num_heads)
        count = np.zeros(heads.num_heads)
        for a in range(0, feats.shape[0], 256):
            h = np.zeros((256, feats.shape[1]), np.float32)
            chunk = feats[a:a + 256]
            h[:len(chunk)] = chunk
            pred = np.asarray(top(params, lm, h))[:len(chunk)]
            t = targets[a:a + 256]
            correct += np.sum((pred == t) & (t >= 0), axis=0)
            count += np.sum(t >= 0, axis=0)
        return {"top1_per_head": [float(c / max(n, 1)) for c, n in zip(correct, count)],
                "num_examples": int(count[0])}
    lay = dict(heads.config["layer"])
    params = {k: jnp.asarray(v) for k, v in heads.params.items()}
    emb, lm = jnp.asarray(np.asarray(embed, np.float32)), jnp.asarray(np.asarray(lm_head, np.float32))

    @jax.jit
    def top(params, emb, lm, tokens, feats, positions):
        x = _eagle_inputs(params, emb, tokens[:, 1:], feats[:, :-1])
        out, _, _ = _eagle_layer(params, lay, x, positions[:, :-1])
        return jnp.argmax(out @ lm.T, axis=-1)

    correct = count = 0
    for toks, p, f in zip(data.tokens, data.prompt_lens, data.features):
        length = len(toks)
        width = _bucket(length, 8)
        tk = np.zeros((1, width), np.int32)
        fe = np.zeros((1, width, f.shape[1]), np.float32)
        tk[0, :length], fe[0, :length] = toks, f
        pos = np.arange(width, dtype=np.int32)[None]
        pred = np.asarray(top(params, emb, lm, tk, fe, pos))[0]  # pred[t]: the head's token at t+2
        for t in range(max(p - 2, 0), length - 2):
            correct += int(pred[t] == toks[t + 2])
            count += 1
    return {"top1": correct / max(count, 1), "num_examples": count}


class _SimRequest:
    """A stand-in for runtime.engine.Request in simulate_acceptance."""

    def __init__(self, token_ids, params, generator):
        self.token_ids = list(token_ids)
        self.params = params
        self.generator = generator


def simulate_acceptance(proposer, data: TrainingSet, *, num_tokens: int = 4) -> dict[str, Any]:
    """Greedy speculative decoding replayed over data's generations (the target's greedy tokens and features):
    each round proposes up to num_tokens, accepts the matching prefix plus the target's token, and observes
    the accepted rows. Returns the mean accepted length (emitted tokens per verification) and acceptance."""
    from runtime.sampler import SamplingParams
    from runtime.speculative import StepRows

    greedy = SamplingParams(max_tokens=1, temperature=0)
    reqs = []
    for toks, p, f in zip(data.tokens, data.prompt_lens, data.features):
        if len(toks) - p < 2:
            continue
        r = _SimRequest(toks[:p + 1], greedy, np.random.default_rng(0))  # prompt + the first emitted token
        reqs.append((r, toks, p, f))
    proposer.observe([StepRows(r, 0, toks[:p], f[:p], p, int(toks[p])) for r, toks, p, f in reqs])
    emitted = verifications = drafted = accepted_total = 0
    live = list(reqs)
    while live:
        requests = [r for r, *_ in live]
        lengths = [max(1, min(num_tokens, len(toks) - len(r.token_ids) - 1)) for r, toks, *_ in live]
        drafts = proposer.propose(requests, lengths)
        rows, nxt = [], []
        for (r, toks, p, f), draft in zip(live, drafts):
            n = len(r.token_ids)  # the last real token sits at n-1
            acc = 0
            for tok in draft.tokens:
                if n + acc < len(toks) and tok == int(toks[n + acc]):
                    acc += 1
                else:
                    break
            acc = min(acc, len(toks) - n - 1)
            verifications += 1
            drafted += len(draft.tokens)
            accepted_total += acc
            emitted += acc + 1
            k = len(draft.tokens)
            window = np.concatenate([[r.token_ids[-1]], draft.tokens]).astype(np.int32)
            hid = np.zeros((k + 1, f.shape[1]), np.float32)  # rows past the accepted ones: junk, as rejected
            hid[:acc + 1] = f[n - 1:n + acc]
            new_len = n + acc + 1
            r.token_ids = list(toks[:new_len])
            rows.append(StepRows(r, n - 1, window, hid, acc + 1, int(toks[new_len - 1])))
            if new_len < len(toks) - 1:
                nxt.append((r, toks, p, f))
            else:
                proposer.release(r)
        proposer.observe(rows)
        live = nxt
    return {"mean_accepted_length": emitted / max(verifications, 1),
            "acceptance_rate": accepted_total / max(drafted, 1), "verifications": verifications}


# ---------------------------------------------------------------------------------------------
# The whole recipe (`llmc train-draft`)


def _load_generations(path: str, key: dict) -> list[np.ndarray] | None:
    """The sequences stored at path if they were generated for exactly `key`, else None."""
    if not path or not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            if json.loads(str(npz["key"])) != key:
                return None
            flat, lens = npz["tokens"], npz["lengths"]
    except Exception:  # noqa: BLE001 - an unreadable cache is regenerated
        return None
    return [np.asarray(s, np.int32) for s in np.split(flat, np.cumsum(lens)[:-1])]


def _save_generations(path: str, key: dict, seqs: Sequence[np.ndarray]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, key=np.array(json.dumps(key, sort_keys=True)), tokens=np.concatenate(seqs).astype(np.int32),
             lengths=np.array([len(s) for s in seqs], np.int64))
    os.replace(tmp, path)


def train_draft_heads(source: str, *, method: str, output: str, num_heads: int = 4, num_gsm8k: int = 48,
                      num_mt_bench: int = 16, num_eval: int = 12, max_tokens: int = 128, epochs: int | None = None,
                      batch_size: int | None = None, lr: float | None = None, seed: int = 0, data: str | None = None,
                      generations: str | None = None, max_num_seqs: int = 64,
                      log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Generate with the target, compute features, train, evaluate on held-out prompts, save to `output`.
    Returns a summary (also stored under "training" in the heads' config.json)."""
    from lowering import compile_model
    from lowering.checkpoints import load_checkpoint
    from lowering.models.llama import build_model

    if method not in HEAD_METHODS:
        raise ValueError(f"unknown draft-head method {method!r}; expected one of {', '.join(HEAD_METHODS)}")
    log = log or (lambda s: None)
    t_start = time.time()
    train_q = load_prompts(data, num_gsm8k=num_gsm8k, num_mt_bench=num_mt_bench, split="train")
    eval_q = load_prompts(data, num_gsm8k=num_eval, num_mt_bench=num_eval // 3, split="heldout") if num_eval else []
    ckpt = load_checkpoint(source, progress=False)
    if ckpt.tokenizer is None:
        raise ValueError(f"{source}: draft-head training needs the checkpoint's tokenizer (for the chat template)")
    config = ckpt.config
    model = build_model(config, ckpt.weights)
    embed, lm_head = lm_head_of(ckpt.weights, config)
    prompts = chat_prompt_ids(ckpt.tokenizer, list(train_q) + list(eval_q))
    key = {"target": target_fingerprint(config, embed), "max_tokens": max_tokens,
           "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()}
    seqs = _load_generations(generations, key) if generations else None
    t0 = time.time()
    if seqs is None or len(seqs) != len(prompts):
        log(f"generating {max_tokens} tokens for {len(prompts)} prompts ({len(train_q)} train, {len(eval_q)} held out)")
        compiled = compile_model(source, target="cpu", progress=False)
        seqs = generate_sequences(compiled, prompts, max_tokens=max_tokens, max_num_seqs=max_num_seqs)
        del compiled
        if generations:
            _save_generations(generations, key, seqs)
        gen_s = time.time() - t0
        log(f"generated {sum(len(s) - len(p) for s, p in zip(seqs, prompts))} tokens in {gen_s:.1f}s")
    else:
        gen_s = 0.0
        log(f"reusing the generations in {generations}")
    t0 = time.time()
    feats = compute_features(model, seqs)
    feat_s = time.time() - t0
    log(f"features of {sum(map(len, seqs))} tokens in {feat_s:.1f}s")
    n_train = len(train_q)
    train = TrainingSet(seqs[:n_train], [len(p) for p in prompts[:n_train]], feats[:n_train])
    held = TrainingSet(seqs[n_train:], [len(p) for p in prompts[n_train:]], feats[n_train:])
    t0 = time.time()
    if method == "medusa":
        heads = init_medusa(config, embed, num_heads, seed=seed)
        heads, losses = train_medusa(train, heads, lm_head, epochs=epochs or 3, batch_size=batch_size or 256,
                                     lr=lr or 1e-3, seed=seed, log=log)
    else:
        heads = init_eagle(config, embed, seed=seed)
        heads, losses = train_eagle(train, heads, embed, lm_head, epochs=epochs or 5, batch_size=batch_size or 4,
                                    lr=lr or 2e-3, seed=seed, log=log)
    train_s = time.time() - t0
    summary: dict[str, Any] = {
        "source": str(source), "train_prompts": n_train, "heldout_prompts": len(eval_q), "max_tokens": max_tokens,
        "train_generated_tokens": train.num_generated, "final_loss": losses[-1] if losses else None,
        "steps": len(losses), "generate_seconds": round(gen_s, 1), "features_seconds": round(feat_s, 1),
        "train_seconds": round(train_s, 1)}
    if len(held.tokens):
        t0 = time.time()
        summary["heldout"] = evaluate_heads(heads, held, embed=embed, lm_head=lm_head)
        proposer = (MedusaProposer(heads, lm_head=lm_head) if method == "medusa"
                    else EagleProposer(heads, embed=embed, lm_head=lm_head, config=config))
        k = heads.num_heads if method == "medusa" else 4
        summary["heldout"]["greedy_replay"] = {"num_tokens": k, **simulate_acceptance(proposer, held, num_tokens=k)}
        summary["eval_seconds"] = round(time.time() - t0, 1)
        log(f"held-out: {json.dumps(summary['heldout'])}")
    summary["wall_seconds"] = round(time.time() - t_start, 1)
    heads.config["training"] = summary
    save_heads(output, heads)
    log(f"wrote {output} ({summary['wall_seconds']:.0f}s in all)")
    return summary
