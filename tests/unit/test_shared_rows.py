"""Shared-memory rows (transport/shared_rows.py): segments, links, lifetimes, fallbacks.

Each test uses a directory of its own as the "/dev/shm" (a tmpfs when the machine can mount
one, else a plain directory: the calls are the same), so names are counted exactly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vllm_chat_embeds.limits import Limits
from vllm_chat_embeds.patches import v1_engine_core, v1_executor_multiproc_executor
from vllm_chat_embeds.stores import engine_rows
from vllm_chat_embeds.transport import shared_rows
from vllm_chat_embeds.transport.shared_rows import KEPT_SUFFIX, NAME_PREFIX, NO_SHARED_MEMORY

pytestmark = pytest.mark.unit
MIB = 1024 * 1024


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(NAME_PREFIX))


@pytest.fixture
def shm(tmp_path: Path):
    """This process's shared rows, in ``tmp_path``, for rows of any size, none kept for reuse
    (so a name goes with its rows: the tests of reuse say so)."""
    limits = Limits(shm_dir=str(tmp_path), shared_above_bytes=0, shm_reuse_bytes=0)
    store = shared_rows.configure(limits)
    yield store
    gc.collect()
    shared_rows.configure(Limits())


@pytest.fixture
def reusing(tmp_path: Path):
    """As ``shm``, keeping up to 4 MiB of segments for reuse."""
    limits = Limits(shm_dir=str(tmp_path), shared_above_bytes=0, shm_reuse_bytes=4 * MIB)
    store = shared_rows.configure(limits)
    yield store
    gc.collect()
    store.drop_kept()
    shared_rows.configure(Limits())


def kept(directory: Path) -> list[str]:
    return [n for n in names(directory) if n.endswith(KEPT_SUFFIX)]


def test_rows_cross_as_a_link_that_the_receiver_removes(shm, tmp_path: Path) -> None:
    rows = shared_rows.empty((4, 8), torch.float16)
    assert rows is not None
    rows.copy_(torch.arange(32, dtype=torch.float16).view(4, 8))
    (made,) = names(tmp_path)
    wire = shm.send(rows[1:3])  # a slice: the offset travels
    assert wire is not None and wire[1] == 1 * 8 * 2
    assert len(names(tmp_path)) == 2  # the segment and the link for this send
    got = shm.receive(wire, "r1", keep_link=False)
    assert torch.equal(got, rows[1:3])
    assert names(tmp_path) == [made]  # the link is gone once mapped
    got[0, 0] = 99  # copy-on-write: the creator's rows stay as they were
    assert rows[1, 0] == 8


def test_the_name_goes_with_the_creators_last_view_and_mappings_outlive_it(shm, tmp_path):
    rows = shared_rows.empty((2, 4), torch.float32)
    assert rows is not None
    rows.fill_(3.0)
    wire = shm.send(rows)
    assert wire is not None
    del rows
    gc.collect()
    assert len(names(tmp_path)) == 1  # the creator's name is gone; the unopened link stays
    got = shm.receive(wire, "r1", keep_link=False)
    assert names(tmp_path) == []
    assert torch.equal(got, torch.full((2, 4), 3.0))
    assert shm.made_bytes() == 0


def test_a_kept_link_is_passed_on_and_retired(shm, tmp_path: Path) -> None:
    rows = shared_rows.empty((3, 4), torch.bfloat16)
    assert rows is not None
    rows.fill_(1.5)
    wire = shm.send(rows)
    assert wire is not None
    engine_core = shm.receive(wire, "r1", keep_link=True)
    assert shm.pass_on(engine_core) == wire  # the engine core hands its workers the same link
    assert shm.pass_on(rows) is None  # the creator's own rows are sent, not passed on
    worker = shm.receive(wire, "r1", keep_link=True)
    assert torch.equal(worker, engine_core)
    shm.retire([wire[0]])
    assert len(names(tmp_path)) == 1  # only the creator's segment


def test_an_abort_frees_rows_that_only_a_dead_tracebacks_cycle_holds(shm, tmp_path) -> None:
    """As vLLM's ``generate`` frame does when a client goes away: the rows stay reachable
    from the exception's traceback cycle, so their name would wait for an automatic
    collection; ``collect_soon`` (called on every abort) runs one a second later."""

    def failing_request() -> None:
        prompt = {"prompt_embeds": shared_rows.empty((4, 8), torch.float32)}
        try:
            raise RuntimeError("client went away")
        except RuntimeError as exc:
            prompt["error"] = exc  # the cycle: exception -> traceback -> frame -> prompt

    async def abort() -> None:
        failing_request()
        assert len(names(tmp_path)) == 1
        shared_rows.collect_soon()
        shared_rows.collect_soon()  # coalesced: one collection pending
        await asyncio.sleep(shared_rows.COLLECT_AFTER_ABORT_S + 0.5)

    gc.disable()  # no automatic collection in between: only the scheduled one runs
    try:
        asyncio.run(abort())
    finally:
        gc.enable()
    assert names(tmp_path) == []


def test_a_segment_whose_rows_are_gone_is_kept_and_reused_for_rows_of_about_its_size(
    reusing, tmp_path: Path
) -> None:
    rows = shared_rows.empty((64, 64), torch.float32)  # 16 KiB
    assert rows is not None
    rows.fill_(1.0)
    (name,) = names(tmp_path)
    view = rows[3:5].numpy()  # a view made from the rows keeps the segment lent
    del rows
    gc.collect()
    assert kept(tmp_path) == []
    del view
    gc.collect()
    assert kept(tmp_path) == [name + KEPT_SUFFIX]  # kept, under a name that says so
    assert reusing.made_bytes() == 0  # no rows lie in it
    again = shared_rows.empty((60, 64), torch.float32)  # 15 KiB: fills enough of it
    assert again is not None
    assert names(tmp_path) == [name]  # the same segment, its pages in place
    again.fill_(2.0)
    wire = reusing.send(again)
    assert wire is not None and wire[0].startswith(name + "-l")
    got = reusing.receive(wire, "r1", keep_link=False)
    assert torch.equal(got, torch.full((60, 64), 2.0))
    small = shared_rows.empty((8, 64), torch.float32)  # 2 KiB: a segment of its own
    assert small is not None and len(names(tmp_path)) == 2
    del again, got, small
    gc.collect()
    assert len(kept(tmp_path)) == 2


def test_a_kept_segment_is_not_reused_while_another_process_may_read_it(
    reusing, tmp_path: Path
) -> None:
    """A link not yet opened, then a mapping (its shared lock), each keep the segment from
    being written again; once both are gone, it is reused."""
    rows = shared_rows.empty((16, 16), torch.float32)
    assert rows is not None
    rows.fill_(7.0)
    (name,) = names(tmp_path)
    wire = reusing.send(rows)
    assert wire is not None
    del rows
    gc.collect()
    assert kept(tmp_path) == [name + KEPT_SUFFIX]
    other = shared_rows.empty((16, 16), torch.float32)  # a link is pending: a new segment
    assert other is not None and name + KEPT_SUFFIX in names(tmp_path)
    mapped = reusing.receive(wire, "r1", keep_link=False)  # the link goes, the lock stays
    del other
    gc.collect()
    third = shared_rows.empty((16, 16), torch.float32)  # reuses ``other``'s segment, not ours
    assert third is not None and kept(tmp_path) == [name + KEPT_SUFFIX]
    third.fill_(0.0)
    assert torch.equal(mapped, torch.full((16, 16), 7.0))  # the reader's rows are intact
    del mapped
    gc.collect()
    fourth = shared_rows.empty((16, 16), torch.float32)
    assert fourth is not None and kept(tmp_path) == [] and name in names(tmp_path)


def test_kept_segments_are_bounded_expire_and_give_way_to_new_rows(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(shared_rows, "REUSE_IDLE_S", 1.5)
    limits = Limits(shm_dir=str(tmp_path), shared_above_bytes=0, shm_bytes=MIB)
    store = shared_rows.configure(dataclasses.replace(limits, shm_reuse_bytes=MIB // 2))
    try:
        held = [store.allocate(MIB // 4) for _ in range(3)]
        assert all(v is not None for v in held) and len(names(tmp_path)) == 3
        del held
        gc.collect()
        assert len(kept(tmp_path)) == 2  # the bound: the oldest went
        big = store.allocate(MIB * 3 // 4)  # no room beside both: the older gives way
        assert big is not None and len(names(tmp_path)) == 2
        (waiting,) = kept(tmp_path)
        del big
        gc.collect()
        assert names(tmp_path) == [waiting]  # bigger than the bound: not kept
        again = store.allocate(MIB // 4)
        assert again is not None and kept(tmp_path) == []
        del again
        gc.collect()
        assert len(kept(tmp_path)) == 1
        time.sleep(2.5)  # idle past REUSE_IDLE_S: the timer lets it go
        assert names(tmp_path) == []
    finally:
        gc.collect()
        store.drop_kept()
        shared_rows.configure(Limits())


def test_rows_not_in_a_segment_are_sent_as_bytes(shm) -> None:
    assert shm.send(torch.zeros(4, 8)) is None
    assert engine_rows.shared_outgoing(torch.zeros(4, 8)) is None
    rows = shared_rows.empty((4, 8), torch.float32)
    assert rows is not None
    assert shm.send(rows.t()) is None  # not contiguous
    assert shm.send(rows[:0]) is None  # nothing to send


def test_a_missing_link_fails_the_request_with_its_name(shm) -> None:
    rows = shared_rows.empty((2, 4), torch.float32)
    assert rows is not None
    wire = shm.send(rows)
    assert wire is not None
    shm.retire([wire[0]])
    with pytest.raises(RuntimeError, match="gone before this process could map them") as info:
        shm.receive(wire, "req-7", keep_link=False)
    assert "req-7" in str(info.value)
    with pytest.raises(RuntimeError):
        shm.receive(["../../etc/passwd", 0, "float32", 1, 1], "req-8", keep_link=False)


def test_the_shared_wire_round_trips_through_engine_rows(shm) -> None:
    rows = shared_rows.empty((5, 4), torch.float16)
    assert rows is not None
    rows.normal_()
    out = engine_rows.shared_outgoing(rows)
    assert out is not None
    sent, wire = out
    assert sent.shape == (0, 4) and engine_rows.SHARED in wire
    got = engine_rows.incoming(engine_rows.KeptRows(), [], wire, sent, "r1")
    assert torch.equal(got, rows)


def test_small_rows_and_a_spent_budget_fall_back_with_one_log_line(tmp_path, caplog) -> None:
    store = shared_rows.configure(
        Limits(shm_dir=str(tmp_path), shared_above_bytes=1024, shm_bytes=4096)
    )
    try:
        assert store.allocate(512) is None  # below the threshold: quietly private
        first = store.allocate(4096)
        assert first is not None
        with caplog.at_level("WARNING", logger="vllm.chat_embeds"):
            assert store.allocate(2048) is None
            assert store.allocate(2048) is None
        said = [r for r in caplog.records if "cross processes as copies" in r.getMessage()]
        assert len(said) == 1 and "--shm-size" in said[0].getMessage()
        del first
        gc.collect()
        assert store.allocate(2048) is not None  # the budget is freed with the rows
    finally:
        gc.collect()
        shared_rows.configure(Limits())


def test_a_directory_that_cannot_hold_shared_memory_turns_it_off(tmp_path) -> None:
    store = shared_rows.configure(Limits(shm_dir=str(tmp_path / "missing")))
    try:
        assert store.budget == 0 and store.allocate(8 * MIB) is None
    finally:
        shared_rows.configure(Limits())
    assert NO_SHARED_MEMORY.count("{") == 2


def test_a_full_tmpfs_falls_back_instead_of_crashing(tmp_path: Path) -> None:
    """A container's small /dev/shm: the reservation fails (ENOSPC), never a SIGBUS later."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        store = shared_rows.configure(
            Limits(shm_dir=str(small), shared_above_bytes=0, shm_bytes=64 * MIB, shm_reuse_bytes=0)
        )
        held = store.allocate(3 * MIB)
        assert held is not None
        assert store.allocate(3 * MIB) is None  # no room: private memory instead
        assert len(names(small)) == 1  # the failed segment left nothing behind
        del held
        gc.collect()
        assert names(small) == []
    finally:
        gc.collect()
        shared_rows.configure(Limits())
        subprocess.run(["umount", str(small)], check=False)


def test_names_of_dead_creators_are_swept_and_a_creator_cleans_up_at_exit(tmp_path) -> None:
    script = textwrap.dedent(
        f"""
        import os, torch
        from vllm_chat_embeds.limits import Limits
        from vllm_chat_embeds.transport import shared_rows
        store = shared_rows.configure(Limits(shm_dir={str(tmp_path)!r}, shared_above_bytes=0))
        rows = shared_rows.empty((4, 4), torch.float32)
        store.send(rows)  # a link nobody opens
        print(len(os.listdir({str(tmp_path)!r})), flush=True)
        if os.environ.get("DIE"):
            os._exit(0)  # no atexit: as a killed process
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    clean = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
    assert clean.stdout.decode().strip() == "2", clean.stderr.decode()[-2000:]
    assert names(tmp_path) == []  # unlinked at exit
    killed = subprocess.run(
        [sys.executable, "-c", script], env={**env, "DIE": "1"}, capture_output=True
    )
    assert killed.returncode == 0, killed.stderr.decode()[-2000:]
    assert len(names(tmp_path)) == 2  # left behind by a process that could not clean up
    shared_rows.configure(Limits(shm_dir=str(tmp_path)))  # a new creator starts: sweeps
    try:
        assert names(tmp_path) == []
    finally:
        shared_rows.configure(Limits())


class _Executor:
    """Stands in for vLLM's multiprocess executor: one node, one pipeline stage."""

    vllm_config = SimpleNamespace(
        parallel_config=SimpleNamespace(nnodes_within_dp=1, pipeline_parallel_size=1)
    )


setattr(_Executor, v1_executor_multiproc_executor._PASSES_ON_ATTR, True)


def _received_request(rows: torch.Tensor) -> SimpleNamespace:
    """A request as the engine core gets it: its rows as a shared-memory handle."""
    out = engine_rows.shared_outgoing(rows)
    assert out is not None
    sent, wire = out
    params = SimpleNamespace(extra_args={engine_rows.WIRE_KEY: wire})
    return SimpleNamespace(
        request_id="r1", client_index=0, sampling_params=params, prompt_embeds=sent
    )


@pytest.mark.parametrize("fails", [False, True])
def test_the_link_kept_for_workers_goes_when_vllm_fails_the_request_first(
    shm, tmp_path: Path, fails: bool
) -> None:
    rows = shared_rows.empty((4, 8), torch.float16)
    assert rows is not None
    rows.normal_()
    core = SimpleNamespace(model_executor=_Executor())
    request = _received_request(rows)
    links = v1_executor_multiproc_executor.kept_links(core.model_executor)

    def add(_core, req):
        assert torch.equal(req.prompt_embeds, rows)  # vLLM preprocesses the whole rows
        if fails:
            raise ValueError("refused by vLLM's own preprocessing")
        return req

    if fails:
        with pytest.raises(ValueError, match="own preprocessing"):
            v1_engine_core.add_with_rows(core, request, add)
        assert links == {}
        assert len(names(tmp_path)) == 1  # only the creator's segment: no link left behind
    else:
        v1_engine_core.add_with_rows(core, request, add)
        assert list(links) == ["r1"]  # kept for the workers, until the request finishes
        assert len(names(tmp_path)) == 2
