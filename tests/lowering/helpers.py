"""Test helpers for lowering: tiny configs, numpy float64 references, ragged step builders."""
from __future__ import annotations

import math

import numpy as np

from lowering.models.config import ModelConfig
from runtime.step import StepInput


def tiny_config(**overrides) -> ModelConfig:
    base = dict(architecture="llama", vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2,
                num_heads=6, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                max_position_embeddings=256, tie_word_embeddings=False)
    base.update(overrides)
    return ModelConfig(**base)


def np_attention_f64(q, k, v, num_heads, num_kv_heads, head_dim, q_offset=0):
    """Causal attention of q rows (context index q_offset + i) over k/v rows 0..; float64."""
    q = np.asarray(q, np.float64).reshape(q.shape[0], num_heads, head_dim)
    k = np.asarray(k, np.float64).reshape(k.shape[0], num_kv_heads, head_dim)
    v = np.asarray(v, np.float64).reshape(v.shape[0], num_kv_heads, head_dim)
    group = num_heads // num_kv_heads
    out = np.zeros_like(q)
    for i in range(q.shape[0]):
        last = q_offset + i
        for h in range(num_heads):
            kh = h // group
            s = k[: last + 1, kh] @ q[i, h] / math.sqrt(head_dim)
            p = np.exp(s - s.max())
            p /= p.sum()
            out[i, h] = p @ v[: last + 1, kh]
    return out.reshape(q.shape[0], num_heads * head_dim)


class PagedLayout:
    """Assigns shuffled physical blocks to sequences (block 0 never used) and builds StepInputs."""

    def __init__(self, num_blocks: int, block_size: int, seed: int = 0):
        self.block_size = block_size
        self.free = list(np.random.default_rng(seed).permutation(np.arange(1, num_blocks)))
        self.tables: dict[int, list[int]] = {}

    def slot(self, seq: int, index: int) -> int:
        table = self.tables.setdefault(seq, [])
        while len(table) <= index // self.block_size:
            table.append(int(self.free.pop()))
        return table[index // self.block_size] * self.block_size + index % self.block_size

    def step(self, chunks: list[tuple[int, list[int], int]]) -> StepInput:
        """chunks: (seq id, new token ids, context length before them); logits for each chunk's last row."""
        token_ids, positions, slots, starts, seq_lens, rows = [], [], [], [0], [], []
        for seq, toks, start in chunks:
            for j, tok in enumerate(toks):
                token_ids.append(tok)
                positions.append(start + j)
                slots.append(self.slot(seq, start + j))
            starts.append(len(token_ids))
            seq_lens.append(start + len(toks))
            rows.append(len(token_ids) - 1)
        width = max(len(self.tables[seq]) for seq, _, _ in chunks)
        tables = np.zeros((len(chunks), width), np.int32)
        for i, (seq, _, _) in enumerate(chunks):
            tables[i, : len(self.tables[seq])] = self.tables[seq]
        as32 = lambda a: np.asarray(a, np.int32)  # noqa: E731
        return StepInput(as32(token_ids), as32(positions), as32(slots), as32(starts), as32(seq_lens), tables, as32(rows))


def for_program(program, step: StepInput) -> StepInput:
    """`step` as `program` takes it: a program with a second KV group (sliding-window layers beside global ones)
    gets the same block ids and slots in that group's own pool (which must be as large as the first)."""
    if getattr(program, "num_blocks_w", None) is not None:
        step.block_tables_w, step.slot_mapping_w = step.block_tables.copy(), step.slot_mapping.copy()
    return step


def relerr(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def run_steps(program, layout_seed, block_size, num_blocks=48):
    """Two ragged steps (prefill of 3 prompts, then a decode + a chunk + a new prompt) -> list of logits."""
    lay = PagedLayout(num_blocks, block_size, seed=layout_seed)
    rng = np.random.default_rng(layout_seed)
    prompts = [rng.integers(0, 97, n).tolist() for n in (5, 23, 1)]
    out = [program.step(for_program(program, lay.step([(i, p, 0) for i, p in enumerate(prompts)])))]
    out.append(program.step(for_program(program, lay.step([(0, [7], 5), (1, [8, 9, 10], 23), (3, [1, 2, 3, 4, 5, 6], 0),
                                                            (2, [11], 1)]))))
    return out


def quantize_ir(cm, weights=None, kv=None, rotation=False, feedback=False):
    """(graph, params) of a compiled model rewritten by the quantization passes' building blocks (RTN weights,
    fixed KV scales: no calibration). kv: a format for every layer or {layer: format}. feedback: nvfp4 layers
    round K score-aware (random K centers and anisotropic query second moments, "mse46" block scales)."""
    from lowering.quant import formats, passes

    graph, params = cm.graph, {k: np.asarray(v) for k, v in cm.params.items()}
    if rotation:
        graph, params = passes.rotate_kv(graph, params)
    if weights:
        units = [u for u in passes.weight_units(graph) if formats.supports(weights, u.shape)]
        quantized = {u.name: (weights, formats.quantize_weight(np.asarray(params[u.param], np.float32), weights))
                     for u in units}
        graph, params = passes.apply_weight_quantization(graph, params, quantized)
    if kv:
        layers = passes.kv_layers(graph)
        plan = {lay.layer: kv if isinstance(kv, str) else kv.get(lay.layer, "none") for lay in layers}
        scales = {}
        for lay in layers:
            amax = np.linspace(2.0, 4.0, lay.num_kv_heads, dtype=np.float32)
            scales[lay.layer] = ((formats.fp8_scale(amax),) * 2 if plan[lay.layer] == "fp8"
                                 else (formats.nvfp4_global_scale(4.0),) * 2)
        extra = {}
        if feedback:
            rng = np.random.default_rng(7)
            nv = [lay for lay in layers if plan[lay.layer] == "nvfp4"]
            centers = {lay.layer: rng.normal(0, 0.1, (lay.num_kv_heads, lay.head_dim)) for lay in nv}
            moments = {}
            for lay in nv:
                a = rng.standard_normal((lay.num_kv_heads, 256, lay.head_dim)) * np.geomspace(3, 0.1, lay.head_dim)
                moments[lay.layer] = np.einsum("hnd,hne->hde", a, a) / 256
            extra = dict(centers=centers, scale_rule=formats.KV_NVFP4_SCALE_RULE,
                         feedback={k: formats.feedback_factor(m) for k, m in moments.items()})
        graph, params = passes.apply_kv_quantization(graph, params, plan, scales, **extra)
    return graph, params


def run_decode_steps(program, seed, num_blocks, *, full: bool = True):
    """A ragged prefill of 3 prompts, two decode steps of all three, then a chunk + a decode + a new prompt
    (full=False: the prefill and one decode step only, two compiled shapes instead of three)."""
    lay = PagedLayout(num_blocks, 16, seed=seed)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 97, n).tolist() for n in (5, 19, 1)]
    lens = [len(p) for p in prompts]
    out = [program.step(for_program(program, lay.step([(i, p, 0) for i, p in enumerate(prompts)])))]
    for t in range(2 if full else 1):
        decodes = [(i, [(7 * t + i) % 97], lens[i] + t) for i in range(3)]
        out.append(program.step(for_program(program, lay.step(decodes))))
    if not full:
        return out
    lens = [n + 2 for n in lens]
    out.append(program.step(for_program(program, lay.step([(0, [3], lens[0]), (1, [8, 9, 10], lens[1]),
                                                           (3, [1, 2, 3, 4], 0)]))))
    return out
