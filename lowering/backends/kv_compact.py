"""KV compaction under an eviction policy (lowering/kv_policy.py): which cached tokens stay, and moving them.

One compaction (runtime/step.py KVCompaction) keeps new_len of a sequence's old_len cached tokens:

  StreamingLLM   indices 0 .. sinks-1 and the newest new_len - sinks, the same for every layer and head;
                 with positions="cache" each moved key is re-rotated by (new index - old index), so it carries
                 the RoPE of its new position in the cache (R(a) R(b) = R(a + b), exact up to rounding)
  H2O            per layer and KV head: the `recent` newest, plus the older tokens with the largest
                 accumulated attention mass (kv.<i>.mass), in their original order

Every state buffer of a layer whose first dim is the pool's block count moves the same way per KV head (K and
V pools, quantized codes and block scales, the mass pool): new[i, h] = old[src_slot[keep[h, i]], h] written at
dst_slot[i]. All sources are gathered before any destination is written. Two implementations of the same
rule: JAX (cpu and tpu targets, one jitted function per padded shape, buffers donated) and torch (cuda).
"""
from __future__ import annotations

import re

import numpy as np

from lowering import ops
from lowering.kv_policy import EvictionPlan

_LAYER = re.compile(r"^kv\.(\d+)\.")


def pool_buffers(graph) -> dict[str, list[str]]:
    """{layer: state names of that layer whose first dim is the first KV group's block count N}."""
    out: dict[str, list[str]] = {}
    for name in graph.state:
        m = _LAYER.match(name)
        if m and graph.types[name].shape[0] == "N":
            out.setdefault(m.group(1), []).append(name)
    return out


def rope_rotation(attrs: dict) -> tuple[np.ndarray, int]:
    """(f32[R/2] inverse frequencies, R rotated features) of a rope op's attrs (re-rotatable ones only)."""
    freqs = ops.rope_frequencies(attrs["head_dim"], attrs["theta"], attrs.get("rope_scaling"))
    if freqs.long_inv_freq is not None or freqs.attention_factor != 1.0:
        raise ValueError("this rope scaling cannot be re-rotated by a position delta")
    return np.asarray(freqs.inv_freq, np.float32), int(freqs.rotary_dim)


def _layout(graph) -> tuple[dict[str, list[str]], dict[str, tuple[np.ndarray, int]]]:
    """(pool_buffers(graph), {K pool: rope_rotation of its keys}), computed once per graph (every compaction of a
    program reads them)."""
    cached = graph.__dict__.get("_kv_compact_layout")
    if cached is None:
        rope = {name: rope_rotation(attrs) for name, attrs in (graph.meta.get("kv_policy_rope") or {}).items()}
        cached = graph.__dict__["_kv_compact_layout"] = (pool_buffers(graph), rope)
    return cached


def _bucket(n: int) -> int:
    return 1 << max(int(n) - 1, 1).bit_length()


# ---------------------------------------------------------------------------------------------
# JAX (cpu, tpu)


def compact_jax(state: dict, graph, plan: EvictionPlan, compactions, block_size: int) -> dict:
    """The program state with each compaction applied, in order (buffers donated: update in place)."""
    import jax.numpy as jnp

    names = tuple(sorted(n for ns in _layout(graph)[0].values() for n in ns))
    for c in compactions:
        src, dst = c.slots(block_size)
        pad = _bucket(c.old_len)
        src_pad = np.zeros(pad, np.int32)
        src_pad[: c.old_len] = src
        cache = graph.__dict__.setdefault("_jax_compactors", {})  # one jitted function per padded shape
        key = (plan, names, pad, c.new_len)
        if key not in cache:
            cache[key] = _jax_compactor(graph, plan, names, pad, c.new_len)
        fn = cache[key]
        sub = {n: state[n] for n in names}
        new = fn(sub, jnp.asarray(src_pad), jnp.asarray(dst), jnp.int32(c.old_len))
        state = {**state, **new}
    return state


def _jax_compactor(graph, plan: EvictionPlan, names: tuple, old_pad: int, new_len: int):
    import jax
    import jax.numpy as jnp

    layers, rope = _layout(graph)
    heads_of = {n: int(graph.types[n].shape[2]) for n in names}

    def keep_for(layer_names, sub, src, old_len, num_heads):
        i = jnp.arange(new_len)
        if plan.kind == "streaming":
            keep = jnp.where(i < plan.sinks, i, old_len - new_len + i)
            return jnp.broadcast_to(keep, (num_heads, new_len))
        mass_name = [n for n in layer_names if n.endswith(".mass")][0]
        flat = sub[mass_name].reshape(-1, num_heads)
        r = min(plan.recent, new_len)
        heavy = new_len - r
        j = jnp.arange(old_pad)
        m = jnp.take(flat, src, axis=0)  # [old_pad, H]
        score = jnp.where((j < old_len - r)[:, None], m, -jnp.inf).T  # [H, old_pad]
        recent = jnp.broadcast_to(old_len - r + jnp.arange(r), (num_heads, r))
        if heavy == 0:
            return recent
        _, idx = jax.lax.top_k(score, heavy)
        return jnp.concatenate([jnp.sort(idx, axis=1), recent], axis=1)

    def run(sub, src, dst, old_len):
        out = {}
        i = jnp.arange(new_len)
        for layer, layer_names in layers.items():
            h = heads_of[layer_names[0]]
            keep = keep_for(layer_names, sub, src, old_len, h)  # [H, new_len]
            rows = jnp.take(src, keep)  # [H, new_len] source slots
            hidx = jnp.arange(h)[:, None]
            for name in layer_names:
                buf = sub[name]
                is_f8 = buf.dtype == jnp.float8_e4m3fn
                if is_f8:
                    buf = jax.lax.bitcast_convert_type(buf, jnp.uint8)
                flat = buf.reshape(buf.shape[0] * buf.shape[1], *buf.shape[2:])
                vals = flat[rows, hidx]  # [H, new_len, ...]
                if name in rope and plan.cache_positions:
                    inv_freq, rdim = rope[name]
                    delta = (i[None, :] - keep).astype(jnp.float32)  # [H, new_len]
                    vals = _rotate_jnp(vals, delta, inv_freq, rdim)
                flat = flat.at[dst[None, :], hidx].set(vals)
                flat = flat.reshape(buf.shape)
                out[name] = jax.lax.bitcast_convert_type(flat, jnp.float8_e4m3fn) if is_f8 else flat
        return out

    return jax.jit(run, donate_argnums=(0,))


def _rotate_jnp(vals, delta, inv_freq, rdim):
    import jax.numpy as jnp

    x = vals.astype(jnp.float32)
    angles = delta[..., None] * jnp.asarray(inv_freq)[None, None, :]  # [H, n, R/2]
    emb = jnp.concatenate([angles, angles], axis=-1)
    xr, rest = x[..., :rdim], x[..., rdim:]
    half = rdim // 2
    rot = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    out = xr * jnp.cos(emb) + rot * jnp.sin(emb)
    return jnp.concatenate([out, rest], axis=-1).astype(vals.dtype)


# ---------------------------------------------------------------------------------------------
# torch (cuda)


def compact_torch(state: dict, graph, plan: EvictionPlan, compactions, block_size: int) -> None:
    """Apply each compaction to the torch state buffers in place, in order."""
    import torch

    layers, rope = _layout(graph)
    if not layers:
        return
    device = state[next(iter(layers.values()))[0]].device
    for c in compactions:
        src_np, dst_np = c.slots(block_size)
        src = torch.as_tensor(src_np, dtype=torch.long, device=device)
        dst = torch.as_tensor(dst_np, dtype=torch.long, device=device)
        new_len, old_len = c.new_len, c.old_len
        i = torch.arange(new_len, device=device)
        for layer, names in layers.items():
            h = int(state[names[0]].shape[2])
            if plan.kind == "streaming":
                keep = torch.where(i < plan.sinks, i, old_len - new_len + i).expand(h, new_len)
            else:
                mass = state[[n for n in names if n.endswith(".mass")][0]]
                m = mass.reshape(-1, h)[src]  # [old_len, H]
                r = min(plan.recent, new_len)
                heavy = new_len - r
                recent = (old_len - r + torch.arange(r, device=device)).expand(h, r)
                if heavy:
                    idx = torch.topk(m[: old_len - r].T, heavy, dim=1).indices
                    keep = torch.cat([torch.sort(idx, dim=1).values, recent], dim=1)
                else:
                    keep = recent
            rows = src[keep]  # [H, new_len]
            hidx = torch.arange(h, device=device)[:, None]
            for name in names:
                buf = state[name]
                raw = buf.view(torch.uint8) if buf.dtype == torch.float8_e4m3fn else buf
                flat = raw.view(raw.shape[0] * raw.shape[1], *raw.shape[2:])
                vals = flat[rows, hidx]  # gathered (a copy) before any write
                if name in rope and plan.cache_positions:
                    inv_freq, rdim = rope[name]
                    vals = _rotate_torch(vals, (i[None, :] - keep).float(), inv_freq, rdim)
                flat[dst[None, :], hidx] = vals


def _rotate_torch(vals, delta, inv_freq, rdim):
    import torch

    x = vals.float()
    angles = delta[..., None] * torch.as_tensor(inv_freq, device=vals.device)[None, None, :]
    emb = torch.cat([angles, angles], dim=-1)
    xr, rest = x[..., :rdim], x[..., rdim:]
    half = rdim // 2
    rot = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    out = xr * torch.cos(emb) + rot * torch.sin(emb)
    return torch.cat([out, rest], dim=-1).to(vals.dtype)
