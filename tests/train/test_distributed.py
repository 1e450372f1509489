"""The pure parts of train/distributed.py: the world torchrun describes, shares, the threads default."""

from __future__ import annotations

import itertools
import os

from train import distributed
from train.distributed import World


def test_shares_are_contiguous_cover_everything_and_differ_by_at_most_one():
    for n in (0, 1, 7, 8, 33):
        for size in (1, 2, 3, 8):
            parts = [World(rank, size).share(n) for rank in range(size)]
            assert parts[0].start == 0 and parts[-1].stop == n
            assert all(a.stop == b.start for a, b in itertools.pairwise(parts))
            lengths = [p.stop - p.start for p in parts]
            assert max(lengths) - min(lengths) <= 1


def test_the_world_comes_from_torchrun_s_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.from_env() == World()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    world = distributed.from_env()
    assert world == World(3, 4, 1, 2) and not world.main


def test_threads_default_to_the_cores_shared_among_the_node_s_processes(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert distributed.default_threads(World()) == 8  # one process: half the cores, as before DDP
    assert distributed.default_threads(World(0, 4, 0, 4)) == 4
    assert distributed.default_threads(World(0, 32, 0, 32)) == 1
