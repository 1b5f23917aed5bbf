"""The accuracy guard: measure what each quantized unit (a linear's weight, a layer's KV cache) costs in
perplexity on calibration text, and keep the most sensitive units in the model's dtype until the whole plan
stays within `max_ppl_increase`. Measurements fake-quantize (weights replaced by their dequantized values,
fp8 activations and KV rounded in place) so one compiled forward serves every candidate plan; the final
graph is then measured for real and both numbers go into the report and the artifact manifest.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from lowering.ir import kv_bytes_per_block
from lowering.quant import calibrate, formats
from lowering.quant.passes import UNQUANTIZED

KV_CODES = {UNQUANTIZED: 0, "fp8": 1, "nvfp4": 2}


@dataclasses.dataclass
class GuardResult:
    base_loss: float
    full_increase: float  # every requested unit quantized
    final_increase: float  # the chosen plan (fake-quantized estimate)
    sensitivity: dict[str, float]  # unit -> ppl increase with only that unit quantized (when a sweep ran)
    kept: list[str]  # units kept in higher precision, most sensitive first
    evaluations: int


def run_guard(runner, graph, params, units, quantized, layers, kv_scales, options, log, kv_centers=None,
              kv_feedback=None) -> GuardResult:
    budget = float(options.max_ppl_increase)
    # A weight that something else also reads (a tied embedding read by embed and logits) gets a private
    # copy for its quantized unit, so that replacing it does not change the other reader.
    graph = graph.copy()
    params = dict(params)
    users = graph.users()
    unit_param = {}
    for u in units:
        unit_param[u.name] = u.param
        if u.name in quantized and len(users.get(u.param, [])) > 1:
            private = unit_param[u.name] = f"{u.param}#{u.name}"
            graph.params.append(private)
            graph.types[private] = graph.types[u.param]
            params[private] = params[u.param]
            node = graph.nodes[u.node_index]
            node.inputs = [private if name == u.param else name for name in node.inputs]
    guard_runner = calibrate.GraphRunner(graph, params, runner.windows[:options.guard_windows])
    linear_index = {id(n): i for i, n in enumerate(guard_runner.linear_nodes)}
    unit_by_name = {u.name: u for u in units}
    dequant = {name: formats.dequantize_weight(parts, fmt).astype(params[unit_by_name[name].param].dtype)
               for name, (fmt, parts) in quantized.items()}
    kv_units = [f"kv.{lay.layer}" for lay in layers if lay.format != UNQUANTIZED]
    all_units = list(quantized) + kv_units
    base_flags = guard_runner.no_flags()
    for i, lay in enumerate(layers):
        if lay.layer in kv_scales:
            k_s, v_s = kv_scales[lay.layer]
            if lay.format == "fp8":
                base_flags.kv_scale[i] = np.stack([k_s, v_s])
            elif lay.format == "nvfp4":
                base_flags.kv_global[i] = [float(k_s), float(v_s)]
                if kv_centers and lay.layer in kv_centers:
                    base_flags.kv_center[i] = kv_centers[lay.layer]
                if kv_feedback and lay.layer in kv_feedback:
                    base_flags.kv_feedback[i] = kv_feedback[lay.layer]
    layer_pos = {f"kv.{lay.layer}": i for i, lay in enumerate(layers)}
    evaluations = 0

    def loss_of(active: set[str]) -> float:
        nonlocal evaluations
        evaluations += 1
        flags = dataclasses.replace(base_flags, act_fp8=base_flags.act_fp8.copy(),
                                    kv_format=base_flags.kv_format.copy())
        override = {}
        for name in active:
            if name in layer_pos:
                flags.kv_format[layer_pos[name]] = KV_CODES[layers[layer_pos[name]].format]
                continue
            unit = unit_by_name[name]
            override[unit_param[name]] = dequant[name]
            if quantized[name][0] == "fp8":
                flags.act_fp8[linear_index[id(graph.nodes[unit.node_index])]] = 1.0
        return guard_runner.loss(override, flags)

    base = loss_of(set())
    full = calibrate.ppl_increase(loss_of(set(all_units)), base)
    log(f"guard: base ppl {math.exp(base):.4f} on {guard_runner.num_tokens} tokens; everything quantized: "
        f"{full:+.3%} (budget {budget:.2%})")
    if full <= budget:
        return GuardResult(base, full, full, {}, [], evaluations)
    sensitivity = {}
    for name in all_units:
        sensitivity[name] = calibrate.ppl_increase(loss_of({name}), base)
    order = sorted(all_units, key=lambda n: -sensitivity[n])
    log("guard: most sensitive: " + ", ".join(f"{n} {sensitivity[n]:+.3%}" for n in order[:5]))
    # smallest k such that keeping the k most sensitive units in high precision meets the budget:
    # exponential search, then bisection (the increase falls roughly monotonically with k)
    cache: dict[int, float] = {0: full, len(order): 0.0}

    def increase(k: int) -> float:
        if k not in cache:
            cache[k] = calibrate.ppl_increase(loss_of(set(order[k:])), base)
        return cache[k]

    hi = 1
    while hi < len(order) and increase(hi) > budget:
        hi *= 2
    hi = min(hi, len(order))
    lo = hi // 2  # increase(lo) > budget (or lo == 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if increase(mid) <= budget:
            hi = mid
        else:
            lo = mid
    kept = order[:hi]
    log(f"guard: keeping {len(kept)} of {len(order)} units in higher precision -> {increase(hi):+.3%}")
    return GuardResult(base, full, increase(hi), sensitivity, kept, evaluations)


@dataclasses.dataclass
class QuantReport:
    """What quantization did and what it cost; stored in the artifact manifest under "quantization"."""

    weights: dict[str, str]  # unit -> format used ("none": kept in the model dtype)
    methods: dict[str, str]  # unit -> "rtn" | "gptq" (quantized units)
    kv: dict[str, str]  # "kv.<layer>" -> format
    kv_rotation: bool
    kv_rounding: str  # nvfp4 K: "score" | "nearest" (QuantOptions.kv_rounding; "nearest" for other formats)
    requested: dict[str, Any]
    calibration: dict[str, Any]
    budget: float | None
    base_ppl: float | None
    full_plan_increase: float | None
    estimated_increase: float | None
    measured_increase: float | None
    measured_ppl: float | None
    kept: list[str]
    skipped: dict[str, str]
    sensitivity: dict[str, float]
    weight_bytes: dict[str, int]
    kv_bytes_per_token: dict[str, float]
    guard_evaluations: int
    seconds: float

    @classmethod
    def build(cls, options, units, methods, final_weights, layers, kv_plan, guard, measured, graph, params,
              new_graph, new_params, calib_source, calib_tokens, seconds) -> "QuantReport":
        weights = {u.name: (final_weights[u.name][0] if u.name in final_weights else UNQUANTIZED) for u in units}
        kv = {f"kv.{lay.layer}": kv_plan.get(lay.layer, UNQUANTIZED) for lay in layers}
        base_loss, final_loss = measured if measured else (None, None)
        return cls(
            weights=weights,
            methods={n: methods[n] for n in final_weights},
            kv=kv, kv_rotation=bool(options.kv_rotation),
            kv_rounding=options.kv_rounding if "nvfp4" in kv.values() else "nearest",
            requested={"weights": options.weights, "kv_cache": options.kv_cache, "method": options.method},
            calibration={"source": calib_source, "tokens": int(calib_tokens),
                         "windows": options.calibration_windows, "window": options.calibration_window,
                         "guard_windows": options.guard_windows},
            budget=options.max_ppl_increase,
            base_ppl=math.exp(base_loss) if base_loss is not None else None,
            full_plan_increase=guard.full_increase if guard else None,
            estimated_increase=guard.final_increase if guard else None,
            measured_increase=calibrate.ppl_increase(final_loss, base_loss) if measured else None,
            measured_ppl=math.exp(final_loss) if measured else None,
            kept=list(guard.kept) if guard else [],
            skipped={u.name: u.skip_reason for u in units if u.skip_reason},
            sensitivity={k: float(v) for k, v in (guard.sensitivity if guard else {}).items()},
            weight_bytes={"before": _nbytes(params), "after": _nbytes(new_params)},
            kv_bytes_per_token={"before": kv_bytes_per_token(graph), "after": kv_bytes_per_token(new_graph)},
            guard_evaluations=guard.evaluations if guard else 0,
            seconds=float(seconds),
        )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def format(self) -> str:
        counts: dict[str, int] = {}
        for fmt in self.weights.values():
            counts[fmt] = counts.get(fmt, 0) + 1
        kv_counts: dict[str, int] = {}
        for fmt in self.kv.values():
            kv_counts[fmt] = kv_counts.get(fmt, 0) + 1
        wb, kb = self.weight_bytes, self.kv_bytes_per_token
        lines = [
            "quantization plan",
            f"  weights   {', '.join(f'{n} x {f}' for f, n in sorted(counts.items()))}"
            f"   ({wb['before'] / 2**20:.1f} MiB -> {wb['after'] / 2**20:.1f} MiB)",
            f"  kv cache  {', '.join(f'{n} x {f}' for f, n in sorted(kv_counts.items())) or 'none'}"
            f"{' (hadamard-rotated)' if self.kv_rotation else ''}"
            f"{' (score-aware K rounding)' if self.kv_rounding == 'score' else ''}"
            f"   ({kb['before']:.0f} -> {kb['after']:.0f} bytes per token)",
        ]
        if self.base_ppl is not None:
            lines.append(f"  calibration ppl {self.base_ppl:.4f} -> {self.measured_ppl:.4f} "
                         f"({self.measured_increase:+.3%}; budget "
                         f"{'off' if self.budget is None else f'{self.budget:.2%}'}) on {self.calibration['source']}")
        if self.kept:
            lines.append(f"  kept in higher precision ({len(self.kept)}): " + ", ".join(
                f"{n} ({self.sensitivity.get(n, float('nan')):+.2%})" for n in self.kept[:8])
                + (" ..." if len(self.kept) > 8 else ""))
        for name, why in list(self.skipped.items())[:4]:
            lines.append(f"  not quantized: {name}: {why}")
        return "\n".join(lines)


def _nbytes(params) -> int:
    return int(sum(np.asarray(v).nbytes for v in params.values()))


def kv_bytes_per_token(graph) -> float:
    """Bytes of KV pool state (pools and block-scale pools of every layer) per cached token."""
    return kv_bytes_per_block(graph) / int(graph.meta.get("block_size", 1))
