"""The CPU copy engine: demand copies overtake queued prefetches, queued prefetches can be cancelled,
completion is observed by poll or wait, and every finished copy is recorded with its bytes."""

from __future__ import annotations

import time

import pytest
import torch

from moe_runtime.offload.engines import ThreadCopyEngine, achieved_gbps


def test_demand_overtakes_queued_prefetches_and_cancel_only_before_start():
    eng = ThreadCopyEngine(n_slots=4)
    big_src, big_dst = torch.ones(32_000_000), torch.empty(32_000_000)  # keeps the worker busy (128 MB)
    src = [torch.full((1000,), float(i)) for i in range(4)]
    dst = [torch.empty(1000) for _ in range(4)]
    try:
        eng.submit(0, big_src, big_dst, demand=False)
        while eng.is_queued(0):  # let the worker start the big copy
            time.sleep(0.001)
        eng.submit(1, src[1], dst[1], demand=False)
        eng.submit(2, src[2], dst[2], demand=False)
        eng.submit(3, src[3], dst[3], demand=True)
        assert eng.cancel_if_queued(2)  # still queued behind the big copy
        eng.wait(1)
        eng.wait(3)
        assert torch.equal(dst[1], src[1]) and torch.equal(dst[3], src[3])
        assert not eng.cancel_if_queued(1)  # finished: too late to cancel
        order = [r.slot for r in eng.records]
        assert order == [0, 3, 1]  # the demand copy went ahead of the queued prefetch; 2 never ran
        assert not eng.is_done(2)
        assert sorted(eng.poll()) == [0]  # 1 and 3 were waited on; 2 was cancelled
        assert eng.records[0].nbytes == 128_000_000 and not eng.records[0].demand and eng.records[1].demand
        assert achieved_gbps(eng.records) > 0
    finally:
        eng.close()


def test_promoting_a_queued_prefetch_runs_it_first():
    eng = ThreadCopyEngine(n_slots=3)
    big_src, big_dst = torch.ones(32_000_000), torch.empty(32_000_000)
    a_src, a_dst = torch.full((10,), 1.0), torch.empty(10)
    b_src, b_dst = torch.full((10,), 2.0), torch.empty(10)
    try:
        eng.submit(0, big_src, big_dst, demand=False)
        while eng.is_queued(0):  # let the worker start the big copy
            time.sleep(0.001)
        eng.submit(1, a_src, a_dst, demand=False)
        eng.submit(2, b_src, b_dst, demand=False)
        eng.promote(2)  # the compute needs 2 now (the protocol says so): it must not wait behind 1
        eng.wait(2)
        assert torch.equal(b_dst, b_src)
        eng.wait(1)
        assert [r.slot for r in eng.records] == [0, 2, 1]
    finally:
        eng.close()


def test_resubmitted_slot_reports_only_its_new_copy():
    eng = ThreadCopyEngine(n_slots=1)
    dst = torch.empty(4)
    try:
        eng.submit(0, torch.ones(4), dst, demand=True)
        eng.wait(0)
        eng.submit(0, torch.full((4,), 7.0), dst, demand=True)
        eng.wait(0)
        assert torch.equal(dst, torch.full((4,), 7.0))
        assert eng.poll() == []  # both copies were consumed by wait; no stale report
    finally:
        eng.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_engine_copies_cancels_and_times():
    from moe_runtime.offload.cuda_engine import CudaCopyEngine

    dev = torch.device("cuda")
    eng = CudaCopyEngine(n_slots=4, device=dev, stream_depth=1)
    src = [torch.full((1 << 20,), float(i)).pin_memory() for i in range(4)]
    dst = torch.empty(4, 1 << 20, device=dev)
    eng.submit(0, src[0], dst[0], demand=False)  # on the prefetch stream
    eng.submit(1, src[1], dst[1], demand=False)  # held in the software queue (depth 1)
    eng.submit(2, src[2], dst[2], demand=False)
    assert eng.cancel_if_queued(2) and not eng.cancel_if_queued(0)
    eng.submit(3, src[3], dst[3], demand=True)
    for s in (0, 1, 3):
        eng.wait(s)  # the compute stream waits on each slot's event
    got = dst[[0, 1, 3], 0].cpu()  # ordered after the waits on the compute stream
    assert got.tolist() == [0.0, 1.0, 3.0]
    eng.close()
    assert sorted(r.slot for r in eng.records) == [0, 1, 3]
    assert all(r.end_s >= r.start_s >= 0 for r in eng.records)


def test_a_failed_copy_is_raised_on_the_compute_thread_not_a_hang():
    engine = ThreadCopyEngine(1)
    try:
        engine.submit(0, torch.ones(4), torch.zeros(3), demand=True)  # shapes differ: the copy fails
        with pytest.raises(RuntimeError, match="copy thread failed"):
            engine.wait(0)
    finally:
        engine.close()


def test_a_fill_pauses_for_a_demand_copy_and_a_promoted_fill_finishes_first():
    eng = ThreadCopyEngine(n_slots=4)
    fill_src, fill_dst = torch.arange(16_000_000, dtype=torch.float32), torch.empty(16_000_000)  # 64 MB: 64 chunks
    src, dst = torch.full((1000,), 3.0), torch.empty(1000)
    try:
        eng.fill(0, fill_src, fill_dst)
        while eng.is_queued(0):  # the worker has started the fill's first chunk
            time.sleep(0.0005)
        assert eng.backlog() == 0  # a running fill does not delay a demand copy beyond one chunk
        eng.submit(1, src, dst, demand=True)
        eng.wait(1)
        eng.wait(0)
        assert torch.equal(dst, src) and torch.equal(fill_dst, fill_src)  # the paused fill resumed where it was
        demand, fill = sorted(eng.records, key=lambda r: r.slot)[::-1]
        assert demand.slot == 1 and fill.slot == 0 and fill.nbytes == 64_000_000
        assert demand.end_s <= fill.end_s  # the demand copy did not wait for the whole fill
        # a queued fill the compute needs becomes a demand copy: it goes ahead of a queued prefetch
        eng.submit(2, torch.ones(64_000_000), torch.empty(64_000_000), demand=False)  # 256 MB: the worker is busy
        while eng.is_queued(2):
            time.sleep(0.0005)
        eng.submit(3, src, torch.empty(1000), demand=False)
        eng.fill(1, src, dst)
        assert eng.ready_in(1, 1e-3) is None and eng.backlog() == 1
        eng.promote(1)
        eng.wait(1)
        eng.wait(3)
        assert [r.slot for r in eng.records[2:]] == [2, 1, 3]
    finally:
        eng.close()


def test_a_resumed_fill_keeps_its_place_and_its_progress_counts():
    """A fill paused for a demand copy resumes ahead of the fills queued after it; ``ready_in`` of a running
    fill is the part of its copy still to go (by offset), not its whole time less the time since it first
    started (which counted its pause as progress)."""
    eng = ThreadCopyEngine(n_slots=4)
    a_src, a_dst = torch.arange(16_000_000, dtype=torch.float32), torch.empty(16_000_000)  # 64 MB
    b_src, b_dst = torch.ones(1000), torch.empty(1000)
    try:
        eng.fill(0, a_src, a_dst)
        while eng.is_queued(0):
            time.sleep(0.0005)
        eng.fill(1, b_src, b_dst)
        eng.submit(2, torch.full((1000,), 2.0), torch.empty(1000), demand=True)
        eng.wait(2)
        eng.wait(0)
        eng.wait(1)
        assert torch.equal(a_dst, a_src) and torch.equal(b_dst, b_src)
        order = [r.slot for r in eng.records]
        assert order.index(0) < order.index(1)  # A (paused or not) before B, queued after it
        # the worker is idle now: a fill a quarter done that first started long ago has three quarters to go
        eng._running = [2, 0, 3, a_src, a_dst, False, False, 1, 4_000_000, -1e6]
        assert eng.ready_in(3, 1.0) == pytest.approx(0.75)
        eng._running[0], eng._running[8] = 0, 0  # a one-piece copy that started long ago: done by now
        assert eng.ready_in(3, 1.0) == 0.0
        eng._running = None
    finally:
        eng.close()
