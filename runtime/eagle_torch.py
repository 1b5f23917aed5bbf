"""The EAGLE draft head in torch, on the CUDA Program's device: a greedy proposal is one CUDA-graph replay.

Same arithmetic as the JAX forward in runtime/draft_heads.py (`_eagle_device_fns`): the rows the target just
computed run through the head over each request's cached entries, their K/V go into per-request slots of two
slabs, then the chain drafts n tokens feeding back its own predicted feature and token. On the GPU every
(batch, rows, context, chain length, slab) shape is captured once as a CUDA graph, so a proposal costs one
replay and two small copies instead of ~100 kernel launches from Python. On a CPU torch device (the CUDA
Program under TRITON_INTERPRET=1 in tests) the same code runs eagerly.

The slabs carry one spare slot and one spare entry: padding rows and rows past a request's real ones are
written there (torch's index_put has no "drop out-of-bounds" mode), and nothing reads them back.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np


class TorchEagleBackend:
    def __init__(self, heads, embed: np.ndarray, lm_head: np.ndarray, lay: dict, device):
        import torch

        from lowering.ops import rope_inv_freq

        self.torch = torch
        self.device = torch.device(device)
        self.lay = lay
        self.hq, self.hkv, self.dh = lay["num_heads"], lay["num_kv_heads"], lay["head_dim"]
        self.kv_width = self.hkv * self.dh
        self.eps = float(lay["rms_norm_eps"])
        f32 = torch.float32
        self.p = {k: torch.tensor(np.asarray(v, np.float32), device=self.device) for k, v in heads.params.items()}
        for name in ("o_proj", "down_proj", "fc"):
            self.p[name + ".weight.T"] = self.p[name + ".weight"].t().contiguous()
        # one matmul for q, k, v and one for gate, up: fewer kernels per chain step (each is a few microseconds)
        self.p["qkv.T"] = torch.cat([self.p[n + ".weight"] for n in ("q_proj", "k_proj", "v_proj")]).t().contiguous()
        self.p["gate_up.T"] = torch.cat([self.p["gate_proj.weight"], self.p["up_proj.weight"]]).t().contiguous()
        self.inter = int(self.p["gate_proj.weight"].shape[0])
        # the big vocabulary matrices in bf16 on the GPU (half the bytes each chain step reads), float32 elsewhere
        table_dtype = torch.bfloat16 if self.device.type == "cuda" else f32
        self.embed = torch.tensor(np.asarray(embed), device=self.device, dtype=table_dtype)
        self.lm_t = (self.embed if lm_head is embed
                     else torch.tensor(np.asarray(lm_head), device=self.device, dtype=table_dtype)).t().contiguous()
        scaling = dict(lay["rope_scaling"]) if lay.get("rope_scaling") else None
        self.inv_freq = torch.from_numpy(np.asarray(rope_inv_freq(self.dh, lay["rope_theta"], scaling), np.float32)
                                         ).to(self.device)
        self.kc = self.vc = None  # f32[S + 1, C + 1, KV]
        self.graphs: dict[tuple, Any] = {}
        self.use_graphs = self.device.type == "cuda"
        self._compiles = 0

    # -- slabs -------------------------------------------------------------------------------------

    def slab_shape(self) -> tuple[int, int]:
        return (0, 0) if self.kc is None else (int(self.kc.shape[0]) - 1, int(self.kc.shape[1]) - 1)

    def grow(self, s1: int, c1: int) -> None:
        torch = self.torch
        s0, c0 = self.slab_shape()
        kc = torch.zeros((s1 + 1, c1 + 1, self.kv_width), dtype=torch.float32, device=self.device)
        vc = torch.zeros_like(kc)
        if self.kc is not None:
            kc[:s0, :c0] = self.kc[:s0, :c0]
            vc[:s0, :c0] = self.vc[:s0, :c0]
        self.kc, self.vc = kc, vc
        self.graphs.clear()  # they captured the old slabs' addresses

    def keys(self, slot: int, n: int) -> np.ndarray:
        return self.kc[slot, :n].cpu().numpy()

    def num_compiled(self) -> int:
        return self._compiles

    # -- the head ----------------------------------------------------------------------------------

    def _rms(self, x, w):
        return self.torch.nn.functional.rms_norm(x, (x.shape[-1],), w, self.eps)

    def _rope(self, x, positions):
        """Rotate-half RoPE of x [B, Q, H, Dh] (q and k heads together) at positions [B, Q]."""
        torch = self.torch
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq  # [B, Q, Dh/2]
        emb = torch.cat([freqs, freqs], dim=-1)[..., None, :]  # [B, Q, 1, Dh]
        half = self.dh // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * emb.cos() + rotated * emb.sin()

    def _inputs(self, tokens, feats):
        e = self.embed[tokens].to(self.torch.float32)
        return self.torch.cat([e, feats], dim=-1) @ self.p["fc.weight.T"] + self.p["fc.bias"]

    def _layer(self, x, positions, lk, lv, ctx_len):
        """x f32[B, Q, D] at positions [B, Q]; lk/lv f32[B, C, KV] with ctx_len[b] entries: rows are written at
        ctx_len + q (in place) and attend to entries <= that. -> out f32[B, Q, D]."""
        torch = self.torch
        p = self.p
        F = torch.nn.functional
        b, q, _ = x.shape
        c = lk.shape[1]
        h = self._rms(x, p["input_layernorm.weight"])
        qkv = h @ p["qkv.T"]  # [B, Q, (Hq + 2 Hkv) Dh]
        nq, nk = self.hq * self.dh, self.kv_width
        qk = self._rope(qkv[..., :nq + nk].reshape(b, q, self.hq + self.hkv, self.dh), positions)
        k = qk[:, :, self.hq:].reshape(b, q, nk)
        at = ctx_len[:, None] + torch.arange(q, device=x.device)[None, :]  # [B, Q]
        rows = torch.arange(b, device=x.device)[:, None].expand(b, q)
        lk.index_put_((rows, at), k)
        lv.index_put_((rows, at), qkv[..., nq + nk:])
        mask = torch.arange(c, device=x.device)[None, None, :] <= at[:, :, None]  # [B, Q, C]
        g = self.hq // self.hkv  # grouped-query heads: each K/V head serves g query heads

        def heads(t):  # [B, C, KV] -> [B, Hq, C, Dh]
            return t.view(b, c, self.hkv, 1, self.dh).expand(b, c, self.hkv, g, self.dh).reshape(
                b, c, self.hq, self.dh).transpose(1, 2)

        o = F.scaled_dot_product_attention(qk[:, :, :self.hq].transpose(1, 2), heads(lk), heads(lv),
                                           attn_mask=mask[:, None], scale=1.0 / math.sqrt(self.dh))  # [B, Hq, Q, Dh]
        x = x + o.transpose(1, 2).reshape(b, q, nq) @ p["o_proj.weight.T"]
        h = self._rms(x, p["post_attention_layernorm.weight"])
        gu = h @ p["gate_up.T"]
        return x + (F.silu(gu[..., :self.inter]) * gu[..., self.inter:]) @ p["down_proj.weight.T"]

    def _logits(self, pred):
        return (pred.to(self.lm_t.dtype) @ self.lm_t).to(self.torch.float32)

    def _first(self, ints, feats, c: int, n_chain: int):
        """The JAX `first` in torch: -> (tokens [B, n_chain], (lk, lv, pred, logits, pos, cur_len))."""
        torch = self.torch
        ints = ints.long()
        q = feats.shape[1]
        num_slots, cap = self.kc.shape[0] - 1, self.kc.shape[1] - 1
        slots, ctx_len, last = ints[:, 0], ints[:, 1], ints[:, 2]
        tokens, positions = ints[:, 3:3 + q], ints[:, 3 + q:]
        spare = slots < 0
        slots = torch.where(spare, torch.full_like(slots, num_slots), slots)
        lk = self.kc[slots, :c].clone()
        lv = self.vc[slots, :c].clone()
        x = self._inputs(tokens, feats)
        out = self._layer(x, positions, lk, lv, ctx_len)
        # the real rows' K/V into the slabs; the rest into the spare slot / entry
        b = ints.shape[0]
        rows = torch.arange(q, device=ints.device)[None, :]
        at = ctx_len[:, None] + rows
        real = (rows <= last[:, None]) & ~spare[:, None]
        dst_slot = torch.where(real, slots[:, None].expand(b, q), torch.full_like(at, num_slots))
        dst_at = torch.where(real, at, torch.full_like(at, cap))
        src = torch.arange(b, device=ints.device)[:, None].expand(b, q)
        self.kc.index_put_((dst_slot, dst_at), lk[src, at.clamp(max=c - 1)])
        self.vc.index_put_((dst_slot, dst_at), lv[src, at.clamp(max=c - 1)])
        pred = out[torch.arange(b, device=ints.device), last]  # [B, D]
        logits = self._logits(pred)
        tok = logits.argmax(dim=-1)
        pos = positions[torch.arange(b, device=ints.device), last]
        cur_len = ctx_len + last + 1
        drafted = [tok]
        for j in range(1, n_chain):
            pred, logits = self._chain_step(lk, lv, tok, pred, pos + j, cur_len + j - 1)
            tok = logits.argmax(dim=-1)
            drafted.append(tok)
        return torch.stack(drafted, dim=1), (lk, lv, pred, logits)

    def _chain_step(self, lk, lv, tok, pred, pos, cur_len):
        x = self._inputs(tok[:, None], pred[:, None, :])
        out = self._layer(x, pos[:, None], lk, lv, cur_len)[:, 0]
        return out, self._logits(out)

    # -- the backend interface ---------------------------------------------------------------------

    def first(self, ints: np.ndarray, feats: np.ndarray, c: int, n_chain: int, want_logits: bool):
        torch = self.torch
        if want_logits or not self.use_graphs:
            with torch.no_grad():
                top, state = self._first(torch.from_numpy(ints).to(self.device), torch.from_numpy(feats).to(self.device),
                                         c, n_chain)
            return top.cpu().numpy(), (state if want_logits else None)
        key = (ints.shape, feats.shape, c, n_chain)
        entry = self.graphs.get(key)
        if entry is None:
            self._compiles += 1
            ints_in = torch.from_numpy(ints).to(self.device)
            feats_in = torch.from_numpy(feats).to(self.device)
            # the eager run is this call's answer (and warms up the kernels); the capture records without running
            with torch.no_grad():
                top, _ = self._first(ints_in, feats_in, c, n_chain)
            result = top.cpu().numpy()
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream(device=self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.no_grad(), torch.cuda.stream(stream):
                with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                    out, _ = self._first(ints_in, feats_in, c, n_chain)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self.graphs[key] = (graph, ints_in, feats_in, out)
            return result, None
        graph, ints_in, feats_in, out = entry
        ints_in.copy_(torch.from_numpy(ints))
        feats_in.copy_(torch.from_numpy(feats))
        graph.replay()
        return out.cpu().numpy(), None

    def step(self, state, tokens: np.ndarray, positions: np.ndarray, cur_len: np.ndarray):
        torch = self.torch
        lk, lv, pred, _ = state
        dev = self.device
        with torch.no_grad():
            pred, logits = self._chain_step(lk, lv, torch.from_numpy(tokens[:, 0]).to(dev).long(), pred,
                                            torch.from_numpy(positions[:, 0]).to(dev).long(),
                                            torch.from_numpy(cur_len).to(dev).long())
        return (lk, lv, pred, logits), logits.cpu().numpy()

    @staticmethod
    def logits_of(state) -> np.ndarray:
        return state[3].cpu().numpy()
