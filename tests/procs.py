"""Spawning a CPU process group for a test: gloo, a ``file://`` rendezvous, and a clean exit.

A worker that finished (its own ``finally`` has destroyed the process group) leaves through
``os._exit(0)``: the interpreter's teardown is skipped. Without that, gloo work objects still
referenced by FSDP2's state are destroyed during finalisation, where their C++ threads can call
``std::terminate`` ("terminate called without an active exception", SIGABRT) after every
assertion has passed; CI saw it once in ~10 runs (pytorch/pytorch PR 179291 describes the race).
A worker that raises goes through ``torch.multiprocessing``'s own wrapper, which records the
traceback for the parent before exiting, so failures are reported as before.
"""
from __future__ import annotations

import os
import sys

import torch.multiprocessing as mp


def spawn(worker, args: tuple, nprocs: int) -> None:
    """Runs ``worker(rank, *args)`` in ``nprocs`` spawned processes and re-raises any failure."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_run, args=(worker, args), nprocs=nprocs, join=True, start_method="spawn")


def _run(rank: int, worker, args: tuple) -> None:
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
