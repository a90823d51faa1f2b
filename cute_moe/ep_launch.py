"""Run a function on one process per GPU with an NCCL process group (EP tests and benchmark).

Every child process is joined with a deadline and killed when it passes it; the caller gets a
RuntimeError naming the ranks that failed or hung, with their tracebacks. NVLink multicast stays off
in the children (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1).
"""

import os
import queue
import socket
import time
import traceback
from typing import Any, Callable

import torch

NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
EXIT_GRACE_S = 10.0  # after the deadline of the slowest rank, before killing the rest


def free_port() -> int:
    """A TCP port free on localhost now (for the rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, fn: Callable, args: tuple, results) -> None:
    import torch.distributed as dist
    try:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                device_id=torch.device("cuda", rank))
        try:
            value = fn(rank, world, *args)
        finally:
            torch.cuda.synchronize()
            dist.destroy_process_group()
        results.put((rank, None, value))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the run
        results.put((rank, traceback.format_exc(), None))


def run_ranks(fn: Callable, world: int, args: tuple = (), timeout_s: float = 120.0) -> list[Any]:
    """fn(rank, world, *args) on ``world`` spawned processes (GPU i for rank i); returns their values.

    ``fn`` must be importable by name (a module-level function). Raises RuntimeError if a rank raised,
    exited without a result, or was still running after ``timeout_s`` (it is killed).
    """
    import torch.multiprocessing as mp

    os.environ.update(NO_MULTICAST_ENV)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, fn, args, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    got: dict[int, tuple] = {}
    while len(got) < world and time.monotonic() < deadline:
        try:
            rank, err, value = results.get(timeout=1.0)
            got[rank] = (err, value)
        except queue.Empty:
            if all(not p.is_alive() for p in procs) and results.empty():
                break
    hung = []
    for r, p in enumerate(procs):
        p.join(timeout=max(0.0, deadline - time.monotonic()) + (EXIT_GRACE_S if r in got else 0.0))
        if p.is_alive():
            hung.append(r)
            p.kill()
            p.join(timeout=EXIT_GRACE_S)
    problems = [f"rank {r} raised:\n{got[r][0]}" for r in sorted(got) if got[r][0] is not None]
    problems += [f"rank {r} exited without a result (exit code {procs[r].exitcode})"
                 for r in range(world) if r not in got and r not in hung]
    problems += [f"rank {r} still running after {timeout_s:g} s: killed" for r in hung]
    if problems:
        raise RuntimeError("\n".join(problems))
    return [got[r][1] for r in range(world)]
