"""The push all-reduce (kernels_gpu/all_reduce.py) against its reference, bit for bit.

In one process (the interpreter on a CPU, or one GPU) the ranks run one after another: the pushes a later rank would
have made before an earlier rank polls are placed in that rank's inbox first, and every later rank finds the earlier
ranks' pushes where their kernels put them. On two GPUs, two processes exchange real partials through torch symmetric
memory, eagerly and inside a CUDA graph, many times over the same inboxes (the reuse rule)."""
import os
import tempfile

import pytest
import torch


@pytest.fixture(scope="module")
def ar(kernel_module):
    return kernel_module("all_reduce")


def _partials(world, n, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    parts = [(torch.randn(n, generator=g) * 3).to(dtype) for _ in range(world)]
    parts[0][: min(n, 7)] = -0.0  # the sentinel's value: sent as +0.0
    if n > 20:
        parts[-1][11] = float("inf")
        parts[world // 2][13] = -0.0
    return [p.to(device) for p in parts]


def _run_ranks_in_turn(ar, parts, device, slack=5, call=None):
    """Every rank's kernel (call(rank, partial, inboxes, err) -> outputs; default push_all_reduce), rank 0 first;
    returns (each rank's outputs, inboxes, error flags)."""
    world, n = len(parts), parts[0].numel()
    idt = ar.int_view_dtype(parts[0].dtype)
    sent = ar.sentinel(idt)
    boxes = [torch.full((world * n + slack,), sent, dtype=idt, device=device) for _ in range(world)]
    for r in range(world):  # what ranks after r pushed before rank r polls
        for s in range(r + 1, world):
            bits = parts[s].view(idt).reshape(-1).clone()
            bits[bits == sent] = 0
            boxes[r][s * n:(s + 1) * n] = bits
    outs, errs = [], []
    for r in range(world):
        err = torch.zeros(1, dtype=torch.int32, device=device)
        if call is None:
            out = torch.full_like(parts[r], float("nan"))
            ar.push_all_reduce(parts[r], out, boxes, r, err)
        else:
            out = call(r, parts[r], boxes, err)
        outs.append(out)
        errs.append(int(err.item()))
    return outs, boxes, errs


@pytest.mark.parametrize("world,n", [(2, 1), (2, 4096), (2, 2500), (3, 1030), (4, 777), (8, 300)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_rank_gets_the_reference_sum(ar, device, world, n, dtype):
    parts = _partials(world, n, dtype, device, seed=world * 1000 + n)
    outs, boxes, errs = _run_ranks_in_turn(ar, parts, device)
    assert errs == [0] * world
    want = ar.ref_all_reduce([p.cpu() for p in parts])
    idt = ar.int_view_dtype(dtype)
    for out in outs:  # bit for bit on every rank (so the ranks' next layers see the same activations)
        assert torch.equal(out.cpu().view(idt), outs[0].cpu().view(idt))
    if device == "cuda":  # and the reference's bits
        assert torch.equal(outs[0].cpu().view(idt), want.view(idt))
    else:  # NOTE: the interpreter rounds f32 -> bf16 / f16 inexactly: one unit in the last place
        ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(torch.finfo(dtype).tiny)
        got = outs[0].cpu().float()
        assert bool((((got - want.float()).abs() <= ulp) | (got == want.float())).all())
    sent = ar.sentinel(idt)
    # the last rank polled after every push: its inbox is empty again, the slack past the regions untouched
    assert bool((boxes[-1] == sent).all())
    # the earlier ranks' inboxes hold the later ranks' real pushes (made after they polled): sanitized partials
    for r in range(world - 1):
        for s in range(r + 1, world):
            bits = parts[s].view(idt).clone()
            bits[bits == sent] = 0
            assert torch.equal(boxes[r][s * n:(s + 1) * n], bits)
        assert bool((boxes[r][: (r + 1) * n] == sent).all())


@pytest.mark.parametrize("world,rows,hidden", [(2, 1, 4096), (2, 5, 1000), (4, 3, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("residual,offset", [(True, None), (False, None), (True, 1.0)])
def test_all_reduce_fused_with_add_rms_norm_is_the_two_kernels(ar, kernel_module, device, world, rows, hidden, dtype,
                                                              residual, offset):
    norms = kernel_module("norms")
    g = torch.Generator().manual_seed(rows * hidden + world)
    parts = [(torch.randn(rows, hidden, generator=g) * 2).to(dtype).to(device) for _ in range(world)]
    res = (torch.randn(rows, hidden, generator=g) * 2).to(dtype).to(device) if residual else None
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype).to(device)
    eps = 1e-5

    def fused(r, x, boxes, err):
        return ar.push_all_reduce_add_rms_norm(x, res, w, eps, boxes, r, err, weight_offset=offset)

    outs, boxes, errs = _run_ranks_in_turn(ar, parts, device, call=fused)
    assert errs == [0] * world
    reduced, _, _ = _run_ranks_in_turn(ar, [p.reshape(-1) for p in parts], device)
    want_norm, want_sum = norms.add_rms_norm(reduced[0].view(rows, hidden), res, w, eps, offset)
    if res is None:
        want_sum = reduced[0].view(rows, hidden)
    for normed, summed in outs:  # the same bits as the all-reduce then add_rms_norm, on every rank
        assert torch.equal(normed, want_norm) and torch.equal(summed, want_sum)
    ref_norm, _ = norms.ref_add_rms_norm(ar.ref_all_reduce([p.cpu() for p in parts]).double(),
                                         None if res is None else res.cpu().double(), w.cpu().double(), eps, offset)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(outs[0][0].cpu().double(), ref_norm, atol=tol, rtol=tol)
    assert bool((boxes[-1] == ar.sentinel(ar.int_view_dtype(dtype))).all())


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_all_reduce_folded_into_the_gemvs_around_it(ar, kernel_module, device, world, dtype):
    """Row-parallel GEMVs (plain and SwiGLU) push their tiles into the inboxes of three all-reduces; the norm GEMVs
    after them sum the inbox (program 0, raising a flag the other programs wait for) instead of reading their
    activation: twice round, so every inbox and flag is used again after it was emptied / lowered."""
    fg = kernel_module("fused_gemv")
    inbox = kernel_module("inbox")
    hidden, k_in, n_out, ring = 72, 40, 20, 3
    g = torch.Generator().manual_seed(world)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    idt = ar.int_view_dtype(dtype)
    sent = ar.sentinel(idt)
    boxes = [[torch.full((world * hidden,), sent, dtype=idt, device=device) for _ in range(ring)]
             for _ in range(world)]  # boxes[rank][all-reduce]
    errs = [torch.zeros(1, dtype=torch.int32, device=device) for _ in range(world)]
    flags = [torch.zeros(ring, dtype=torch.int32, device=device) for _ in range(world)]
    w_c, nw = rnd(n_out, hidden, scale=hidden ** -0.5), 1 + 0.1 * rnd(hidden)
    for step in range(2 * ring):
        slot = step % ring
        swiglu = step % 2 == 1
        xs = [rnd(1, 2 * k_in if swiglu else k_in) for _ in range(world)]
        ws = [rnd(hidden, k_in, scale=k_in ** -0.5) for _ in range(world)]
        ys = []
        for r in range(world):  # the producers, rank 0 first
            ex = inbox.Exchange(rank=r, world=world, err=errs[r], push=tuple(boxes[q][slot] for q in range(world)))
            ys.append(fg.act_gemv(xs[r], ws[r], exchange=ex) if swiglu else fg.gemv(xs[r], ws[r], exchange=ex))
        reduced, _, _ = _run_ranks_in_turn(ar, [y.reshape(-1) for y in ys], device)
        residual = rnd(1, hidden)
        want, want_sum = fg.norm_gemv(reduced[0].view(1, hidden), residual, nw, 1e-5, w_c)
        for r in range(world):  # the consumers
            ex = inbox.Exchange(rank=r, world=world, err=errs[r], gather=boxes[r][slot], flags=flags[r], slot=slot,
                                prev=(slot - 1) % ring)
            got, got_sum = fg.norm_gemv(ys[r], residual, nw, 1e-5, w_c, exchange=ex)
            assert torch.equal(ys[r], reduced[0].view(1, hidden)), (step, r)  # the partial's tensor: now the sum
            assert torch.equal(got, want) and torch.equal(got_sum, want_sum), (step, r)
            assert bool((boxes[r][slot] == sent).all()), (step, r)  # emptied by its reader
            assert flags[r][slot].item() == 1 and flags[r][(slot - 1) % ring].item() == 0
    assert [int(e.item()) for e in errs] == [0] * world
    with pytest.raises(ValueError, match="one-row"):
        fg.gemv(rnd(2, k_in), ws[0], exchange=inbox.Exchange(rank=0, world=world, err=errs[0],
                                                               push=tuple(b[0] for b in boxes)))
    with pytest.raises(ValueError, match="norm prologue"):
        fg.gemv(rnd(1, hidden), w_c, exchange=inbox.Exchange(rank=0, world=world, err=errs[0], gather=boxes[0][0],
                                                             flags=flags[0]))
    with pytest.raises(ValueError, match="flags"):
        fg.norm_gemv(rnd(1, hidden), None, nw, 1e-5, w_c,
                     exchange=inbox.Exchange(rank=0, world=world, err=errs[0], gather=boxes[0][0]))


def test_a_rank_gives_up_on_a_silent_peer_and_waits_no_more(ar, device):
    idt = ar.int_view_dtype(torch.bfloat16)
    x = torch.randn(300, device=device).to(torch.bfloat16)
    boxes = [torch.full((600,), ar.sentinel(idt), dtype=idt, device=device) for _ in range(2)]
    err = torch.zeros(1, dtype=torch.int32, device=device)
    ar.push_all_reduce(x, torch.empty_like(x), boxes, 0, err, max_spins=3)
    assert int(err.item()) == 1
    boxes[0].fill_(ar.sentinel(idt))
    ar.push_all_reduce(x, torch.empty_like(x), boxes, 0, err, max_spins=1 << 30)  # returns: no second wait
    assert int(err.item()) == 1


def test_bad_arguments_are_named(ar, device):
    x = torch.zeros(8, device=device, dtype=torch.bfloat16)
    idt = ar.int_view_dtype(torch.bfloat16)
    boxes = [torch.zeros(16, dtype=idt, device=device) for _ in range(2)]
    err = torch.zeros(1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="rank"):
        ar.push_all_reduce(x, torch.empty_like(x), boxes, 2, err)
    with pytest.raises(ValueError, match="at least 16"):
        ar.push_all_reduce(x, torch.empty_like(x), [b[:10] for b in boxes], 0, err)
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        ar.int_view_dtype(torch.int8)
    with pytest.raises(ValueError, match="contiguous"):
        ar.push_all_reduce(x, torch.empty(4, device=device, dtype=torch.bfloat16), boxes, 0, err)


# -- two GPUs: real peers through torch symmetric memory ------------------------------------------------------------

def _two_gpu_worker(rank, world, init_file, result_file):
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    from kernels_gpu import all_reduce as ar

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    group = dist.group.WORLD.group_name
    if hasattr(symm_mem, "enable_symm_mem_for_group"):
        symm_mem.enable_symm_mem_for_group(group)
    sizes = [4096, 1, 2500, 262144, 4096]  # the inboxes of five all-reduces a "step", ragged sizes
    cap = max(sizes)
    idt = torch.int16
    local = symm_mem.empty(len(sizes) * world * cap, dtype=idt, device="cuda")
    handle = symm_mem.rendezvous(local, group)
    local.fill_(ar.sentinel(idt))
    peers = [local if r == rank else handle.get_buffer(r, (local.numel(),), idt) for r in range(world)]
    inboxes = [[p[k * world * cap:(k + 1) * world * cap] for p in peers] for k in range(len(sizes))]
    err = torch.zeros(1, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    dist.barrier()
    bad = []

    def parts_for(step, k):  # every rank can make every rank's partial: the reference needs them all
        g = torch.Generator().manual_seed(step * 100 + k)
        ps = [(torch.randn(sizes[k], generator=g) * 4).to(torch.bfloat16) for _ in range(world)]
        ps[0][:3] = -0.0
        return ps

    steps = 30
    xs = [[parts_for(s, k)[rank].cuda() for k in range(len(sizes))] for s in range(steps)]
    wants = [[ar.ref_all_reduce(parts_for(s, k)) for k in range(len(sizes))] for s in range(steps)]
    for s in range(steps):  # eager steps
        for k in range(len(sizes)):
            out = ar.push_all_reduce(xs[s][k], torch.empty_like(xs[s][k]), inboxes[k], rank, err)
            if not torch.equal(out.cpu().view(idt), wants[s][k].view(idt)):
                bad.append(("eager", s, k))
    # a CUDA graph of one step's all-reduces, replayed with new partials copied into its inputs
    static_x = [torch.empty_like(x) for x in xs[0]]
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            static_out = [ar.push_all_reduce(static_x[k], torch.empty_like(static_x[k]), inboxes[k], rank, err)
                          for k in range(len(sizes))]
    torch.cuda.synchronize()
    dist.barrier()
    for s in range(steps):
        for k in range(len(sizes)):
            static_x[k].copy_(xs[s][k])
        graph.replay()
        for k in range(len(sizes)):
            if not torch.equal(static_out[k].cpu().view(idt), wants[s][k].view(idt)):
                bad.append(("graph", s, k))
    torch.cuda.synchronize()
    empty = bool((local == ar.sentinel(idt)).all())
    with open(f"{result_file}.{rank}", "w") as f:
        f.write(f"{len(bad)} {int(err.item())} {int(empty)} {bad[:3]}")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_exchange_through_symmetric_memory():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file, result = os.path.join(tmp, "init"), os.path.join(tmp, "result")
        mp.start_processes(_two_gpu_worker, args=(2, init_file, result), nprocs=2, start_method="spawn", join=True)
        for rank in range(2):
            text = open(f"{result}.{rank}").read()
            assert text.startswith("0 0 1"), f"rank {rank}: {text}"
