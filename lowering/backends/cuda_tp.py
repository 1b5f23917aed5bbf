"""Tensor parallelism on CUDA: one process per GPU, each running its rank's CudaProgram; NCCL between them.

    rank 0 (this process)                         ranks 1..tp-1 (spawned worker processes)
    TensorParallelCudaProgram                      _worker_main
      .step / step_greedy / step_sample /           StepChannel.recv() -> the same _step_device (or
       step_async (rank 0's CudaProgram) ->           _launch_async) on its CudaProgram (no result goes
       _step_device: check the step, on_step  ──▶     back: the logits are all-gathered on every rank and
       sends it on (shared memory, below), run it     rank 0's are the answer)
    every rank: CudaProgram over the sharded graph; all_reduce / all_gather are torch.distributed (NCCL)
    collectives in the plan, captured inside the decode CUDA graphs like any kernel.

The Engine, scheduler and sampler run on rank 0 alone; what crosses to the workers is each checked step (its
StepInput and whether tokens are picked greedily or the hidden states kept) and capture_decode_graphs, pickled into
a shared-memory ring (StepChannel): rank 0 writes the payload and bumps a sequence number, workers spin on it (then
back off to short sleeps when idle) and acknowledge. One host, so no TCP on the step path; the process group's TCP
store is used only at start-up.

Async scheduling works as on one GPU: a step launched by step_async goes to the workers as _launch_async with its
feed (which of its token rows take which of the last async step's picks). Each rank picks the step's tokens from
the same all-gathered logits and keeps them on its own GPU for the next feed (a sampled step's picks are broadcast
from rank 0, so no rank can ever feed other tokens); the workers do not wait for an async step to finish before
taking the next, so the host of every rank prepares step t+1 while step t runs.

Weights: every rank builds its params from a ParamSource, piece by piece (shard_tensor_parallel.shard_param), so
no GPU ever holds more than its share and no whole-model tensor is made on a device. HostParams puts the full
host params in one shared-memory file that each worker maps and cuts its pieces from (rank 0 cuts from its own
memory); RandomParams makes random pieces directly on each GPU (benchmarks of large shapes).

Failure: a worker that raises reports its traceback; since the other ranks would then wait in a collective
forever, rank 0 prints it and ends the process (exit code 70) rather than hang. Bad input (a malformed
StepInput, sampling values out of range) is checked on rank 0 before anything is sent, and raises there.
"""
from __future__ import annotations

import atexit
import dataclasses
import mmap
import os
import pickle
import queue
import socket
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from typing import Any, Mapping

import numpy as np

from lowering.ir import Graph, IRError
from lowering.passes.shard_tensor_parallel import RankParams, tp_plan

WORKER_FAILED_EXIT = 70
DEFAULT_CHANNEL_BYTES = 64 << 20  # the largest pickled Program call (a big prefill's StepInput is a few MiB)
LEAVE_GROUP_TIMEOUT_S = 60.0  # how long leaving the process group may take before it is aborted
_SPIN_BEFORE_SLEEP = 20000  # polls of the sequence word before an idle worker starts sleeping between polls


def _shared_file(prefix: str, nbytes: int) -> str:
    """A new file of `nbytes` zero bytes that other processes can map: in /dev/shm when it has room
    (memory-backed), else in the temp dir (page cache)."""
    where = tempfile.gettempdir()
    try:
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize > nbytes + (256 << 20):
            where = "/dev/shm"
    except OSError:
        pass
    fd, path = tempfile.mkstemp(prefix=prefix, dir=where)
    os.ftruncate(fd, nbytes)
    os.close(fd)
    return path


class StepChannel:
    """A one-writer, many-reader broadcast of pickled messages through a shared-memory file.

    Layout (int64 words): [0] sequence number of the message in the buffer, [1] its length, [2 + i] reader i's
    last acknowledged sequence number; the payload starts at byte 64 * (2 + readers // 8 + 1). The writer waits
    for every reader to acknowledge message n before writing n + 1; x86 keeps stores in order, so a reader that
    sees sequence n also sees its payload.
    """

    def __init__(self, path: str, readers: int, capacity: int):
        self.path, self.readers, self.capacity = path, readers, capacity
        self.offset = self.header_bytes(readers)
        size = self.offset + capacity
        self._file = open(path, "r+b")
        self._map = mmap.mmap(self._file.fileno(), size)
        self.words = np.frombuffer(self._map, dtype=np.int64, count=2 + readers)
        self._seen = 0

    @staticmethod
    def header_bytes(readers: int) -> int:
        return 64 * (2 + readers // 8 + 1)

    @classmethod
    def create(cls, readers: int, capacity: int = DEFAULT_CHANNEL_BYTES) -> "StepChannel":
        """A new channel; readers attach with StepChannel(channel.path, readers, capacity)."""
        return cls(_shared_file("llmc-tp-channel-", cls.header_bytes(readers) + capacity), readers, capacity)

    def send(self, message, *, alive=lambda: True) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > self.capacity:
            raise ValueError(f"a tensor-parallel step message of {len(data) >> 20} MiB exceeds the channel's "
                             f"{self.capacity >> 20} MiB (pass channel_bytes= to the program)")
        seq = int(self.words[0])
        spins = 0
        while int(self.words[2:].min()) < seq:  # every reader has taken the last message
            spins += 1
            if spins > _SPIN_BEFORE_SLEEP:
                time.sleep(0.0002)
                if spins % 5000 == 0 and not alive():
                    raise RuntimeError("a tensor-parallel worker stopped while rank 0 was sending it a step")
        self._map[self.offset: self.offset + len(data)] = data
        self.words[1] = len(data)
        self.words[0] = seq + 1

    def recv(self, reader: int):
        spins = 0
        while int(self.words[0]) == self._seen:
            spins += 1
            if spins > _SPIN_BEFORE_SLEEP:
                time.sleep(0.0002)
        self._seen = int(self.words[0])
        n = int(self.words[1])
        data = bytes(self._map[self.offset: self.offset + n])
        self.words[2 + reader] = self._seen
        return pickle.loads(data)

    def close(self, unlink: bool = False) -> None:
        self.words = None
        try:
            self._map.close()
            self._file.close()
        except (BufferError, ValueError):
            pass
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


# -- where each rank's weights come from ------------------------------------------------------------------------

class ParamSource:
    """Makes rank r's params for a sharded graph: `for_rank(graph, rank, device)` -> Mapping name -> array/tensor.
    Pickled to the workers, so it must hold only what can travel between processes (paths, seeds)."""

    def for_rank(self, graph: Graph, rank: int, device) -> Mapping[str, Any]:
        raise NotImplementedError

    def release(self) -> None:
        """Called on rank 0 once every rank has its weights on its GPU."""


class HostParams(ParamSource):
    """The full host params in one shared-memory file; each rank maps it and cuts its own pieces."""

    def __init__(self, params: Mapping[str, Any], names):
        self._local = params  # rank 0 cuts from this process's arrays (not pickled)
        layout, at = {}, 0
        arrays = {}
        for name in names:
            a = np.asarray(params[name])
            arrays[name] = a
            layout[name] = (at, tuple(a.shape), a.dtype.name)
            at += -(-a.nbytes // 64) * 64
        self.path = _shared_file("llmc-tp-params-", max(at, 1))
        self.layout = layout
        if at:
            mm = np.memmap(self.path, dtype=np.uint8, mode="r+", shape=(at,))
            for name, a in arrays.items():
                off = layout[name][0]
                mm[off: off + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
            mm.flush()
            del mm

    def __getstate__(self):
        return {"path": self.path, "layout": self.layout, "_local": None}

    def for_rank(self, graph: Graph, rank: int, device) -> Mapping[str, Any]:
        plan = tp_plan(graph)
        if rank == 0 and self._local is not None:
            return RankParams(graph, self._local, rank, *plan)
        import jax.numpy as jnp

        full = {}
        for name, (off, shape, dtype) in self.layout.items():
            dt = np.dtype(jnp.dtype(dtype))
            count = int(np.prod(shape)) if shape else 1
            full[name] = np.memmap(self.path, dtype=dt, mode="r", offset=off, shape=shape) if count else \
                np.zeros(shape, dt)
        return RankParams(graph, full, rank, *plan)

    def release(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


@dataclasses.dataclass
class RandomParams(ParamSource):
    """Random weights made piece by piece on each rank's device (benchmarks of model shapes too large to make on
    the host): matrices N(0, std^2), 1-D params (norm weights, biases) ones / zeros. Not a model: only for speed."""

    seed: int = 0
    std: float = 0.02

    def for_rank(self, graph: Graph, rank: int, device) -> Mapping[str, Any]:
        return _RandomPieces(graph, rank, device, self.seed, self.std)


class _RandomPieces(Mapping):
    def __init__(self, graph, rank, device, seed, std):
        self.graph, self.rank, self.device, self.seed, self.std = graph, rank, device, seed, std

    def __getitem__(self, name):
        import torch

        from lowering.backends.cuda import torch_dtype

        t = self.graph.types[name]
        shape, dtype = tuple(int(d) for d in t.shape), torch_dtype(t.dtype)
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 1000003 + self.rank * 7919 + len(name))
        if len(shape) <= 1:
            return torch.ones(shape, dtype=dtype, device=self.device) if "norm" in name else \
                torch.zeros(shape, dtype=dtype, device=self.device)
        return (torch.randn(shape, generator=gen, device=self.device, dtype=torch.float32) * self.std).to(dtype)

    def __iter__(self):
        return iter(self.graph.params)

    def __len__(self):
        return len(self.graph.params)


# -- the worker process --------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_group(backend: str, init_method: str, rank: int, tp: int, timeout_s: float):
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=tp,
                            timeout=timedelta(seconds=timeout_s))
    return dist.group.WORLD


def _leave_group(timeout_s: float, abort_s: float = 10.0) -> None:
    """destroy_process_group, bounded: a peer that died or never leaves would make NCCL's teardown wait forever, so
    after timeout_s the group is aborted instead (and a warning says so)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return

    def bounded(fn, seconds: float) -> bool:  # fn in a daemon thread; whether it returned within `seconds`
        done = threading.Event()

        def run():
            try:
                fn()
            except Exception:  # noqa: BLE001 - leaving must not raise
                pass
            finally:
                done.set()

        threading.Thread(target=run, name="llmc-tp-leave", daemon=True).start()
        return done.wait(seconds)

    if bounded(dist.destroy_process_group, timeout_s):
        return
    print(f"llmc: leaving the tensor-parallel process group took over {timeout_s:.0f} s (a rank is gone?); aborting it",
          file=sys.stderr, flush=True)
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    # NOTE: the abort may block as well (it did on the H200s before the graphs were dropped first): bounded too
    if abort is None or not bounded(abort, abort_s):
        print("llmc: the process group could not be left; a new tensor-parallel program needs a new process",
              file=sys.stderr, flush=True)


def _device_for(rank: int, devices, cpu: bool):
    import torch

    if cpu:
        return torch.device("cpu")
    dev = torch.device("cuda", int(devices[rank]))
    torch.cuda.set_device(dev)
    return dev


def _worker_main(rank: int, tp: int, backend: str, init_method: str, timeout_s: float, graph_json: str,
                 source: ParamSource, kwargs: dict, devices, cpu: bool, channel: tuple, reports) -> None:
    try:
        import torch

        from lowering.backends.cuda import CudaProgram

        device = _device_for(rank, devices, cpu)
        group = _init_group(backend, init_method, rank, tp, timeout_s)
        graph = Graph.loads(graph_json)
        params = source.for_rank(graph, rank, device)
        program = CudaProgram(graph, params, device=str(device), tp_rank=rank, tp_group=group, **kwargs)
        del params
        chan = StepChannel(*channel)
        reports.put(("ready", rank, None))
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        while True:  # rank 0's calls: _step_device or _launch_async of every step (results stay here), capture_...
            name, args, kw = chan.recv(rank - 1)
            if name == "__stop__":
                break
            getattr(program, name)(*args, **kw)
            if name != "_launch_async":  # an async step's inputs are staged as on rank 0 (two buffers, events):
                sync()  # it runs ahead; other calls' pinned inputs are reused by the next call: let the copies finish
        chan.close()
        program.drop_decode_graphs()
        _leave_group(LEAVE_GROUP_TIMEOUT_S)
    except BaseException:  # noqa: BLE001 - everything goes back to rank 0, which ends the group
        try:
            reports.put(("error", rank, traceback.format_exc()))
            time.sleep(0.5)
        finally:
            os._exit(1)


# -- rank 0's Program -----------------------------------------------------------------------------------------

class TensorParallelCudaProgram:
    """The Program of a tensor-parallel graph on `tp` GPUs: rank 0 in this process, ranks 1.. in spawned workers.

    Has CudaProgram's interface: attributes and methods are rank 0's program's, whose checked steps go to the workers
    (CudaProgram.on_step). `params`: the full host params (a Mapping; shared with the workers through a
    shared-memory file, each rank uploading only its pieces) or a ParamSource. `devices`: CUDA device indices of
    ranks 0..tp-1 (default 0..tp-1). device="cpu" runs every rank's kernels in Triton's interpreter over gloo
    (TRITON_INTERPRET=1; tests). Other keyword arguments go to every rank's CudaProgram; num_blocks, when not
    given, is sized on each GPU's free memory and the smallest count over the ranks is used.
    """

    def __init__(self, graph: Graph, params: Mapping[str, Any] | ParamSource, *, devices=None,
                 device: str | None = None, timeout_s: float = 600.0, channel_bytes: int = DEFAULT_CHANNEL_BYTES,
                 **kwargs):
        import multiprocessing as mp

        import torch
        import torch.distributed as dist

        plan = tp_plan(graph)
        if plan is None:
            raise IRError("TensorParallelCudaProgram needs a graph sharded by shard_tensor_parallel")
        self.tp = tp = plan[0]
        cpu = device == "cpu"
        if cpu and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("device='cpu' runs the Triton kernels in their interpreter: set TRITON_INTERPRET=1")
        if not cpu:
            if device not in (None, "cuda"):
                raise ValueError(f"a tensor-parallel program places rank r on devices[r]; pass devices=[...], "
                                 f"not device={device!r}")
            if not torch.cuda.is_available():
                raise RuntimeError("target='cuda' needs NVIDIA GPUs, and torch.cuda.is_available() is False here")
            devices = list(range(tp)) if devices is None else [int(d) for d in devices]
            count = torch.cuda.device_count()
            if len(devices) != tp or len(set(devices)) != tp or max(devices) >= count or min(devices) < 0:
                raise RuntimeError(f"tensor_parallel={tp} needs {tp} distinct GPUs; devices={devices}, and this "
                                   f"machine has {count}")
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialized in this process: a tensor-parallel program "
                               "starts its own process group (one per process at a time)")
        backend = "gloo" if cpu else "nccl"
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        source = params if isinstance(params, ParamSource) else HostParams(params, graph.params)
        self._source = source
        self._channel = StepChannel.create(tp - 1, channel_bytes)
        ctx = mp.get_context("spawn")
        self._reports = ctx.Queue()
        self._workers = []
        self._closed = False
        self._ready = threading.Event()
        try:
            for rank in range(1, tp):
                p = ctx.Process(target=_worker_main, name=f"llmc-tp-rank{rank}", daemon=True,
                                args=(rank, tp, backend, init_method, timeout_s, graph.dumps(), source, kwargs,
                                      devices, cpu, (self._channel.path, tp - 1, channel_bytes), self._reports))
                p.start()
                self._workers.append(p)
            self._monitor = threading.Thread(target=self._watch, name="llmc-tp-monitor", daemon=True)
            self._monitor.start()
            dev = _device_for(0, devices, cpu)
            group = _init_group(backend, init_method, 0, tp, timeout_s)
            from lowering.backends.cuda import CudaProgram

            self.local = CudaProgram(graph, source.for_rank(graph, 0, dev), device=str(dev), tp_rank=0,
                                     tp_group=group, **kwargs)
            # every entry point (step, step_greedy, step_sample, step_async) checks its step, then sends the
            # workers the call that runs it (_step_device, or _launch_async with the step's feed) from here
            self.local.on_step = lambda name, args, kwargs: self._broadcast(name, *args, **kwargs)
            if not self._ready.wait(timeout_s):
                raise RuntimeError(f"tensor-parallel workers did not start within {timeout_s:.0f} s")
        except BaseException:
            self.close()
            raise
        finally:
            source.release()
        self._finalizer = atexit.register(self.close)

    # -- worker supervision --
    def _watch(self) -> None:
        ready = set()
        while not self._closed:
            try:
                kind, rank, text = self._reports.get(timeout=0.5)
            except queue.Empty:
                dead = [p for p in self._workers if p.exitcode not in (None, 0)]
                if dead and not self._closed:
                    self._fail(f"tensor-parallel worker {dead[0].name} exited with code {dead[0].exitcode}")
                continue
            except (EOFError, OSError):
                return
            if kind == "ready":
                ready.add(rank)
                if len(ready) == self.tp - 1:
                    self._ready.set()
            elif kind == "error" and not self._closed:
                self._fail(f"tensor-parallel rank {rank} failed:\n{text}")

    def _fail(self, why: str) -> None:
        print(f"llmc: {why}\nllmc: the other ranks would wait in a collective forever; ending the process.",
              file=sys.stderr, flush=True)
        for p in self._workers:
            if p.is_alive():
                p.kill()
        os._exit(WORKER_FAILED_EXIT)

    def _alive(self) -> bool:
        return all(p.is_alive() for p in self._workers)

    def _broadcast(self, name: str, *args, **kwargs) -> None:
        if self._closed:
            raise RuntimeError("the tensor-parallel program was closed")
        self._channel.send((name, args, kwargs), alive=self._alive)

    # -- the Program interface --
    def __getattr__(self, name):
        if name == "local":
            raise AttributeError(name)
        return getattr(self.local, name)

    def capture_decode_graphs(self, context_len: int | None = None) -> int:
        self._broadcast("capture_decode_graphs", context_len)
        return self.local.capture_decode_graphs(context_len)

    def close(self) -> None:
        """Stop the workers and leave the process group (also at exit)."""
        if self._closed:
            return
        self._closed = True
        try:
            if getattr(self, "local", None) is not None and self._alive():
                self._channel.send(("__stop__", (), {}), alive=self._alive)
        except Exception:  # noqa: BLE001 - closing must not raise
            pass
        # NOTE: before joining the workers, each rank drops its decode graphs and leaves the group: NCCL's teardown
        # waits while a CUDA graph holding its collectives is alive (destroy_process_group hung on both ranks)
        if getattr(self, "local", None) is not None:
            try:
                self.local.drop_decode_graphs()
            except Exception:  # noqa: BLE001
                pass
        _leave_group(LEAVE_GROUP_TIMEOUT_S)
        for p in self._workers:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        self._channel.close(unlink=True)
        try:
            atexit.unregister(self.close)
        except Exception:  # noqa: BLE001
            pass
