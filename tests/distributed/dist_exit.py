"""How a rank of the 2-process CPU tests leaves: in step with the others, and the rank that hosts the store last.

A rank that simply returns while another still holds a gloo process group can abort that other rank at exit (seen
as exit code -6, "terminate called without an active exception", on a loaded machine): rank 0 hosts the TCPStore
the others' process groups talk to. So a rank that succeeded waits for the others at a barrier, destroys its process
group, and says so in a file; rank 0 leaves only once every rank has said so. A rank that failed leaves at once (its
peers may never reach the barrier); the launcher stops the rest. `finish` writes a rank's result, then leaves.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch.distributed as dist

WAIT_FOR_PEERS_S = 300


def _marker(out_dir: str, rank: int) -> str:
    return os.path.join(out_dir, f"rank{rank}.left")


def leave(out_dir: str, rank: int, world: int, ok: bool) -> None:
    if not ok:
        return
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    with open(_marker(out_dir, rank), "w"):
        pass
    if rank != 0:
        return
    deadline = time.monotonic() + WAIT_FOR_PEERS_S
    while not all(os.path.exists(_marker(out_dir, r)) for r in range(world)) and time.monotonic() < deadline:
        time.sleep(0.05)


def finish(out_dir: str, rank: int, world: int, result: dict) -> int:
    """Writes `result` to rank{rank}.json (renamed into place: the launcher never reads half a file), prints its
    "error" (a failed rank's traceback) if any, and leaves. -> the rank's exit code."""
    path = os.path.join(out_dir, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(path + ".tmp", path)
    ok = "error" not in result
    if not ok:
        print(result["error"], file=sys.stderr, flush=True)
    leave(out_dir, rank, world, ok=ok)
    return 0 if ok else 1
