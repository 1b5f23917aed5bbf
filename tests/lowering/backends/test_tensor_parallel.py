"""Tensor parallelism end to end: the JAX mesh program (cpu target) and the multi-process CUDA program.

TP=2 and TP=4 must give the same greedy tokens as TP=1. The mesh runs in a fresh process with
XLA_FLAGS=--xla_force_host_platform_device_count=4 (tp_mesh_check.py): JAX fixes its device count at start-up.
The CUDA program starts one worker process per extra rank; without GPUs every rank runs its Triton kernels in the
interpreter on torch's CPU device and the collectives go through gloo, the same code as NCCL on GPUs.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:  # NOTE: before kernels_gpu is imported (triton reads it at decoration time); workers inherit it
    os.environ["TRITON_INTERPRET"] = "1"

from lowering import compile_model  # noqa: E402
from lowering.backends import build_program  # noqa: E402
from lowering.models import llama  # noqa: E402
from runtime import Engine, SamplingParams  # noqa: E402
from tests.lowering.helpers import PagedLayout, tiny_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]


def test_cpu_mesh_tp2_and_tp4_give_the_tokens_of_tp1():
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                                      " --xla_force_host_platform_device_count=4").strip(),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("tp_mesh_check.py"))], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["devices"] == 4
    for name, runs in result["models"].items():
        assert runs["1"]["program"] == "CpuProgram"
        for tp in ("2", "4"):
            assert runs[tp]["program"] == "MeshCpuProgram"
            assert runs[tp]["tokens"] == runs["1"]["tokens"], f"{name} TP={tp}"
        assert len({tuple(t) for t in runs["1"]["tokens"]}) > 1  # the streams differ: the check is not vacuous
    llama_runs = result["models"]["llama"]
    # the same KV budget per device holds tp times the blocks (a rank keeps 1/tp of each block's KV heads)
    assert [llama_runs[tp]["num_blocks"] for tp in ("1", "2", "4")] == [128, 256, 512]
    assert {llama_runs[tp]["kv_bytes"] for tp in ("1", "2", "4")} == {1 << 20}
    assert "XLA_FLAGS=--xla_force_host_platform_device_count" in result["too_many"]


def cuda_device():
    if not HAS_GPU:
        return {"device": "cpu"}
    if torch.cuda.device_count() < 2:
        pytest.skip("tensor parallelism on CUDA needs 2 GPUs (here: the interpreter runs only without a GPU)")
    return {}


@pytest.fixture(scope="module")
def tp_models():
    cfg = tiny_config(num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=64, intermediate_size=96, vocab_size=101)
    model = llama.random_model(cfg, seed=2)
    one = compile_model(model, target="cuda", dtype="float32", max_model_len=128, progress=False)
    two = compile_model(model, target="cuda", dtype="float32", max_model_len=128, progress=False, tensor_parallel=2)
    return one, two


def test_cuda_tp2_program_matches_tp1(tp_models):
    one, two = tp_models
    kw = dict(num_blocks=32, max_model_len=128, max_num_seqs=4, **cuda_device())
    p1 = build_program("cuda", one.graph, one.params, **kw)
    p2 = build_program("cuda", two.graph, two.params, **kw)
    try:
        assert type(p2).__name__ == "TensorParallelCudaProgram" and p2.num_blocks == 32 and p2.tp == 2
        assert p2.vocab_size == 101 and p2.kv_cache_bytes() * 2 == p1.kv_cache_bytes()
        lay = PagedLayout(32, 16, seed=1)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, 101, n).tolist() for n in (5, 23, 1)]
        step = lay.step([(i, p, 0) for i, p in enumerate(prompts)])
        np.testing.assert_allclose(p2.step(step), p1.step(step), rtol=1e-4, atol=1e-4)
        decode = lay.step([(0, [7], 5), (1, [8, 9, 10], 23), (2, [11], 1)])
        assert np.array_equal(p2.step_greedy(decode), p1.step_greedy(decode))
        sample = dict(temperature=np.full(3, 0.8, np.float32), top_k=np.zeros(3, np.int32),
                      top_p=np.ones(3, np.float32), seeds=np.arange(3, dtype=np.int64), offsets=np.zeros(3, np.int64))
        decode = lay.step([(0, [3], 6), (1, [4], 26), (2, [5], 2)])
        assert np.array_equal(p2.step_sample(decode, **sample), p1.step_sample(decode, **sample))
        # bad input is refused on rank 0 before any rank runs it; the group keeps working
        bad = lay.step([(0, [200], 7)])
        with pytest.raises(ValueError, match="token_ids"):
            p2.step_greedy(bad)
        with pytest.raises(ValueError, match="temperature"):
            p2.step_sample(decode, **dict(sample, temperature=np.full(3, -1.0, np.float32)))
        ok = lay.step([(0, [6], 7), (1, [7], 27), (2, [8], 3)])
        assert np.array_equal(p2.step_greedy(ok), p1.step_greedy(ok))
        for pos in (8, 9, 10):  # one-row steps: on GPUs the all-reduces fold into the GEMVs on either side
            one_row = lay.step([(0, [12 + pos], pos)])
            np.testing.assert_allclose(p2.step(one_row), p1.step(one_row), rtol=1e-4, atol=1e-4)
            assert np.array_equal(p2.step_greedy(one_row), p1.step_greedy(one_row))
        if HAS_GPU:  # push all-reduce kernels (not folded by default)
            assert p2.local._fold == {}
            for symm, push in p2.local._symm.values():
                assert push is not None
                push.check()
    finally:
        p2.close()
    p2.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        p2.step_greedy(ok)


@pytest.mark.parametrize("fold", [False, True])
def test_cuda_tp2_push_all_reduces_match_tp1(tp_models, fold):
    """tp_all_reduce="push" (on a CPU: the ranks' inboxes in shared-memory files, the kernels in the interpreter):
    ragged steps whose all-reduce is fused with the add + RMSNorm after it, and one-row steps (fold: their
    all-reduces folded into the GEMVs around them) give TP=1's logits and tokens; every inbox is empty again."""
    from lowering.backends import cuda

    if HAS_GPU and cuda._SYMM_GROUPS:  # NOTE: torch sets symmetric memory up once per group name and process
        pytest.skip("an earlier tensor-parallel program in this process took the group's symmetric memory (the "
                    "GPU run of test_cuda_tp2_program_matches_tp1 covers push all-reduces)")
    one, two = tp_models
    kw = dict(num_blocks=32, max_model_len=128, max_num_seqs=4, **cuda_device())
    p1 = build_program("cuda", one.graph, one.params, **kw)
    p2 = build_program("cuda", two.graph, two.params, tp_all_reduce="push", fold_all_reduces=fold, **kw)
    try:
        lay = PagedLayout(32, 16, seed=4)
        rng = np.random.default_rng(5)
        prompts = [rng.integers(0, 101, n).tolist() for n in (6, 19, 2)]
        steps = [lay.step([(i, p, 0) for i, p in enumerate(prompts)]),
                 lay.step([(0, [7], 6), (1, [8], 19), (2, [9], 2)])]
        steps += [lay.step([(1, [10 + i], 20 + i)]) for i in range(3)]  # one row: folded
        for step in steps:
            np.testing.assert_allclose(p2.step(step), p1.step(step), rtol=1e-4, atol=1e-4)
            assert np.array_equal(p2.step_greedy(step), p1.step_greedy(step))
        local = p2.local
        assert len(local._fold.get("ring", ())) == (3 if fold else 0) and local._deferred_all_reduces
        (symm, push), = local._symm.values()
        assert symm is None and push is not None
        push.check()
        from kernels_gpu.all_reduce import int_view_dtype, sentinel

        assert all(bool((box[local.tp_rank] == sentinel(int_view_dtype(torch.float32))).all())
                   for box in push.inboxes)
    finally:
        p2.close()


def test_cuda_tp2_engine_tokens_equal_tp1(tp_models):
    """Greedy and seeded sampled requests: TP=1 without async scheduling and TP=2 with it (the workers launch each
    step with the feed of tokens still on the GPUs) give the same tokens. (TP=2's synchronous steps:
    test_cuda_tp2_program_matches_tp1.)"""
    one, two = tp_models
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 101, n).tolist() for n in (9, 30, 2, 17)]
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)] * 3 + \
             [SamplingParams(max_tokens=8, temperature=0.9, top_k=20, seed=11, ignore_eos=True)]
    tokens = {}
    for name, cm, async_scheduling in (("tp1 sync", one, False), ("tp2 async", two, None)):
        engine = Engine(cm, num_blocks=32, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=128,
                        program_options=cuda_device(), async_scheduling=async_scheduling)
        try:
            tokens[name] = [o.token_ids for o in engine.generate(prompts, params)]
            assert engine.async_scheduling == (async_scheduling is None)
            if async_scheduling is None:  # decode steps were launched before the last one's tokens were back
                assert engine.num_async_steps >= 5
        finally:
            if hasattr(engine.program, "close"):
                engine.program.close()
    assert tokens["tp2 async"] == tokens["tp1 sync"]
    assert tokens["tp1 sync"][3] != tokens["tp1 sync"][0]  # not vacuous: the streams differ


def test_fold_plan_takes_the_row_parallel_all_reduces_between_fused_gemvs(tp_models):
    """Which all-reduces a CUDA program folds into the GEMVs around them at one-row steps (planning only)."""
    import types

    from lowering.backends import cuda

    graph = tp_models[1].graph
    program = types.SimpleNamespace(tp_group=object(), device=torch.device("cuda"), tp_all_reduce="auto",
                                    fold_all_reduces=True, _all_reduce_ordinal=cuda._all_reduce_ordinals(graph))
    plan = cuda._fold_plan(graph, program, graph.producers(), graph.users())
    reduces = [n for n in graph.nodes if n.op == "all_reduce"]
    producers = graph.producers()
    # every all-reduce but the embedding's (its producer is no GEMV) and the last (its consumer is the logits, which a
    # step may not launch), in graph order, each with its producer's slot and its ordinal
    assert plan["ring"] == [n.outputs[0] for n in reduces[1:-1]]
    for slot, name in enumerate(plan["ring"]):
        k, node = next((k, n) for k, n in enumerate(reduces) if n.outputs[0] == name)
        assert producers[node.inputs[0]].op == "linear"
        assert plan["slot"][name] == plan["slot"][node.inputs[0]] == slot
        assert plan["node"][name] == plan["node"][node.inputs[0]] == k
    assert plan["dtype"] == "torch.float32"
    for other in (dict(tp_all_reduce="nccl"), dict(tp_all_reduce="symm"), dict(device=torch.device("cpu")),
                  dict(tp_group=None), dict(fold_all_reduces=False)):
        assert cuda._fold_plan(graph, types.SimpleNamespace(**{**vars(program), **other}), producers,
                               graph.users()) == {}


def test_step_channel_round_trip(tmp_path):
    from lowering.backends.cuda_tp import StepChannel

    chan = StepChannel.create(readers=1, capacity=1 << 16)
    reader = StepChannel(chan.path, 1, 1 << 16)
    try:
        for i in range(3):
            chan.send(("step", (np.arange(i + 1),), {"k": i}))
            name, args, kw = reader.recv(0)
            assert name == "step" and np.array_equal(args[0], np.arange(i + 1)) and kw == {"k": i}
        with pytest.raises(ValueError, match="exceeds the channel"):
            chan.send(np.zeros(1 << 16, np.uint8))
    finally:
        reader.close()
        chan.close(unlink=True)
    assert not os.path.exists(chan.path)


def test_leaving_a_stuck_group_is_bounded(monkeypatch, capsys):
    """A teardown that never returns (as NCCL's did while decode graphs held its collectives) cannot hang close()."""
    import threading

    import torch.distributed as dist

    from lowering.backends.cuda_tp import _leave_group

    release = threading.Event()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", release.wait)
    monkeypatch.setattr(dist.distributed_c10d, "_abort_process_group", release.wait, raising=False)
    try:
        _leave_group(0.2, abort_s=0.2)
    finally:
        release.set()
    err = capsys.readouterr().err
    assert "aborting it" in err and "could not be left" in err
