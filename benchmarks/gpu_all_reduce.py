"""All-reduce latency across the GPUs of one host at decode sizes: llmc's push kernel vs torch symmetric memory's
one-shot all-reduce vs NCCL, same processes, same run.

What a tensor-parallel decode step does: a chain of dependent all-reduces of one activation row block (bf16, hidden
4096: 8 KiB a row). Each case is a CUDA graph of `--chain` all-reduces back to back (every one reading the previous
one's output; push: each with its own inbox, as the graph lowering gives them), replayed `--replays` times; the median
replay over the chain is the time of one all-reduce, launch gaps included. Every variant's result (one call before the
graph) is checked against the float32 rank-order sum (push: bit for bit).

    PYTHONPATH=. python3 benchmarks/gpu_all_reduce.py [--sizes 8192 524288] [--world 2]

Prints a table, writes JSON to $OUT/gpu_all_reduce.json (else bench_results/).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def _worker(rank, world, init_file, args, result_file):
    import torch
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    from kernels_gpu import all_reduce as ar

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    group = dist.group.WORLD
    name = group.group_name
    if hasattr(symm_mem, "enable_symm_mem_for_group"):
        symm_mem.enable_symm_mem_for_group(name)
    dt, idt = torch.bfloat16, torch.int16
    chain, cap = args.chain, max(args.sizes) // 2
    # push: one inbox per all-reduce of the chain
    local = symm_mem.empty(chain * world * cap, dtype=idt, device="cuda")
    handle = symm_mem.rendezvous(local, name)
    local.fill_(ar.sentinel(idt))
    peers = [local if r == rank else handle.get_buffer(r, (local.numel(),), idt) for r in range(world)]
    inboxes = [[p[k * world * cap:(k + 1) * world * cap] for p in peers] for k in range(chain)]
    err = torch.zeros(1, dtype=torch.int32, device="cuda")
    # torch one-shot: three buffers in rotation
    symm_bufs = [symm_mem.empty(cap, dtype=dt, device="cuda") for _ in range(3)]
    for b in symm_bufs:
        symm_mem.rendezvous(b, name)
    copy_out = getattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out", None)
    torch.cuda.synchronize()
    dist.barrier()

    def push(x, k):
        return ar.push_all_reduce(x, torch.empty_like(x), inboxes[k], rank, err)

    def symm(x, k):
        slot = 2 if (chain % 2 and k == chain - 1) else k % 2
        buf = symm_bufs[slot][: x.numel()]
        out = torch.empty_like(x)
        if copy_out is not None:
            copy_out(buf, x, "sum", name, out)
        else:
            buf.copy_(x)
            torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", name, out)
        return out

    def nccl(x, k):
        dist.all_reduce(x, group=group)
        return x

    rows = []
    for nbytes in args.sizes:
        n = nbytes // 2
        g = torch.Generator().manual_seed(nbytes)
        parts = [(torch.randn(n, generator=g)).to(dt) for _ in range(world)]
        for variant, fn in (("push", push), ("torch symm one-shot", symm), ("nccl", nccl)):
            x0 = parts[rank].cuda()
            # chain: all-reduce k reads the output of k - 1 (values grow by `world` a link: 2^64 fits bf16)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn(x0.clone(), 0)  # warm-up (compiles, NCCL's first-use set-up) outside the graph
                first = fn(x0.clone(), 1)  # the check (push: never one inbox twice in a row)
                torch.cuda.synchronize()
                want = ar.ref_all_reduce(parts)
                ok = bool(torch.equal(first.cpu().view(idt), want.view(idt))) if variant == "push" else \
                    bool(torch.allclose(first.float().cpu(), want.float(), atol=2e-2, rtol=2e-2))
                torch.cuda.synchronize()
                dist.barrier()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    y = x0.clone()
                    for k in range(chain):
                        y = fn(y, k)
            torch.cuda.synchronize()
            dist.barrier()
            times = []
            for _ in range(args.replays):
                dist.barrier()
                torch.cuda.synchronize()
                t = time.perf_counter()
                graph.replay()
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t) / chain * 1e6)
            rows.append({"bytes": nbytes, "variant": variant, "us": statistics.median(times), "ok": ok})
            del graph
    if rank == 0:
        Path(result_file).write_text(json.dumps({"rows": rows, "err": int(err.item())}))
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 65536, 524288])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--chain", type=int, default=64)
    ap.add_argument("--replays", type=int, default=30)
    args = ap.parse_args()

    import torch
    import torch.multiprocessing as mp

    if torch.cuda.device_count() < args.world:
        raise SystemExit(f"needs {args.world} GPUs, this machine has {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        mp.start_processes(_worker, args=(args.world, os.path.join(tmp, "init"), args, result), nprocs=args.world,
                           start_method="spawn", join=True)
        data = json.loads(Path(result).read_text())
    out = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0), "world": args.world,
           "torch": torch.__version__, "chain": args.chain, **data}
    out_dir = Path(os.environ.get("OUT") or "bench_results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_all_reduce.json").write_text(json.dumps(out, indent=2))
    print(f"\nall-reduce of bf16, {args.world} x {out['device']}, chains of {args.chain} in a CUDA graph "
          f"({out['date']}); push error flag {data['err']}")
    print(f"{'bytes':>9} {'variant':>20} {'us each':>9} {'vs nccl':>8} {'ok':>4}")
    by = {(r["bytes"], r["variant"]): r["us"] for r in data["rows"]}
    for r in data["rows"]:
        print(f"{r['bytes']:>9} {r['variant']:>20} {r['us']:>9.2f} {by[(r['bytes'], 'nccl')] / r['us']:>7.2f}x "
              f"{'yes' if r['ok'] else 'NO':>4}")


if __name__ == "__main__":
    main()
