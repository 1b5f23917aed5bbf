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


def _eagle_qkv(params, lay, x, positions):
    """The head layer's queries f32[B, Q, Hkv, G, Dh] and keys / values f32[B, Q, Hkv*Dh] (keys after RoPE)."""
    hq, hkv, dh = lay["num_heads"], lay["num_kv_heads"], lay["head_dim"]
    b, q_len, _ = x.shape
    h = _rms(x, params["input_layernorm.weight"], lay["rms_norm_eps"])
    q = _rope(h @ params["q_proj.weight"].T, positions, lay, hq)
    k = _rope(h @ params["k_proj.weight"].T, positions, lay, hkv)
    v = h @ params["v_proj.weight"].T
    return q.reshape(b, q_len, hkv, hq // hkv, dh), k, v


def _eagle_finish(params, lay, x, o):
    """The head layer after attention: x f32[B, Q, D] + o_proj(o), then the MLP."""
    import jax

    x = x + o @ params["o_proj.weight"].T
    h = _rms(x, params["post_attention_layernorm.weight"], lay["rms_norm_eps"])
    return x + (jax.nn.silu(h @ params["gate_proj.weight"].T) * (h @ params["up_proj.weight"].T)) @ params["down_proj.weight"].T


def _eagle_layer(params, lay, x, positions, ctx_k=None, ctx_v=None, ctx_len=None):
    """The head's decoder layer. x f32[B, Q, D] at positions i32[B, Q].

    Without a cache (training): causal attention over the Q rows themselves (padded rows sit at the end).
    With a cache ctx_k/ctx_v f32[B, C, Hkv*Dh] holding ctx_len[b] entries: row q's K/V are written at index
    ctx_len[b] + q and it attends to indices <= that. Returns (out f32[B, Q, D], ctx_k, ctx_v).
    """
    import jax
    import jax.numpy as jnp

    hkv, dh = lay["num_kv_heads"], lay["head_dim"]
    b, q_len, _ = x.shape
    qh, k, v = _eagle_qkv(params, lay, x, positions)
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
    kh = keys.reshape(b, c, hkv, dh)
    vh = values.reshape(b, c, hkv, dh)
    scores = jnp.einsum("bqkgd,bckd->bkgqc", qh, kh) / math.sqrt(dh)
    mask = jnp.arange(c)[None, None, :] <= limit[:, :, None]  # [B, Q, C]
    scores = jnp.where(mask[:, None, None], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum("bkgqc,bckd->bqkgd", probs, vh).reshape(b, q_len, -1)
    return _eagle_finish(params, lay, x, o), ctx_k, ctx_v


def _shift_right(x, n: int):
    """x [B, W, ...] -> y with y[:, u] = x[:, u - n] (zeros for u < n)."""
    import jax.numpy as jnp

    if n == 0:
        return x
    pad = jnp.zeros((x.shape[0], n) + x.shape[2:], x.dtype)
    return jnp.concatenate([pad, x[:, :-n]], axis=1)


def _eagle_unrolled(params, lay, embed, tokens_next, feats, positions, depth: int):
    """The head run as drafting runs it, for training ("training-time test", EAGLE-3): depth 1 reads the
    target's features; depth m > 1 reads depth m-1's predicted feature of the previous position, as chain
    step m-1 does. A depth-m query at u attends to real entries <= u-m+1 (the last real entry the chain
    started from) and to the chain's own entries of depths 2..m at positions u-m+2..u.

    tokens_next i32[B, W] (the token after each position), feats f32[B, W, D], positions i32[B, W] -> a list of
    `depth` outputs f32[B, W, D]; every depth predicts the same thing at u (the feature at u+1)."""
    import jax
    import jax.numpy as jnp

    hkv, dh = lay["num_kv_heads"], lay["head_dim"]
    b, w, _ = feats.shape
    e = jnp.take(embed, tokens_next, axis=0)

    def inputs(f):
        return jnp.concatenate([e, f], axis=-1) @ params["fc.weight"].T + params["fc.bias"]

    x = inputs(feats)
    q1, k1, v1 = _eagle_qkv(params, lay, x, positions)
    k1h, v1h = k1.reshape(b, w, hkv, dh), v1.reshape(b, w, hkv, dh)
    real = jnp.einsum("bqkgd,bckd->bkgqc", q1, k1h) / math.sqrt(dh)
    causal = jnp.arange(w)[None, :] <= jnp.arange(w)[:, None]  # [Q, C]
    probs = jax.nn.softmax(jnp.where(causal, real, -1e30), axis=-1)
    o = jnp.einsum("bkgqc,bckd->bqkgd", probs, v1h).reshape(b, w, -1)
    outs = [_eagle_finish(params, lay, x, o)]
    chain_k, chain_v = [], []  # depth 2.. keys / values [B, W, Hkv, Dh]
    for m in range(2, depth + 1):
        x = inputs(_shift_right(outs[-1], 1))
        qm, km, vm = _eagle_qkv(params, lay, x, positions)
        chain_k.append(km.reshape(b, w, hkv, dh))
        chain_v.append(vm.reshape(b, w, hkv, dh))
        real = jnp.einsum("bqkgd,bckd->bkgqc", qm, k1h) / math.sqrt(dh)
        seen = jnp.arange(w)[None, :] <= jnp.arange(w)[:, None] - (m - 1)
        real = jnp.where(seen, real, -1e30)
        ks = [_shift_right(kd, m - d) for d, kd in enumerate(chain_k, start=2)]
        vs = [_shift_right(vd, m - d) for d, vd in enumerate(chain_v, start=2)]
        diag = jnp.stack([jnp.einsum("bqkgd,bqkd->bkgq", qm, kd) for kd in ks], axis=-1) / math.sqrt(dh)
        probs = jax.nn.softmax(jnp.concatenate([real, diag], axis=-1), axis=-1)
        o = jnp.einsum("bkgqc,bckd->bqkgd", probs[..., :w], v1h)
        for j, vd in enumerate(vs):
            o = o + jnp.einsum("bkgq,bqkd->bqkgd", probs[..., w + j], vd)
        outs.append(_eagle_finish(params, lay, x, o.reshape(b, w, -1)))
    return outs


# ---------------------------------------------------------------------------------------------
# Proposers


_JIT_CACHE: dict[Any, Any] = {}


def _jit_cache_size(fn) -> int:
    from lowering.backends.cpu import jit_cache_size

    return jit_cache_size(fn)


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


def _eagle_device_fns(lay_json: str):
    """(first, step) for an EAGLE layer description, jitted once per process and description.

    The head's K/V of every request live in two device slabs kc, vc f32[S, C, KV] (a slot per request).

    first(params, embed, lm_head, kc, vc (both donated), ints i32[B, 3 + 2Q] (slots, ctx_len, last, tokens
          i32[Q], positions i32[Q] side by side), feats f32[B, Q, D], c, n_chain, want_logits)
        runs the rows not yet in a request's cache (features of real tokens) over its first ctx_len[b]
        entries, writes their K/V into the slabs (rows past last[b] and padding batch rows are dropped),
        then drafts greedily: n_chain tokens, feeding each predicted feature and token back. Only the
        real rows are written to the slabs; the drafted rows' K/V stay in a local copy of c entries.
        -> (kc, vc, tokens i32[B, n_chain], extra) where extra is None or, with want_logits (n_chain = 1),
        the state `step` continues from: (local_k, local_v, feature f32[B, D], logits f32[B, V]).
    step(params, embed, lm_head, local_k, local_v (donated), tokens i32[B, 1], feature f32[B, D],
         positions i32[B, 1], ctx_len i32[B]) -> (local_k, local_v, feature, logits): one more chain step
        (sampling drafts, where the host draws each token).
    """
    key = ("eagle-device", lay_json)
    if key not in _JIT_CACHE:
        import jax
        import jax.numpy as jnp

        lay = json.loads(lay_json)

        def chain_step(params, emb, lm, lk, lv, tok, pred, pos, cur_len):
            x = _eagle_inputs(params, emb, tok[:, None], pred[:, None, :])
            out, lk, lv = _eagle_layer(params, lay, x, pos[:, None], lk, lv, cur_len)
            pred = out[:, 0]
            logits = pred @ lm.T
            return lk, lv, pred, logits

        def first(params, emb, lm, kc, vc, ints, feats, c, n_chain, want_logits):
            num_slots, cap = kc.shape[0], kc.shape[1]
            q = feats.shape[1]
            # one host-to-device copy for every integer input: [slots | ctx_len | last | tokens (q) | positions (q)]
            slots, ctx_len, last = ints[:, 0], ints[:, 1], ints[:, 2]
            tokens, positions = ints[:, 3:3 + q], ints[:, 3 + q:]
            lk = jnp.take(kc, slots, axis=0, mode="clip")[:, :c]
            lv = jnp.take(vc, slots, axis=0, mode="clip")[:, :c]
            x = _eagle_inputs(params, emb, tokens, feats)
            out, lk, lv = _eagle_layer(params, lay, x, positions, lk, lv, ctx_len)
            # the real rows' K/V into the slabs; anything else goes out of bounds and is dropped
            rows = jnp.arange(q)[None, :]
            at = jnp.where(rows <= last[:, None], ctx_len[:, None] + rows, cap)
            slot = jnp.where((slots >= 0)[:, None], slots[:, None], num_slots) + 0 * rows
            take = jax.vmap(lambda pool, start: jax.lax.dynamic_slice_in_dim(pool, start, q, axis=0))
            kc = kc.at[slot, at].set(take(lk, ctx_len), mode="drop")
            vc = vc.at[slot, at].set(take(lv, ctx_len), mode="drop")
            pred = jnp.take_along_axis(out, last[:, None, None], axis=1)[:, 0]  # [B, D]
            logits = pred @ lm.T
            tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            pos = jnp.take_along_axis(positions, last[:, None], axis=1)[:, 0]
            cur_len = ctx_len + last + 1
            drafted = [tok]
            for j in range(1, n_chain):
                lk, lv, pred, logits = chain_step(params, emb, lm, lk, lv, tok, pred, pos + j, cur_len + j - 1)
                tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
                drafted.append(tok)
            extra = (lk, lv, pred, logits) if want_logits else None
            return kc, vc, jnp.stack(drafted, axis=1), extra

        def step(params, emb, lm, lk, lv, tokens, pred, positions, ctx_len):
            return chain_step(params, emb, lm, lk, lv, tokens[:, 0], pred, positions[:, 0], ctx_len)

        _JIT_CACHE[key] = (jax.jit(first, static_argnums=(7, 8, 9), donate_argnums=(3, 4)),
                           jax.jit(step, donate_argnums=(3, 4)))
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
        self.last_propose_compiled = False  # the last propose() compiled a new shape (not a cost to learn from)
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
        before = _jit_cache_size(self._logits) + _jit_cache_size(self._argmax)
        if sampling:
            logits = np.asarray(self._logits(self._params, self._lm_head, h))  # [B, K, V]
            tokens = np.argmax(logits, axis=-1)
        else:
            logits, tokens = None, np.asarray(self._argmax(self._params, self._lm_head, h))
        self.last_propose_compiled = _jit_cache_size(self._logits) + _jit_cache_size(self._argmax) != before
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
    """One request's EAGLE state: real features of positions offset.. and how many of them the head's K/V
    slab slot holds.

    Entry i (position offset + i) is the head's row for (feature f_{offset+i}, token at offset+i+1); it
    can be computed once that token exists, so n_cached <= n_feats.
    """

    slot: int
    offset: int
    feats: np.ndarray  # f32[cap, D]
    n_feats: int = 0
    n_cached: int = 0

    def reserve(self, n: int) -> None:
        cap = self.feats.shape[0]
        if n > cap:
            grown = np.zeros((max(n, 2 * cap), self.feats.shape[1]), np.float32)
            grown[:cap] = self.feats
            self.feats = grown


class _JaxEagleBackend:
    """The EAGLE head in JAX: K/V slabs on the JAX device, one jitted call per greedy proposal."""

    def __init__(self, heads: DraftHeads, embed: np.ndarray, lm_head: np.ndarray, lay: dict):
        import jax.numpy as jnp

        self.kv_width = lay["num_kv_heads"] * lay["head_dim"]
        self._params = {k: jnp.asarray(v) for k, v in heads.params.items()}
        self._embed = jnp.asarray(embed)
        self._lm_head = self._embed if lm_head is embed else jnp.asarray(lm_head)  # tied embeddings: one copy
        self._kc = self._vc = None  # f32[S, C, KV] slabs, made on first use
        self._first, self._step = _eagle_device_fns(json.dumps(lay, sort_keys=True))

    def slab_shape(self) -> tuple[int, int]:
        return (0, 0) if self._kc is None else (int(self._kc.shape[0]), int(self._kc.shape[1]))

    def grow(self, s1: int, c1: int) -> None:
        import jax.numpy as jnp

        s0, c0 = self.slab_shape()
        kc = jnp.zeros((s1, c1, self.kv_width), jnp.float32)
        vc = jnp.zeros((s1, c1, self.kv_width), jnp.float32)
        if self._kc is not None:
            kc, vc = kc.at[:s0, :c0].set(self._kc), vc.at[:s0, :c0].set(self._vc)
        self._kc, self._vc = kc, vc

    def keys(self, slot: int, n: int) -> np.ndarray:
        return np.asarray(self._kc[slot, :n])

    def num_compiled(self) -> int:
        return _jit_cache_size(self._first) + _jit_cache_size(self._step)

    def first(self, ints: np.ndarray, feats: np.ndarray, c: int, n_chain: int, want_logits: bool):
        """-> (drafted tokens i32[B, n_chain] on the host, sampling state or None)."""
        self._kc, self._vc, top, extra = self._first(self._params, self._embed, self._lm_head, self._kc, self._vc,
                                                     ints, feats, c, n_chain, want_logits)
        return np.asarray(top), extra

    def step(self, state, tokens: np.ndarray, positions: np.ndarray, cur_len: np.ndarray):
        """One more chain step for sampling: -> (state, logits f32[B, V] on the host)."""
        lk, lv, pred, _ = state
        lk, lv, pred, logits = self._step(self._params, self._embed, self._lm_head, lk, lv, tokens, pred, positions,
                                          cur_len)
        return (lk, lv, pred, logits), np.asarray(logits)

    @staticmethod
    def logits_of(state) -> np.ndarray:
        return np.asarray(state[3])


class EagleProposer:
    """EAGLE-1 style chain drafting with a one-layer head over the target's features and its own K/V cache.

    The head's K/V stay on the device in slabs with a slot per request; a greedy proposal for the whole batch
    is one call: the rows the target just computed, then the chain. Only the token ids come back to the host.
    With `device=None` the head runs in JAX (on the GPU where JAX has one); with a torch device (the CUDA
    Program's) it runs in torch on that device, each greedy proposal shape replayed as one CUDA graph
    (runtime/eagle_torch.py).
    """

    name = "eagle"
    needs_hidden = True

    def __init__(self, heads: DraftHeads, *, embed: np.ndarray, lm_head: np.ndarray, config=None,
                 max_len: int = MAX_DRAFT, device=None):
        if heads.method != "eagle":
            raise ValueError(f"EagleProposer needs eagle heads, got {heads.method!r}")
        shape = (heads.vocab_size, heads.hidden_size)
        same = lm_head is embed
        embed = np.asarray(embed, np.float32)
        lm_head = embed if same else np.asarray(lm_head, np.float32)
        if embed.shape != shape or lm_head.shape != shape:
            raise ValueError(f"embedding {embed.shape} / lm_head {lm_head.shape} do not match the heads' {shape}")
        if config is not None:
            heads.check_target(config, embed)
        self.heads = heads
        self.max_len = int(max_len)
        self.lay = dict(heads.config["layer"])
        self.kv_width = self.lay["num_kv_heads"] * self.lay["head_dim"]
        if device is None:
            self._backend = _JaxEagleBackend(heads, embed, lm_head, self.lay)
        else:
            from runtime.eagle_torch import TorchEagleBackend

            self._backend = TorchEagleBackend(heads, embed, lm_head, self.lay, device)
        self._states: dict[Any, _EagleState] = {}
        self._free: list[int] = []
        self.last_propose_compiled = False  # the last propose() compiled a new shape (not a cost to learn from)

    # -- the K/V slabs ------------------------------------------------------------------------------

    def _ensure_slab(self, slots: int, cap: int) -> None:
        """Grow the slabs (powers of two) to hold `slots` slots of `cap` entries each, keeping what they hold."""
        s0, c0 = self._backend.slab_shape()
        if slots <= s0 and cap <= c0:
            return
        self._backend.grow(max(s0, _bucket(slots, 4)), max(c0, _bucket(cap, 256)))

    def _new_slot(self) -> int:
        if self._free:
            return self._free.pop()
        return len(self._states)  # slots are dense: every live state holds one of 0..len-1

    def cached_keys(self, request) -> np.ndarray:
        """The head's cached keys f32[n_cached, KV] of a request (for tests and debugging)."""
        st = self._states[request]
        if self._backend.slab_shape()[0] == 0 or st.n_cached == 0:
            return np.zeros((0, self.kv_width), np.float32)
        return self._backend.keys(st.slot, st.n_cached)

    # -- Proposer protocol --------------------------------------------------------------------------

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
                slot = st.slot if st is not None else self._new_slot()
                cap = max(64, _bucket(n + 16))
                st = self._states[r.request] = _EagleState(slot, start, np.zeros((cap, d), np.float32))
            at = start - st.offset  # rows from `at` on are (re)computed by this step; later ones are gone
            st.reserve(at + n)
            st.feats[at:at + n] = np.asarray(r.hidden[:n], np.float32)
            st.n_feats = at + n
            st.n_cached = min(st.n_cached, at)

    def release(self, request) -> None:
        st = self._states.pop(request, None)
        if st is not None:
            self._free.append(st.slot)

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
        d = self.heads.hidden_size
        b = _bucket(len(active))
        k_max = max(k for *_, k in active)
        # few shapes (each is an XLA compile): at least 8 new rows (a verification brings up to k + 1) and a
        # context of at least 256 entries
        q = _bucket(max(st.n_feats - st.n_cached for _, st, _ in active), 8)
        c = _bucket(max(st.n_cached for _, st, _ in active) + q + k_max, 256)
        self._ensure_slab(max(st.slot for _, st, _ in active) + 1, c)
        ints = np.zeros((b, 3 + 2 * q), np.int32)
        ints[:, 0] = -1
        slots, ctx_len, last = ints[:, 0], ints[:, 1], ints[:, 2]  # views
        tokens, positions = ints[:, 3:3 + q], ints[:, 3 + q:]
        feats = np.zeros((b, q, d), np.float32)
        for row, (i, st, _) in enumerate(active):
            ids = requests[i].token_ids
            a, n = st.n_cached, st.n_feats - st.n_cached
            slots[row] = st.slot
            tokens[row, :n] = ids[st.offset + a + 1: st.offset + st.n_feats + 1]
            feats[row, :n] = st.feats[a:st.n_feats]
            positions[row, :n] = st.offset + a + np.arange(n)
            positions[row, n:] = positions[row, n - 1]
            ctx_len[row], last[row] = a, n - 1
        for _, st, _ in active:
            st.n_cached = st.n_feats
        greedy = all(requests[i].params.is_greedy for i, _, _ in active)
        before = self._backend.num_compiled()
        top, state = self._backend.first(ints, feats, c, k_max if greedy else 1, not greedy)
        if greedy:
            self.last_propose_compiled = self._backend.num_compiled() != before
            for row, (i, _, k) in enumerate(active):
                drafts[i].tokens = [int(t) for t in top[row, :k]]
            return drafts
        # sampling: the host draws each token from the request's processed distribution, one step at a time
        logits_np = self._backend.logits_of(state)
        probs: dict[int, list[np.ndarray]] = {i: [] for i, _, _ in active}
        step_pos = np.asarray([st.offset + st.n_feats for _, st, _ in active] + [0] * (b - len(active)), np.int32)
        cur_len = ctx_len + last + 1
        for j in range(k_max):
            step_tokens = np.zeros((b, 1), np.int32)
            for row, (i, st, k) in enumerate(active):
                if j >= k:
                    continue
                req = requests[i]
                if req.params.is_greedy:
                    tok = int(np.argmax(logits_np[row]))
                else:
                    tok, qd = _sample_rows(logits_np[row], req)
                    probs[i].append(qd)
                drafts[i].tokens.append(tok)
                step_tokens[row, 0] = tok
            if j + 1 >= k_max:
                break
            state, logits_np = self._backend.step(state, step_tokens, (step_pos + j)[:, None],
                                                  (cur_len + j).astype(np.int32))
        for i, _, _ in active:
            if probs[i]:
                drafts[i].probs = np.stack(probs[i])
        self.last_propose_compiled = self._backend.num_compiled() != before
        return drafts


def make_head_proposer(method: str, heads_path: str, target_params: dict, config, device=None):
    """The Proposer for `llmc train-draft` heads at heads_path over a target with HF-named parameters.
    device: the target Program's torch device (CUDA programs), where the EAGLE head then runs; None: JAX."""
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
    return EagleProposer(heads, embed=embed, lm_head=lm_head, config=config, device=device)


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
                       max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, samples: int = 0,
                       temperature: float = 0.8) -> list[np.ndarray]:
    """prompt + the target's greedy continuation (llmc's Engine, all prompts in one continuously batched run),
    then `samples` sampled continuations of each prompt (seeded; more varied contexts of the same domain; the
    heads still learn the target's greedy token at every position of them)."""
    from runtime import Engine, SamplingParams

    engine = Engine(compiled, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                    speculative=False)
    prompts = [list(p) for p in prompt_ids]
    params = [SamplingParams(max_tokens=max_tokens, temperature=0)] * len(prompts)
    for j in range(samples):
        params += [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=1000 * j + i)
                   for i in range(len(prompt_ids))]
    outs = engine.generate(prompts * (1 + samples), params)
    del engine
    _release_torch_gpu_memory()  # the engine's KV pool (on the GPU: most of the card)
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


def compute_features_with_program(compiled, sequences: Sequence[np.ndarray], *,
                                  tokens_per_step: int = 8192) -> list[np.ndarray]:
    """Teacher-forced features f32[L, D] from the compiled Program itself: on the GPU these are the bf16 CUDA
    program's hidden states, the very features drafting reads at run time (the float32 JAX model's differ by
    bf16 rounding). Sequences are prefilled together in ragged steps of up to tokens_per_step rows (a longer
    sequence gets a step of its own), each on fresh blocks of a private KV pool."""
    from lowering.backends import build_program
    from lowering.passes.insert_speculation import expose_hidden
    from runtime.step import StepInput, mirror_kv_groups, mirror_pool_options

    if not len(sequences):
        return []
    bs = compiled.block_size
    longest = max(len(s) for s in sequences)
    if longest > compiled.max_model_len:
        raise ValueError(f"a sequence of {longest} tokens is longer than the model's {compiled.max_model_len}")
    budget = max(int(tokens_per_step), longest)
    max_seqs = max(1, budget // 8)
    graph = compiled.graph if len(compiled.graph.outputs) > 1 else expose_hidden(compiled.graph, "draft-head features")
    num_blocks = budget // bs + max_seqs + 1
    program = build_program(compiled.target, graph, compiled.params, num_blocks=num_blocks, max_num_seqs=max_seqs,
                            max_model_len=compiled.max_model_len, **mirror_pool_options(graph, num_blocks))
    width = program.max_blocks_per_seq
    out: list[np.ndarray | None] = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))

    def run(batch: list[int]) -> None:
        lens = [len(sequences[i]) for i in batch]
        starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        tokens = np.concatenate([np.asarray(sequences[i], np.int32) for i in batch])
        positions = np.concatenate([np.arange(n, dtype=np.int32) for n in lens])
        tables = np.zeros((len(batch), width), np.int32)
        slots, first = [], 0
        for s, n in enumerate(lens):
            nb = -(-n // bs)
            tables[s, :nb] = np.arange(first, first + nb)
            slots.append(first * bs + np.arange(n, dtype=np.int32))
            first += nb
        inp = mirror_kv_groups(StepInput(tokens, positions, np.concatenate(slots).astype(np.int32), starts,
                                         np.asarray(lens, np.int32), tables, (starts[1:] - 1).astype(np.int32)), program)
        _, hidden = program.step(inp, with_hidden=True)
        hidden = np.asarray(hidden, np.float32)
        for s, i in enumerate(batch):
            out[i] = np.array(hidden[starts[s]:starts[s + 1]])

    batch: list[int] = []
    used = 0
    for i in order:
        n = len(sequences[i])
        if batch and (used + n > budget or len(batch) == max_seqs):
            run(batch)
            batch, used = [], 0
        batch.append(i)
        used += n
    if batch:
        run(batch)
    del program
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
    for toks, p, f, pred in zip(data.tokens, data.prompt_lens, data.features, _greedy_tokens(data.features, lm_head)):
        length = len(toks)
        for a in range(0, max(length - 1, 1), seq_len):
            b = min(a + seq_len + 1, length)
            if b - a < 3:
                continue
            windows.append((toks[a:b], f[a:b], pred[a:b], a, p))
    return windows


def _greedy_tokens(features: Sequence[np.ndarray], lm_head: np.ndarray, rows: int = 4096) -> list[np.ndarray]:
    """The target's own greedy next token after every feature, argmax(f @ lm_head.T), computed with JAX in
    blocks of `rows` positions (on the GPU where there is one)."""
    import jax
    import jax.numpy as jnp

    lm = jnp.asarray(np.asarray(lm_head, np.float32))
    top = jax.jit(lambda f, lm: jnp.argmax(f @ lm.T, axis=-1).astype(jnp.int32))
    out = [np.zeros(len(f), np.int32) for f in features]
    block = np.zeros((rows, lm.shape[1]), np.float32)  # one shape for every block (the last one zero-padded)
    pieces: list[tuple[int, int, int, int]] = []  # (sequence, its first row, rows, where in the block)
    used = 0

    def flush():
        picked = np.asarray(top(block, lm))
        for i, a, n, at in pieces:
            out[i][a:a + n] = picked[at:at + n]
        pieces.clear()

    for i, f in enumerate(features):  # fill blocks straight from the sequences (no copy of all features)
        a = 0
        while a < len(f):
            n = min(rows - used, len(f) - a)
            block[used:used + n] = f[a:a + n]
            pieces.append((i, a, n, used))
            used, a = used + n, a + n
            if used == rows:
                flush()
                used = 0
    if pieces:
        block[used:] = 0.0
        flush()
    return out


def _eagle_loss_fn(lay, cls_weight: float, noise: float, depth: int = 1, depth_decay: float = 0.8):
    import jax
    import jax.numpy as jnp

    def loss_fn(params, embed, lm_head, tokens, feats, preds, positions, mask, key):
        # input at t: (f_t, token t+1); predicts f_{t+1} and the target's token after it, preds[t+1]
        f_in = feats[:, :-1]
        if noise > 0:
            f_in = f_in + jax.random.uniform(key, f_in.shape, minval=-noise, maxval=noise)
        outs = _eagle_unrolled(params, lay, embed, tokens[:, 1:], f_in, positions[:, :-1], depth)
        target = feats[:, 1:]
        y = preds[:, 1:]
        m1 = mask[:, 1:]
        total = reg_sum = ce_sum = 0.0
        correct = count = None
        weight_sum = 0.0
        for m, out in enumerate(outs, start=1):
            wgt = depth_decay ** (m - 1)
            mk = m1 * (jnp.arange(m1.shape[1]) >= m - 1)[None, :]  # depth m starts from a real entry at u-m+1
            cnt = jnp.maximum(jnp.sum(mk), 1.0)
            diff = jnp.abs(out - target)
            reg = jnp.mean(jnp.where(diff < 1.0, 0.5 * diff * diff, diff - 0.5), axis=-1)  # smooth L1  [B, W]
            logits = out @ lm_head.T
            logp = jax.nn.log_softmax(logits, axis=-1)
            ce = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
            reg_l, ce_l = jnp.sum(reg * mk) / cnt, jnp.sum(ce * mk) / cnt
            total = total + wgt * (reg_l + cls_weight * ce_l)
            weight_sum += wgt
            if m == 1:
                reg_sum, ce_sum = reg_l, ce_l
                correct, count = jnp.sum((jnp.argmax(logits, axis=-1) == y) * mk), jnp.sum(mk)
        return total / weight_sum, (reg_sum, ce_sum, correct, count)

    return loss_fn


def train_eagle(data: TrainingSet, heads: DraftHeads, embed: np.ndarray, lm_head: np.ndarray, *, epochs: int = 2,
                batch_size: int = 4, seq_len: int = 512, lr: float = 2e-3, cls_weight: float = 1.0,
                noise: float = 0.05, depth: int = 1, seed: int = 0, max_steps: int | None = None,
                log: Callable[[str], None] | None = None) -> tuple[DraftHeads, list[float]]:
    """Train an EAGLE head: smooth-L1 regression of the next feature + cls_weight x cross-entropy of the target's
    greedy token, with uniform noise on the input features (Li et al. 2024). depth > 1 also trains chain steps
    2..depth on the head's own predicted features, as drafting feeds them (EAGLE-3's training-time test),
    with weights 0.8^(m-1). Returns (heads, step losses)."""
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
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    loss_fn = _eagle_loss_fn(lay, cls_weight, noise, depth)
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


def _release_torch_gpu_memory() -> None:
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_draft_heads(source: str, *, method: str, output: str, num_heads: int = 4, num_gsm8k: int = 48,
                      num_mt_bench: int = 16, num_eval: int = 12, max_tokens: int = 128, epochs: int | None = None,
                      batch_size: int | None = None, lr: float | None = None, seed: int = 0, data: str | None = None,
                      generations: str | None = None, max_num_seqs: int = 64, target: str = "cpu", depth: int = 3,
                      mt_bench_samples: int = 0,
                      log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Generate with the target, compute features, train, evaluate on held-out prompts, save to `output`.
    Returns a summary (also stored under "training" in the heads' config.json).

    `target` is the compile target that generates the training sequences ("cuda" on a GPU machine: the
    same greedy tokens at thousands of tokens a second); features and training run in JAX on its default
    device (the GPU where JAX has one)."""
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
    num_mt = len(load_prompts(data, num_gsm8k=0, num_mt_bench=num_mt_bench, split="train")) if num_mt_bench else 0
    mt_prompts = prompts[len(train_q) - num_mt:len(train_q)] if mt_bench_samples > 0 else []
    key = {"target": target_fingerprint(config, embed), "max_tokens": max_tokens, "compile_target": target,
           "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(), "mt_bench_samples": mt_bench_samples}
    seqs = _load_generations(generations, key) if generations else None
    compiled = None
    t0 = time.time()
    num_sampled = len(mt_prompts) * mt_bench_samples
    if seqs is None or len(seqs) != len(prompts) + num_sampled:
        log(f"generating {max_tokens} tokens for {len(prompts)} prompts ({len(train_q)} train, {len(eval_q)} held out)")
        compiled = compile_model(source, target=target, progress=False)
        seqs = generate_sequences(compiled, prompts, max_tokens=max_tokens, max_num_seqs=max_num_seqs)
        if mt_prompts:  # sampled continuations of the MT-Bench training prompts (their greedy ones are above)
            seqs += generate_sequences(compiled, mt_prompts, max_tokens=max_tokens, max_num_seqs=max_num_seqs,
                                       samples=mt_bench_samples)[len(mt_prompts):]
        if generations:
            _save_generations(generations, key, seqs)
        gen_s = time.time() - t0
        lens = [len(p) for p in prompts] + [len(p) for p in mt_prompts] * mt_bench_samples
        log(f"generated {sum(len(s) - n for s, n in zip(seqs, lens))} tokens ({num_sampled} sampled sequences) "
            f"in {gen_s:.1f}s")
    else:
        gen_s = 0.0
        log(f"reusing the generations in {generations}")
    t0 = time.time()
    if target == "cpu":  # the float32 flax model: the CPU program's own numbers
        feats = compute_features(model, seqs)
    else:  # the Program that will run drafting (bf16 on the GPU) gives the features drafting will see
        if compiled is None:
            compiled = compile_model(source, target=target, progress=False)
        feats = compute_features_with_program(compiled, seqs)
    compiled = None
    _release_torch_gpu_memory()  # the Programs' KV pools, before JAX trains on the GPU
    feat_s = time.time() - t0
    log(f"features of {sum(map(len, seqs))} tokens ({target} program) in {feat_s:.1f}s")
    n_train, n_all = len(train_q), len(prompts)
    sampled_lens = [len(p) for p in mt_prompts] * mt_bench_samples
    train = TrainingSet(seqs[:n_train] + seqs[n_all:], [len(p) for p in prompts[:n_train]] + sampled_lens,
                        feats[:n_train] + feats[n_all:])
    held = TrainingSet(seqs[n_train:n_all], [len(p) for p in prompts[n_train:]], feats[n_train:n_all])
    t0 = time.time()
    if method == "medusa":
        heads = init_medusa(config, embed, num_heads, seed=seed)
        heads, losses = train_medusa(train, heads, lm_head, epochs=epochs or 3, batch_size=batch_size or 256,
                                     lr=lr or 1e-3, seed=seed, log=log)
    else:
        heads = init_eagle(config, embed, seed=seed)
        heads, losses = train_eagle(train, heads, embed, lm_head, epochs=epochs or 5, batch_size=batch_size or 4,
                                    lr=lr or 2e-3, depth=depth, seed=seed, log=log)
    train_s = time.time() - t0
    summary: dict[str, Any] = {
        "source": str(source), "generated_on": target, "mt_bench_samples": mt_bench_samples, **({"depth": depth} if method == "eagle" else {}), "train_prompts": n_train, "heldout_prompts": len(eval_q), "max_tokens": max_tokens,
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
