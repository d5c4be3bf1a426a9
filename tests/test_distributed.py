"""torch.distributed helpers: sharding (arithmetic, checked against numpy's array_split) and the collectives on a
real 2-process gloo group on this machine, each rank holding different data."""

from __future__ import annotations

import datetime
import itertools
import multiprocessing
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fmnist import distributed
from fmnist.errors import ConfigError, FmnistError, RunError

# ---------------------------------------------------------------- shard


def test_shard_covers_every_item_once_in_order_with_sizes_one_apart():
    for n, size in itertools.product([*range(0, 41), 97, 5_000, 55_000, 60_001], (1, 2, 3, 4, 5, 7, 8, 13, 64)):
        parts = [range(n)[distributed.shard(n, rank, size)] for rank in range(size)]
        assert [i for p in parts for i in p] == list(range(n)), (n, size)  # each item once, rank order = item order
        lengths = [len(p) for p in parts]
        assert max(lengths) - min(lengths) <= 1, (n, size, lengths)
        assert lengths == [len(a) for a in np.array_split(np.arange(n), size)], (n, size)  # the oracle: numpy


def test_shard_is_contiguous():
    for n, size in ((10, 3), (7, 7), (3, 5), (55_000, 2)):
        for rank in range(size):
            s = distributed.shard(n, rank, size)
            assert s.step in (None, 1) and 0 <= s.start <= s.stop <= n


# ---------------------------------------------------------------- one process: nothing to exchange


def test_one_process_gets_its_own_values_back():
    world = distributed.World()
    t = torch.arange(6).reshape(3, 2)
    assert distributed.gather_rows(t, world) is t
    assert distributed.all_sum([1.5, 2.0], world) == [1.5, 2.0]
    obj = {"a": torch.ones(2)}
    assert distributed.broadcast(obj, world) is obj
    assert distributed.on_main(lambda: "done", world) == "done"
    error = ConfigError("said by the only rank")

    def fails():
        raise error

    with pytest.raises(ConfigError) as e:
        distributed.on_main(fails, world)
    assert e.value is error and e.value.rank is None


# ---------------------------------------------------------------- two processes, gloo

SIZE = 2
ROWS = {0: 3, 1: 5}  # each rank holds a different number of rows


def _rows(rank: int, n: int) -> torch.Tensor:
    """Rank's (n, 4) int64 rows, each naming its rank and its row: 100 * rank + 10 * row + column."""
    return torch.arange(4) + 100 * rank + 10 * torch.arange(n)[:, None]


def _rank_main(rank: int, init_file: str, out: str) -> None:
    """One rank: join the group, call each helper, pickle what it returned (or raised) for the test to check."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=SIZE,
                            timeout=datetime.timedelta(seconds=60))
    world = distributed.World(rank=rank, size=SIZE, backend="gloo")
    got: dict = {}
    try:
        got["rows"] = distributed.gather_rows(_rows(rank, ROWS[rank]), world)
        # rank 0 holds no rows at all; float and uint8 images keep their dtype and trailing shape
        got["empty_first"] = distributed.gather_rows(torch.full((2 * rank, 2, 3), rank + 0.5), world)
        got["images"] = distributed.gather_rows(torch.full((rank + 1, 28, 28), 200 + rank, dtype=torch.uint8), world)
        got["sums"] = distributed.all_sum([rank + 1, 0.25, 1e9 + rank], world)  # 2e9 + 1: exact in float64 only
        got["broadcast"] = distributed.broadcast({"from": rank, "t": torch.full((3,), float(rank))}
                                                 if rank == 0 else "rank 1's own", world)
        calls: list[int] = []
        got["on_main"] = distributed.on_main(lambda: calls.append(rank) or f"made by rank {rank}", world)
        got["on_main_calls"] = calls

        def refuse():
            raise RunError("rank 0 cannot use the run.", hint="Choose another.", run_dir="/runs/x", resumable=True)

        try:
            distributed.on_main(refuse, world)
            got["error"] = None
        except FmnistError as e:
            got["error"] = (type(e).__name__, str(e), e.rank, e.hint, str(e.run_dir), e.resumable)

        def bug():
            raise KeyError("a bug on rank 0")

        try:
            distributed.on_main(bug, world)
            got["bug"] = None
        except KeyError as e:
            got["bug"] = repr(e)
    finally:
        dist.destroy_process_group()
    Path(out, f"{rank}.pkl").write_bytes(pickle.dumps(got))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[int, dict]:
    """What each of 2 real gloo processes got back from the helpers."""
    tmp = tmp_path_factory.mktemp("gloo")
    # fork: the children inherit the imported torch (spawn would import it twice more, seconds on 2 cores)
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, str(tmp / "init"), str(tmp))) for r in range(SIZE)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * SIZE, "a rank failed or hung"
    return {r: pickle.loads((tmp / f"{r}.pkl").read_bytes()) for r in range(SIZE)}


def test_gather_rows_concatenates_in_rank_order_on_every_rank(two_ranks):
    want = torch.cat([_rows(0, ROWS[0]), _rows(1, ROWS[1])])
    for rank, got in two_ranks.items():
        assert torch.equal(got["rows"], want), rank
        assert got["rows"].dtype == torch.int64
        assert torch.equal(got["empty_first"], torch.full((2, 2, 3), 1.5)), rank
        images = got["images"]
        assert images.dtype == torch.uint8 and images.shape == (3, 28, 28)
        assert images[:, 0, 0].tolist() == [200, 201, 201], rank


def test_all_sum_adds_each_value_over_the_ranks_exactly(two_ranks):
    for got in two_ranks.values():
        assert got["sums"] == [3.0, 0.5, 2e9 + 1]


def test_broadcast_gives_rank_0s_object_to_every_rank(two_ranks):
    for got in two_ranks.values():
        assert got["broadcast"]["from"] == 0 and torch.equal(got["broadcast"]["t"], torch.zeros(3))


def test_on_main_runs_on_rank_0_alone_and_every_rank_gets_its_result(two_ranks):
    assert two_ranks[0]["on_main_calls"] == [0] and two_ranks[1]["on_main_calls"] == []
    assert two_ranks[0]["on_main"] == two_ranks[1]["on_main"] == "made by rank 0"


def test_an_error_on_rank_0_is_raised_on_every_rank_and_said_once(two_ranks):
    said = ("RunError", "rank 0 cannot use the run.", "Choose another.", "/runs/x", True)
    name, message, rank, hint, run_dir, resumable = two_ranks[0]["error"]
    assert (name, message, hint, run_dir, resumable) == said and rank is None  # rank 0 speaks for itself
    name, message, rank, hint, run_dir, resumable = two_ranks[1]["error"]
    assert (name, message, hint, run_dir, resumable) == said and rank == 0  # the others know rank 0 said it
    assert two_ranks[0]["bug"] == two_ranks[1]["bug"] == "KeyError('a bug on rank 0')"  # a bug too: nobody waits
