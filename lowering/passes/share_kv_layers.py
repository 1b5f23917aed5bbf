"""share_kv_layers: training-free cross-layer KV sharing (MiniCache-style): adjacent layers i, i+1 keep one merged
K/V pool pair instead of two, so each cached token costs one layer's KV less per pair.

Before (layers i and j = i + 1, after insert_paged_kv):
  ki', vi' = kv_write(k_i, v_i, slot_mapping, kv.i.k, kv.i.v)       state kv.i.k <- ki'
  o_i = paged_attention(q_i, ki', vi', ...)
  kj', vj' = kv_write(k_j, v_j, slot_mapping, kv.j.k, kv.j.v)       state kv.j.k <- kj'
  o_j = paged_attention(q_j, kj', vj', ...)
After:
  ki', vi' = kv_write(k_i, v_i, slot_mapping, kv.i.k, kv.i.v)
  o_i = paged_attention(q_i, ki', vi', ...)
  km, vm = kv_merge(k_j, v_j, slot_mapping, ki', vi')                state kv.i.k <- km   (kv.j.* are gone)
  o_j = paged_attention(q_j, km, vm, ...)
kv_merge replaces each new token's row (per KV head, K and V separately) by the SLERP midpoint of the two
layers' directions scaled by their mean magnitude (ops.kv_merge_vectors). Layer j reads merged K/V for every
token; layer i reads merged K/V for tokens of earlier steps and its own for the tokens of the step.
This is MiniCache's merge without its per-layer magnitude restore and without retaining outlier tokens.

Which pairs (`choose_pairs`): `measure_kv_similarity` runs the unshared graph on calibration windows and
returns, per adjacent pair, the mean cosine similarity of K and of V over tokens and KV heads. Candidates are
the pairs in the deeper half of the model (i >= num_layers // 2), ranked by (sim_k + sim_v) / 2 and taken
greedily without overlap. `share_kv_layers=n` takes the first n; "auto" the largest n whose perplexity increase
on the calibration windows stays within max_ppl_increase (bisection over n; each candidate graph is measured,
its windows run in chunks so that layer i reads merged K/V of earlier chunks, as it does when decoding).

Refused (IRError): quantized KV (kv_format on kv_write, kv_write_nvfp4), sliding-window layers, a pair that is
not two adjacent layers of the graph, overlapping or repeated pairs, a graph already shared.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from lowering.ir import Graph, IRError, Node, eval_dim

AUTO = "auto"
DEFAULT_CHUNK = 16  # tokens per step when measuring perplexity of a shared graph (see `window_loss`)


# ------------------------------------------------------------------------------------------ the option

def check_option(value: Any) -> Any:
    """The share_kv_layers option normalized (pairs as a list of [i, i + 1] lists), or ValueError.

    None: off; "auto": as many of the most similar pairs as max_ppl_increase allows; an int n >= 0: the n most
    similar pairs; a list of [i, i + 1] pairs: exactly those."""
    if value is None or value == AUTO:
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"share_kv_layers must be >= 0 pairs, got {value}")
        return int(value)
    if isinstance(value, (list, tuple)):
        return normalize_pairs(value)
    raise ValueError(f"share_kv_layers must be None, 'auto', a number of layer pairs or a list of [i, i + 1] "
                     f"pairs, got {value!r}")


def normalize_pairs(pairs: Sequence) -> list[list[int]]:
    """[[i, i + 1], ...] from any sequence of 2-sequences of ints; adjacent, non-overlapping, not repeated."""
    out: list[list[int]] = []
    used: dict[int, list[int]] = {}
    for pair in pairs:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in pair)):
            raise ValueError(f"share_kv_layers: each pair must be two layer indices [i, i + 1], got {pair!r}")
        i, j = int(pair[0]), int(pair[1])
        if i < 0 or j != i + 1:
            raise ValueError(f"share_kv_layers: pair {[i, j]} is not two adjacent layers [i, i + 1] with i >= 0")
        if [i, j] in out:
            raise ValueError(f"share_kv_layers: pair {[i, j]} is repeated")
        for layer in (i, j):
            if layer in used:
                raise ValueError(f"share_kv_layers: pairs {used[layer]} and {[i, j]} overlap (layer {layer} can "
                                 "share with one other layer only)")
            used[layer] = [i, j]
        out.append([i, j])
    return out


# ------------------------------------------------------------------------------------------ the rewrite

def _kv_layers(graph: Graph) -> dict[int, int]:
    """{KV layer: index of its kv_write node}, refusing graphs this pass cannot rewrite."""
    if "block_size" not in graph.meta:
        raise IRError("share_kv_layers needs a paged graph (run insert_paged_kv first)")
    if graph.meta.get("kv_shared_layers"):
        raise IRError(f"share_kv_layers already ran on this graph (pairs {graph.meta['kv_shared_layers']})")
    if graph.meta.get("kv_window") is not None or graph.meta.get("kv_window_w") is not None or any(
            n.attrs.get("window") is not None for n in graph.nodes if n.op in ("paged_attention", "attention")):
        raise IRError("share_kv_layers: the model has sliding-window attention layers; sharing KV across layers is "
                      "supported for full-attention models only")
    layers: dict[int, int] = {}
    for index, node in enumerate(graph.nodes):
        if node.op == "kv_write_nvfp4" or (node.op == "kv_write" and node.attrs.get("kv_format")):
            fmt = node.attrs.get("kv_format") or "nvfp4"
            raise IRError(f"share_kv_layers: the KV cache is quantized ({fmt}); layer sharing merges unquantized "
                          "KV only (compile without kv_cache=, or without share_kv_layers=)")
        if node.op == "kv_merge":
            raise IRError("share_kv_layers already ran on this graph (it has kv_merge nodes)")
        if node.op != "kv_write":
            continue
        pool = node.inputs[3]
        parts = pool.split(".")
        if len(parts) != 3 or parts[0] != "kv" or parts[2] != "k" or not parts[1].isdigit():
            raise IRError(f"kv_write node {index} writes {pool!r}, not a kv.<layer>.k pool")
        layers[int(parts[1])] = index
    if not layers:
        raise IRError("share_kv_layers found no kv_write: the graph has no KV cache")
    return layers


def share_kv_layers(graph: Graph, pairs: Sequence) -> Graph:
    """Layer j = i + 1 of each pair merges its K/V into layer i's pools (kv_merge) and reads them; j's pools go."""
    try:
        pairs = normalize_pairs(pairs)
    except ValueError as e:
        raise IRError(str(e)) from None
    layers = _kv_layers(graph)
    for i, j in pairs:
        missing = [x for x in (i, j) if x not in layers]
        if missing:
            raise IRError(f"share_kv_layers: pair {[i, j]} names layer {missing[0]}, but the graph's KV layers are "
                          f"0..{max(layers)}")
    graph = graph.copy()
    position = {id(n): p for p, n in enumerate(graph.nodes)}
    for i, j in sorted(pairs):
        wi, wj = graph.nodes[layers[i]], graph.nodes[layers[j]]
        pools_i, pools_j = (f"kv.{i}.k", f"kv.{i}.v"), (f"kv.{j}.k", f"kv.{j}.v")
        for a, b in zip(pools_i, pools_j):
            if graph.types[a] != graph.types[b]:
                raise IRError(f"share_kv_layers: layers {i} and {j} have different KV pools ({a}: {graph.types[a]}, "
                              f"{b}: {graph.types[b]}); only layers of one KV group with equal heads can share")
        if wi.inputs[2] != wj.inputs[2]:
            raise IRError(f"share_kv_layers: layers {i} and {j} write their K/V at different slots ({wi.inputs[2]}, "
                          f"{wj.inputs[2]})")
        current = [graph.state_updates[p] for p in pools_i]  # layer i's pools after its kv_write
        users = graph.users()
        # in-place backends (cuda) mutate the pools: every reader of i's pools must run before the merge
        late = [u.op for c in current for u in users.get(c, []) if position[id(u)] > position[id(wj)]]
        if late:
            raise IRError(f"share_kv_layers: layer {i}'s pools are read after layer {j}'s kv_write (by {late[0]})")
        merged = [graph.fresh_name(h) for h in ("kmerge", "vmerge")]
        for name, c in zip(merged, current):
            graph.types[name] = graph.types[c]
        heads, dim = int(graph.types[pools_i[0]].shape[2]), int(graph.types[pools_i[0]].shape[3])
        merge = Node("kv_merge", [wj.inputs[0], wj.inputs[1], wj.inputs[2], *current], merged,
                     {"num_kv_heads": heads, "head_dim": dim})
        graph.nodes[layers[j]] = merge
        position[id(merge)] = layers[j]
        rename = dict(zip(wj.outputs, merged))
        for node in graph.nodes:
            node.inputs = [rename.get(x, x) for x in node.inputs]
        graph.outputs = [rename.get(x, x) for x in graph.outputs]
        for p, m in zip(pools_i, merged):
            graph.state_updates[p] = m
        for p, old in zip(pools_j, wj.outputs):
            graph.state.remove(p)
            graph.state_updates.pop(p, None)
            graph.types.pop(p, None)
            graph.types.pop(old, None)
    graph.meta["num_kv_layers"] = sum(1 for s in graph.state if s.startswith("kv.") and s.endswith(".k"))
    graph.meta["kv_shared_layers"] = sorted(pairs)
    return graph


# ------------------------------------------------------------------------------------------ measuring

def _paged(graph: Graph) -> Graph:
    if "block_size" in graph.meta:
        return graph
    from lowering.passes.canonicalize import canonicalize
    from lowering.passes.insert_paged_kv import insert_paged_kv

    return canonicalize(insert_paged_kv(graph))


def _windows(token_ids) -> list[np.ndarray]:
    if isinstance(token_ids, np.ndarray) and token_ids.ndim == 1:
        return [token_ids.astype(np.int32)]
    return [np.asarray(w, np.int32).reshape(-1) for w in token_ids]


def measure_kv_similarity(graph: Graph, params: Mapping[str, Any], token_ids) -> list[dict]:
    """Per adjacent KV layer pair (i, i + 1): {"pair": [i, i + 1], "k": mean cosine similarity of the two layers'
    keys, "v": of their values} over every token of `token_ids` (one window or a list of windows, each run as
    one sequence) and every KV head. K is what the cache stores (after RoPE).

    graph: a traced graph (before insert_paged_kv) or a paged one (unshared, unquantized KV)."""
    import jax.numpy as jnp

    from lowering.quant import calibrate

    paged = _paged(graph)
    writes = []
    for node in paged.nodes:
        if node.op in ("kv_write", "kv_write_nvfp4"):
            writes.append((int(node.inputs[3].split(".")[1]), node))
    heads = {}
    for _, node in writes:
        t = paged.types[node.inputs[3]]
        dim = int(paged.types[node.inputs[0]].shape[1]) // int(t.shape[2])
        heads[node.inputs[0]] = heads[node.inputs[1]] = (int(t.shape[2]), dim)
    names = sorted(heads)

    def unit_rows(name, x):  # f32[T, H*D] -> each head vector normalized
        h, d = heads[name]
        xh = x.reshape(x.shape[0], h, d)
        return xh / jnp.maximum(jnp.sqrt(jnp.sum(xh * xh, axis=-1, keepdims=True)), 1e-12)

    runner = calibrate.GraphRunner(paged, params, _windows(token_ids))
    units = runner.collect(names, unit_rows, lambda a, b: np.concatenate([a, b]))
    by_layer = {layer: node for layer, node in writes}
    out = []
    for layer in sorted(by_layer):
        nxt = by_layer.get(layer + 1)
        if nxt is None or heads[by_layer[layer].inputs[0]] != heads[nxt.inputs[0]]:
            continue
        sims = [float(np.mean(np.sum(units[a].astype(np.float64) * units[b], axis=-1)))
                for a, b in zip(by_layer[layer].inputs[:2], nxt.inputs[:2])]
        out.append({"pair": [layer, layer + 1], "k": sims[0], "v": sims[1]})
    return out


def rank_pairs(similarities: Sequence[Mapping], num_layers: int) -> list[list[int]]:
    """Candidate pairs (i >= num_layers // 2) by (sim_k + sim_v) / 2, best first, taken greedily without overlap."""
    candidates = [s for s in similarities if s["pair"][0] >= num_layers // 2]
    candidates.sort(key=lambda s: (-(s["k"] + s["v"]) / 2, s["pair"][0]))
    used: set[int] = set()
    out = []
    for s in candidates:
        i, j = s["pair"]
        if i not in used and j not in used:
            used |= {i, j}
            out.append([i, j])
    return out


def window_loss(graph: Graph, params: Mapping[str, Any], windows: Sequence[np.ndarray], *,
                chunk: int | None = DEFAULT_CHUNK, batch_windows: int = 4) -> float:
    """Mean next-token NLL (nats) of `graph` over `windows`, each window its own sequence, run as consecutive
    steps of `chunk` tokens (None: one prefill step, as calibrate.GraphRunner.loss) with the KV pools carried
    from step to step. Chunks matter for a shared graph: layer i reads merged K/V only for tokens of earlier
    steps, so a single prefill would hide most of what sharing costs layer i when decoding."""
    import jax
    import jax.numpy as jnp

    from lowering.backends.cpu import cpu_impls
    from lowering.ir import interpret

    block_size = int(graph.meta["block_size"])
    params = {k: jnp.asarray(v) for k, v in params.items()}
    windows = [np.asarray(w, np.int32).reshape(-1) for w in windows]
    two_groups = "block_tables_w" in graph.inputs

    def run(params, state, inputs, targets, valid, max_q_len):
        outs, new_state = interpret(graph, inputs, params, state, impls=cpu_impls(max_q_len))
        logp = jax.nn.log_softmax(outs[0].astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
        return jnp.sum(jnp.where(valid, nll, 0.0)), new_state

    fn = jax.jit(run, static_argnums=(5,))
    total, count = 0.0, 0
    for b in range(0, len(windows), batch_windows):
        batch = windows[b:b + batch_windows]
        per_seq = [-(-w.size // block_size) for w in batch]
        tables = np.zeros((len(batch), max(per_seq)), np.int32)
        next_block = 1  # block 0 unused
        for s, n in enumerate(per_seq):
            tables[s, :n] = np.arange(next_block, next_block + n)
            next_block += n
        env = {"N": next_block, "NW": next_block}
        state = {s: jnp.zeros(tuple(eval_dim(d, env) for d in graph.types[s].shape), graph.types[s].dtype)
                 for s in graph.state}
        longest = max(w.size for w in batch)
        step = chunk or longest
        for start in range(0, longest, step):
            seqs = [s for s, w in enumerate(batch) if w.size > start]
            rows = [np.arange(start, min(start + step, batch[s].size), dtype=np.int32) for s in seqs]
            idx = np.concatenate(rows)
            owner = np.concatenate([np.full(r.size, s) for s, r in zip(seqs, rows)])
            slots = tables[owner, idx // block_size] * block_size + idx % block_size
            inputs = {
                "token_ids": np.concatenate([batch[s][r] for s, r in zip(seqs, rows)]),
                "positions": idx, "slot_mapping": slots.astype(np.int32),
                "query_start": np.concatenate([[0], np.cumsum([r.size for r in rows])]).astype(np.int32),
                "seq_lens": np.array([r[-1] + 1 for r in rows], np.int32), "block_tables": tables[seqs],
                "logit_rows": np.arange(idx.size, dtype=np.int32)}
            if two_groups:
                inputs["block_tables_w"], inputs["slot_mapping_w"] = inputs["block_tables"], inputs["slot_mapping"]
            targets = np.concatenate([np.append(batch[s], 0)[r + 1] for s, r in zip(seqs, rows)]).astype(np.int32)
            valid = np.concatenate([r < batch[s].size - 1 for s, r in zip(seqs, rows)])
            max_q = max(r.size for r in rows)
            nll, state = fn(params, state, {k: inputs[k] for k in graph.inputs}, targets, valid, max_q)
            total += float(nll)
            count += int(valid.sum())
    return total / max(count, 1)


# ------------------------------------------------------------------------------------------ choosing

def apply_share_kv_layers(graph: Graph, params: Mapping[str, Any], option: Any, *, windows=None, ppl_windows=None,
                          max_ppl_increase: float | None = 0.01, calibration_source: str = "calibration",
                          chunk: int | None = DEFAULT_CHUNK, log: Callable[[str], None] | None = None) -> Graph:
    """share_kv_layers for a compile option (check_option's values) on a paged graph with its params.

    An int or "auto" measures adjacent-layer similarity on `windows` (token windows; calibrate.calibration_windows)
    and picks pairs (rank_pairs); "auto" bisects over the number of pairs for the largest whose perplexity increase
    (window_loss on `ppl_windows`, default `windows`, relative to `graph`) stays within max_ppl_increase.
    graph.meta["kv_sharing"] records the request, the pairs, the similarities and, for "auto", the measured
    perplexities."""
    log = log or (lambda msg: None)
    option = check_option(option)
    if option is None or option == 0 or option == []:
        return graph
    start = time.perf_counter()
    layers = _kv_layers(graph)  # refuse early (quantized KV, windows) before spending time on measurements
    record: dict[str, Any] = {"requested": option}
    if isinstance(option, list):
        pairs = option
    else:
        if windows is None:
            raise IRError(f"share_kv_layers={option!r} needs calibration windows to measure layer similarity")
        if option == AUTO and max_ppl_increase is None:
            raise IRError("share_kv_layers='auto' needs a perplexity budget (max_ppl_increase); with the guard off, "
                          "ask for a number of pairs or a list of pairs")
        import jax.numpy as jnp

        from lowering.quant import calibrate

        params = {k: jnp.asarray(v) for k, v in params.items()}
        sims = measure_kv_similarity(graph, params, windows)
        record["similarity"] = sims
        ranked = rank_pairs(sims, len(layers))
        record["candidates"] = ranked
        log("share_kv_layers: adjacent-layer K/V cosine similarity " + ", ".join(
            f"{s['pair'][0]}-{s['pair'][1]} {s['k']:.3f}/{s['v']:.3f}" for s in sims))
        if option != AUTO:
            if option > len(ranked):
                raise IRError(f"share_kv_layers={option} asks for {option} pairs, but the deeper half of this "
                              f"{len(layers)}-layer model (layers >= {len(layers) // 2}) has {len(ranked)} "
                              "non-overlapping adjacent pairs")
            pairs = ranked[:option]
        else:
            budget = float(max_ppl_increase)
            ppl_windows = windows if ppl_windows is None else ppl_windows
            base = window_loss(graph, params, ppl_windows, chunk=chunk)
            increases: dict[int, float] = {0: 0.0}

            def increase(n: int) -> float:
                if n not in increases:
                    loss = window_loss(share_kv_layers(graph, ranked[:n]), params, ppl_windows, chunk=chunk)
                    increases[n] = calibrate.ppl_increase(loss, base)
                    log(f"share_kv_layers: {n} pairs -> ppl {increases[n]:+.3%}")
                return increases[n]

            # the largest n within budget: all of them, else bisection (the increase grows roughly with n)
            lo, hi = 0, len(ranked)
            if hi and increase(hi) <= budget:
                lo = hi
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if increase(mid) <= budget:
                    lo = mid
                else:
                    hi = mid
            pairs = ranked[:lo]
            record["ppl"] = {"base": math.exp(base), "shared": math.exp(base) * (1 + increases[lo]),
                             "increase": increases[lo], "budget": budget,
                             "tokens": int(sum(np.size(w) for w in ppl_windows)),
                             "source": calibration_source, "chunk": chunk,
                             "evaluations": [[n, inc] for n, inc in sorted(increases.items())]}
    if pairs:
        graph = share_kv_layers(graph, pairs)
    else:
        graph = graph.copy()
        graph.meta["kv_shared_layers"] = []
    record["pairs"] = [list(p) for p in sorted(pairs)]
    record["seconds"] = time.perf_counter() - start
    graph.meta["kv_sharing"] = record
    msg = f"share_kv_layers: sharing {len(pairs)} layer pair(s) {record['pairs']}"
    if "ppl" in record:
        msg += f" (ppl {record['ppl']['increase']:+.3%}, budget {record['ppl']['budget']:.2%})"
    log(msg)
    return graph
