"""The bounded event queue of the supervisor thread (supervisor_service.runtime.EventQueue), and the ticker
that feeds it, both on an injected clock."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from supervisor_service.app.metrics import Metrics
from supervisor_service.core import Clear, FakeClock, Heartbeat, Stop, Tick
from supervisor_service.runtime import HEARTBEAT_OVERHEAD_BYTES, EventQueue, QueueClosed, QueueFull, Ticker

# Generous bound for anything a helper thread must finish: the tests wait on events, not on sleeps.
JOIN_S = 5.0


def ev(i: int) -> Tick:
    """A distinguishable event."""
    return Tick(due_monotonic=float(i))


def drain(q: EventQueue) -> list:
    out = []
    while (item := q.get(timeout=0)) is not None:
        out.append(item)
    return out


def run_in_thread(fn):
    """Start fn in a daemon thread; returns (thread, result dict with 'value' or 'error')."""
    result: dict = {}
    started = threading.Event()

    def target():
        started.set()
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            result["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    assert started.wait(JOIN_S)
    return t, result


def wait_until_blocked(thread: threading.Thread, settle_s: float = 0.05) -> None:
    """Give a thread time to reach its wait; the tests stay correct if it has not yet."""
    thread.join(settle_s)
    assert thread.is_alive()


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize("capacity", [0, -1])
def test_capacity_below_one_is_rejected(capacity):
    with pytest.raises(ValueError):
        EventQueue(capacity)


def test_new_queue_is_empty():
    q = EventQueue(4)
    assert len(q) == 0
    assert q.capacity == 4
    assert not q.closed
    assert q.oldest_age() == 0.0


# ---------------------------------------------------------------- capacity


def test_offer_respects_capacity():
    q = EventQueue(3)
    assert [q.offer(ev(i)) for i in range(5)] == [True, True, True, False, False]
    assert len(q) == 3
    assert drain(q) == [ev(0), ev(1), ev(2)]


def test_put_respects_capacity_and_times_out_with_queue_full():
    q = EventQueue(2)
    q.put(ev(0), timeout=0)
    q.put(ev(1), timeout=0)
    start = time.monotonic()
    with pytest.raises(QueueFull):
        q.put(ev(2), timeout=0.05)
    assert time.monotonic() - start >= 0.04  # it did wait for room
    with pytest.raises(QueueFull):
        q.put(ev(3), timeout=0)
    assert len(q) == 2
    assert drain(q) == [ev(0), ev(1)]


def test_offer_and_put_share_the_same_bound():
    q = EventQueue(2)
    q.put(ev(0), timeout=0)
    assert q.offer(ev(1))
    assert not q.offer(ev(2))
    with pytest.raises(QueueFull):
        q.put(ev(3), timeout=0)


def test_put_control_ignores_capacity():
    q = EventQueue(1)
    assert q.offer(ev(0))
    for i in range(1, 50):
        q.put_control(ev(i))
    assert len(q) == 50
    assert drain(q) == [ev(i) for i in range(50)]


def test_control_events_do_not_take_external_slots():
    q = EventQueue(2)
    for i in range(10):
        q.put_control(ev(100 + i))
    # Control events ahead of them do not count against the bound of external events.
    assert q.offer(ev(0))
    q.put(ev(1), timeout=0)
    assert not q.offer(ev(2))


def test_external_slot_released_on_get():
    q = EventQueue(2)
    assert q.offer(ev(0)) and q.offer(ev(1))
    assert not q.offer(ev(2))
    assert q.get(timeout=0) == ev(0)
    assert q.offer(ev(3))
    assert not q.offer(ev(4))
    assert drain(q) == [ev(1), ev(3)]
    # Everything released: the full capacity is available again.
    assert q.offer(ev(5)) and q.offer(ev(6))


def test_getting_a_control_event_releases_no_external_slot():
    q = EventQueue(1)
    q.put_control(Clear())
    assert q.offer(ev(0))
    assert not q.offer(ev(1))
    assert q.get(timeout=0) == Clear()
    # The external event is still queued, so the single slot is still taken.
    assert not q.offer(ev(1))
    assert q.get(timeout=0) == ev(0)
    assert q.offer(ev(1))


def test_blocked_put_proceeds_when_a_get_makes_room():
    q = EventQueue(1)
    q.put(ev(0), timeout=0)
    thread, result = run_in_thread(lambda: q.put(ev(1), timeout=JOIN_S))
    wait_until_blocked(thread)
    assert q.get(timeout=0) == ev(0)
    thread.join(JOIN_S)
    assert not thread.is_alive()
    assert "error" not in result
    assert q.get(timeout=0) == ev(1)


# ---------------------------------------------------------------- order and get


def test_fifo_order_across_put_offer_and_put_control():
    q = EventQueue(10)
    q.put(ev(0), timeout=0)
    q.put_control(ev(1))
    assert q.offer(ev(2))
    q.put_control(Stop())
    q.put(ev(3), timeout=0)
    assert [q.get(timeout=0) for _ in range(5)] == [ev(0), ev(1), ev(2), Stop(), ev(3)]
    assert len(q) == 0


def test_len_counts_control_and_external_events():
    q = EventQueue(2)
    q.offer(ev(0))
    q.put_control(ev(1))
    q.put_control(ev(2))
    assert len(q) == 3
    q.get(timeout=0)
    assert len(q) == 2


def test_get_timeout_returns_none():
    q = EventQueue(1)
    start = time.monotonic()
    assert q.get(timeout=0.05) is None
    assert time.monotonic() - start >= 0.04
    assert q.get(timeout=0) is None


def test_blocked_get_wakes_on_put():
    q = EventQueue(1)
    thread, result = run_in_thread(lambda: q.get(timeout=JOIN_S))
    wait_until_blocked(thread)
    q.put(ev(7), timeout=0)
    thread.join(JOIN_S)
    assert not thread.is_alive()
    assert result == {"value": ev(7)}


def test_blocked_get_wakes_on_put_control():
    q = EventQueue(1)
    thread, result = run_in_thread(lambda: q.get(timeout=JOIN_S))
    wait_until_blocked(thread)
    q.put_control(Stop())
    thread.join(JOIN_S)
    assert result == {"value": Stop()}


def test_many_producers_one_consumer_lose_nothing():
    q = EventQueue(4)
    producers, per_producer = 4, 200

    def produce(p):
        for i in range(per_producer):
            q.put(ev(p * 1000 + i), timeout=JOIN_S)

    threads = [threading.Thread(target=produce, args=(p,), daemon=True) for p in range(producers)]
    for t in threads:
        t.start()
    got = []
    deadline = time.monotonic() + JOIN_S * 2
    while len(got) < producers * per_producer and time.monotonic() < deadline:
        item = q.get(timeout=0.5)
        if item is not None:
            got.append(item)
            assert len(q) <= q.capacity
    for t in threads:
        t.join(JOIN_S)
    assert sorted(e.due_monotonic for e in got) == sorted(
        float(p * 1000 + i) for p in range(producers) for i in range(per_producer)
    )
    # Per producer, FIFO order is kept.
    for p in range(producers):
        mine = [e.due_monotonic for e in got if p * 1000 <= e.due_monotonic < (p + 1) * 1000]
        assert mine == sorted(mine)


# ---------------------------------------------------------------- close


def test_close_makes_put_and_offer_raise_queue_closed():
    q = EventQueue(2)
    q.close()
    assert q.closed
    with pytest.raises(QueueClosed):
        q.put(ev(0), timeout=0)
    with pytest.raises(QueueClosed):
        q.put(ev(0), timeout=1.0)
    with pytest.raises(QueueClosed):
        q.offer(ev(0))
    assert len(q) == 0


def test_close_raises_queue_closed_even_when_full():
    q = EventQueue(1)
    q.put(ev(0), timeout=0)
    q.close()
    with pytest.raises(QueueClosed):
        q.put(ev(1), timeout=0)


def test_get_after_close_drains_then_returns_none():
    q = EventQueue(3)
    q.put(ev(0), timeout=0)
    q.put_control(ev(1))
    q.close()
    assert q.get(timeout=0) == ev(0)
    assert q.get(timeout=0) == ev(1)
    start = time.monotonic()
    assert q.get(timeout=JOIN_S) is None  # closed and empty: no waiting
    assert time.monotonic() - start < JOIN_S / 2


def test_close_wakes_a_blocked_get():
    q = EventQueue(1)
    thread, result = run_in_thread(lambda: q.get(timeout=JOIN_S * 4))
    wait_until_blocked(thread)
    start = time.monotonic()
    q.close()
    thread.join(JOIN_S)
    assert not thread.is_alive()
    assert result == {"value": None}
    assert time.monotonic() - start < JOIN_S


def test_close_wakes_a_blocked_put_with_queue_closed():
    q = EventQueue(1)
    q.put(ev(0), timeout=0)
    thread, result = run_in_thread(lambda: q.put(ev(1), timeout=JOIN_S * 4))
    wait_until_blocked(thread)
    start = time.monotonic()
    q.close()
    thread.join(JOIN_S)
    assert not thread.is_alive()
    assert isinstance(result.get("error"), QueueClosed)
    assert time.monotonic() - start < JOIN_S


def test_close_is_idempotent():
    q = EventQueue(1)
    q.close()
    q.close()
    assert q.closed


# ---------------------------------------------------------------- oldest_age


def test_oldest_age_is_zero_when_empty_and_grows_with_the_oldest_item():
    q = EventQueue(4)
    assert q.oldest_age() == 0.0
    before = time.monotonic()
    q.put(ev(0), timeout=0)
    age = q.oldest_age()
    assert 0.0 <= age <= time.monotonic() - before
    time.sleep(0.03)
    q.put(ev(1), timeout=0)
    older = q.oldest_age()
    assert older >= 0.03  # measured from the first item, not the newest
    q.get(timeout=0)
    # Now the oldest is the second item, queued after the pause.
    assert q.oldest_age() < older
    q.get(timeout=0)
    assert q.oldest_age() == 0.0


def test_oldest_age_counts_control_events():
    q = EventQueue(1)
    q.put_control(Stop())
    time.sleep(0.02)
    assert q.oldest_age() >= 0.02


def test_oldest_age_follows_the_monotonic_clock(monkeypatch):
    q = EventQueue(1)
    q.put(ev(0), timeout=0)
    real = time.monotonic
    monkeypatch.setattr(time, "monotonic", lambda: real() + 100.0)
    assert 100.0 <= q.oldest_age() < 100.0 + JOIN_S


def test_oldest_age_is_measured_on_the_injected_clock():
    clock = FakeClock()
    q = EventQueue(4, clock=clock)
    q.put_control(ev(0))
    assert q.oldest_age() == 0.0  # the clock has not moved
    clock.advance(250)
    q.offer(ev(1))
    clock.advance(750)
    assert q.oldest_age() == pytest.approx(1.0)  # from the first event, not the newest
    q.get(timeout=0)
    assert q.oldest_age() == pytest.approx(0.75)
    q.get(timeout=0)
    assert q.oldest_age() == 0.0


def test_a_heartbeat_is_stamped_on_the_injected_clock():
    clock = FakeClock()
    q = EventQueue(4, clock=clock)
    q.offer_heartbeat(hb(1), None)
    clock.advance(2000)
    assert q.oldest_age() == pytest.approx(2.0)


class JumpingClock(FakeClock):
    """A fake clock that moves 100 s every time it is read: a shorter deadline passes at the next read."""

    def monotonic(self) -> float:
        value = super().monotonic()
        self.advance(100_000)
        return value


def test_the_deadline_of_put_is_on_the_injected_clock():
    q = EventQueue(1, clock=JumpingClock())
    q.put(ev(0), timeout=0)
    t, result = run_in_thread(lambda: q.put(ev(1), timeout=60))  # 60 s on the system clock
    t.join(JOIN_S)
    assert not t.is_alive() and isinstance(result.get("error"), QueueFull)
    assert drain(q) == [ev(0)]


def test_a_put_waiting_on_a_clock_that_does_not_move_is_let_in_by_room_made():
    q = EventQueue(1, clock=FakeClock())
    q.put(ev(0), timeout=0)
    t, result = run_in_thread(lambda: q.put(ev(1), timeout=JOIN_S * 4))  # let in by room, long before it expires
    wait_until_blocked(t)
    assert q.get(timeout=0) == ev(0)
    t.join(JOIN_S)
    assert not t.is_alive() and "error" not in result
    assert drain(q) == [ev(1)]


# ---------------------------------------------------------------- the ticker on a fake clock


class Pending:
    """What the ticker needs of the runtime: the flag of a queued Tick (the consumer clears it)."""

    def __init__(self) -> None:
        self.tick_pending = threading.Event()


def stepped_ticker(interval_s: float = 1.0):
    """A ticker begun but not started: the test moves the clock and calls tick_once, as its thread would."""
    clock = FakeClock()
    q = EventQueue(16, clock=clock)
    runtime = Pending()
    registry = CollectorRegistry()
    ticker = Ticker(q, runtime, clock, Metrics(registry), interval_s)
    ticker.begin()
    assert drain(q) == [Clear()]
    return ticker, clock, q, runtime, lambda: registry.get_sample_value("supervisor_ticks_skipped_total")


def test_ticker_enqueues_each_due_tick_in_phase():
    ticker, clock, q, runtime, skipped = stepped_ticker()
    start = clock.monotonic()
    assert ticker.next_due == start + 1.0
    for n in (1, 2, 3):
        clock.advance(1000)
        assert ticker.tick_once()
        assert drain(q) == [Tick(due_monotonic=start + n)]
        runtime.tick_pending.clear()  # as the consumer does when it takes the tick
    assert ticker.next_due == start + 4.0 and skipped() == 0


def test_ticker_skips_a_tick_due_while_the_previous_one_is_still_queued():
    ticker, clock, q, runtime, skipped = stepped_ticker()
    start = clock.monotonic()
    clock.advance(1000)
    assert ticker.tick_once()
    assert runtime.tick_pending.is_set()
    clock.advance(1000)
    assert ticker.tick_once()  # the first one was not taken: this one is skipped
    assert drain(q) == [Tick(due_monotonic=start + 1)]
    assert skipped() == 1 and ticker.next_due == start + 3.0


def test_ticker_skips_the_ticks_it_slept_through_and_keeps_the_phase():
    ticker, clock, q, _, skipped = stepped_ticker()
    start = clock.monotonic()
    clock.advance(5500)  # a stall: due at 1, 2, 3, 4, 5; woken at 5.5
    assert ticker.tick_once()
    assert drain(q) == [Tick(due_monotonic=start + 5)]  # the latest one due, the four before it skipped
    assert skipped() == 4 and ticker.next_due == start + 6.0


def test_a_stopped_ticker_enqueues_nothing_more():
    ticker, clock, q, runtime, _ = stepped_ticker()
    ticker.stop()
    clock.advance(1000)
    assert not ticker.tick_once()
    assert drain(q) == [] and not runtime.tick_pending.is_set()


class CountingClock(FakeClock):
    """A fake clock that does not move and counts its monotonic readings; `looked` is set at the `n`-th."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.reads, self._n, self.looked = 0, n, threading.Event()

    def monotonic(self) -> float:
        self.reads += 1
        if self.reads >= self._n:
            self.looked.set()
        return super().monotonic()


def test_ticker_thread_sends_no_tick_before_the_clock_reaches_its_due_time():
    clock = CountingClock(n=6)
    q = EventQueue(16, clock=clock)
    ticker = Ticker(q, Pending(), clock, Metrics(CollectorRegistry()), 0.01)
    ticker.start(clear=False)  # one reading for the first due time, then one per wake-up of the thread
    try:
        assert clock.looked.wait(JOIN_S)  # the thread woke and looked at the clock several times
    finally:
        ticker.stop()
    assert drain(q) == []  # each time the tick was not yet due on the clock


# ---------------------------------------------------------------- get_batch


def hb(i: int) -> Heartbeat:
    return Heartbeat(i, np.array([i], dtype=np.uint64), 1000 + i)


def test_get_batch_takes_a_run_of_heartbeats_and_every_other_event_alone():
    q = EventQueue(16)
    for event in (hb(0), hb(1), hb(2), ev(3), ev(4), hb(5), Stop(), hb(6), hb(7), hb(8)):
        q.offer(event) if isinstance(event, Heartbeat) else q.put_control(event)
    batches = []
    while batch := q.get_batch(timeout=0, limit=2):
        batches.append([e.datanode_id if isinstance(e, Heartbeat) else e for e in batch])
    assert batches == [[0, 1], [2], [ev(3)], [ev(4)], [5], [Stop()], [6, 7], [8]]


def test_get_batch_releases_the_external_slots_it_takes():
    q = EventQueue(3)
    assert all(q.offer(hb(i)) for i in range(3))
    assert not q.offer(hb(3))
    assert len(q.get_batch(timeout=0, limit=10)) == 3
    assert q.external_depth == 0 and len(q) == 0
    assert [q.offer(hb(i)) for i in range(4)] == [True, True, True, False]


def test_get_batch_times_out_empty_and_wakes_on_offer():
    q = EventQueue(2)
    assert q.get_batch(timeout=0.01, limit=10) == []
    thread, result = run_in_thread(lambda: q.get_batch(timeout=JOIN_S, limit=10))
    wait_until_blocked(thread)
    assert q.offer(hb(1))
    thread.join(JOIN_S)
    assert [e.datanode_id for e in result["value"]] == [1]
    q.close()
    assert q.get_batch(timeout=JOIN_S, limit=10) == []  # closed and empty: no waiting


def test_a_heartbeat_offered_without_a_wake_waits_for_wake_and_is_then_taken():
    q = EventQueue(4)
    thread, result = run_in_thread(lambda: q.get_batch(timeout=JOIN_S, limit=10))
    wait_until_blocked(thread)
    assert q.offer_heartbeat(beat(1, regions(2), 1000), None, wake=False) is not None
    assert q.offer_heartbeat(beat(2, regions(2), 1000), None, wake=False) is not None
    thread.join(0.2)
    assert thread.is_alive()  # not woken: the consumer still waits (its timeout is JOIN_S)
    q.wake()  # one wake for both
    thread.join(JOIN_S)
    assert not thread.is_alive()
    assert [e.datanode_id for e in result["value"]] == [1, 2]
    q.wake()  # nothing queued, nobody waiting: nothing happens
    assert q.get_batch(timeout=0.01, limit=10) == []


def test_a_consumer_that_waits_after_a_heartbeat_offered_without_a_wake_takes_it_at_once():
    q = EventQueue(4)
    assert q.offer_heartbeat(beat(1, regions(2), 1000), None, wake=False) is not None
    started = time.monotonic()
    assert [e.datanode_id for e in q.get_batch(timeout=JOIN_S, limit=10)] == [1]
    assert time.monotonic() - started < JOIN_S / 2


# ---------------------------------------------------------------- heartbeat bounds and coalescing


def regions(n: int, first: int = 0) -> np.ndarray:
    return np.arange(first, first + n, dtype=np.uint64)


def beat(datanode_id: int, region_ids: np.ndarray, ts: int, received: float = 0.0) -> Heartbeat:
    return Heartbeat(datanode_id, region_ids, ts, received)


def test_a_newer_heartbeat_of_a_stream_supersedes_its_queued_one_at_the_newest_time():
    q = EventQueue(8)
    same = regions(3)
    first = q.offer_heartbeat(beat(1, same, 1000, received=5.0), None)
    assert first is not None and q.external_depth == 1
    # The same regions (the stream's cached array, or an equal one): folded in, no new slot.
    assert q.offer_heartbeat(beat(1, same, 2000, received=6.0), first) is first
    assert q.offer_heartbeat(beat(1, regions(3), 3000, received=7.0), first) is first
    # An older timestamp after a newer one changes nothing: the detector would ignore it.
    assert q.offer_heartbeat(beat(1, same, 1500), first) is first
    assert q.external_depth == 1 and len(q) == 1
    (event,) = q.get_batch(timeout=0, limit=10)
    assert (event.datanode_id, event.ts_millis) == (1, 3000)
    assert event.received_monotonic == 5.0  # its apply latency counts the whole wait
    assert q.heartbeat_bytes == 0 and q.external_depth == 0


def test_a_heartbeat_is_not_folded_into_one_already_taken_or_with_other_regions():
    q = EventQueue(8)
    first = q.offer_heartbeat(beat(1, regions(3), 1000), None)
    other = q.offer_heartbeat(beat(1, regions(4), 2000), first)
    assert other is not first and len(q) == 2  # other regions: both are applied, in order
    assert [e.ts_millis for e in q.get_batch(timeout=0, limit=10)] == [1000, 2000]
    again = q.offer_heartbeat(beat(1, regions(4), 3000), other)
    assert again is not other and len(q) == 1  # `other` was taken by the consumer meanwhile
    assert q.offer_heartbeat(beat(2, regions(4), 3000), again) is not again  # another datanode
    assert q.offer_heartbeat(Heartbeat(1, regions(4), 4000, 0.0, True), again) is not again  # known-only
    assert len(q) == 3


@pytest.mark.parametrize("between", [ev(0), Clear()], ids=["external", "control"])
def test_a_heartbeat_is_never_folded_across_another_event(between):
    """A Deregister, Tick or Dump queued between two heartbeats must see the first applied and not the second."""
    q = EventQueue(8)
    same = regions(3)
    first = q.offer_heartbeat(beat(1, same, 1000), None)
    assert q.offer_heartbeat(beat(2, regions(2), 1500), None)  # another datanode's heartbeat is no barrier
    assert q.offer_heartbeat(beat(1, same, 1800), first) is first
    q.offer(between) if between.__class__ is Tick else q.put_control(between)
    second = q.offer_heartbeat(beat(1, same, 2000), first)
    assert second is not first
    assert q.offer_heartbeat(beat(1, same, 3000), second) is second
    got = [(e.datanode_id, e.ts_millis) if isinstance(e, Heartbeat) else e for e in q.drain()]
    assert got == [(1, 1800), (2, 1500), between, (1, 3000)]


def test_one_datanode_cannot_take_more_than_its_share_of_the_queue():
    q = EventQueue(20, max_heartbeat_bytes=1 << 20, datanode_fraction=0.1)  # 2 events per datanode
    flooder = [q.offer_heartbeat(beat(1, regions(10, first=i * 10), i), None) for i in range(5)]
    assert [e is not None for e in flooder] == [True, True, False, False, False]
    assert q.refusal(beat(1, regions(10, first=99), 9)) == "datanode_share"
    # Everyone else still gets in.
    assert all(q.offer_heartbeat(beat(d, regions(10), 1), None) for d in range(2, 12))
    # Once the flooder's heartbeats are applied, it gets its share again.
    while q.get_batch(timeout=0, limit=100):
        pass
    assert q.offer_heartbeat(beat(1, regions(10, first=500), 9), None) is not None


def test_heartbeat_bytes_are_bounded_per_datanode_and_in_all():
    mib = 1 << 20
    q = EventQueue(1000, max_heartbeat_bytes=8 * mib, datanode_fraction=0.25)  # 2 MiB per datanode
    big = regions(mib // 8 * 3)  # 3 MiB of region ids: more than a datanode's share...
    assert q.offer_heartbeat(beat(1, big, 1), None) is not None  # ...but a datanode's first is always admitted
    assert q.offer_heartbeat(beat(1, regions(10), 2), None) is None
    assert q.refusal(beat(1, regions(10), 2)) == "datanode_share"
    half = regions(mib // 16)  # 0.5 MiB
    assert all(q.offer_heartbeat(beat(d, half, 1), None) for d in range(2, 11))  # 3 + 9 x 0.5 MiB
    assert q.offer_heartbeat(beat(11, half, 1), None) is None  # (each with a little overhead) > 8 MiB
    assert q.refusal(beat(11, half, 1)) == "queue_bytes"
    assert q.heartbeat_bytes == 3 * mib + 9 * mib // 2 + 10 * HEARTBEAT_OVERHEAD_BYTES
    q.get_batch(timeout=0, limit=1)  # the 3 MiB one
    assert q.offer_heartbeat(beat(11, half, 1), None) is not None
    q.drain()
    assert q.heartbeat_bytes == 0 and q.offer_heartbeat(beat(1, big, 3), None) is not None


def test_offer_of_a_heartbeat_counts_against_the_same_bounds():
    q = EventQueue(10, datanode_fraction=0.2)  # 2 events per datanode
    assert [q.offer(hb(1)), q.offer(hb(1)), q.offer(hb(1))] == [True, True, False]
    assert q.offer(hb(2)) and q.offer(ev(0))
    q.put_control(hb(1))  # control events are never refused, and hold no share
    assert q.external_depth == 4 and len(q) == 5
    assert [type(e).__name__ for e in q.get_batch(timeout=0, limit=10)] == ["Heartbeat"] * 3


def _liveness(events) -> dict:
    """What the detector table keeps of a sequence of events, as far as liveness goes: the last
    heartbeat time of each (datanode, region), created by a heartbeat, removed by a Deregister."""
    last: dict = {}
    for event in events:
        if isinstance(event, Heartbeat):
            for region in event.region_ids.tolist():
                key = (event.datanode_id, region)
                last[key] = max(last.get(key, event.ts_millis), event.ts_millis)
        else:
            datanode_id = int(event.due_monotonic)  # the stand-in Deregister of a whole datanode
            last = {k: v for k, v in last.items() if k[0] != datanode_id}
    return last


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(0, 50), st.booleans()), max_size=40))
def test_coalescing_keeps_the_liveness_every_heartbeat_carried(steps):
    """Streams 0-2 (datanodes 1-3) send heartbeats naming one of three region sets, at times that
    may go back (a client clock), interleaved with other events (stream 3: a Deregister stand-in)
    and with the consumer taking what is queued: applying what the queue gives must leave every
    (datanode, region) with the same last heartbeat as applying every heartbeat sent, in order."""
    sets = [np.arange(3, dtype=np.uint64), np.arange(2, 5, dtype=np.uint64), np.arange(3, dtype=np.uint64)]
    q = EventQueue(1000)
    previous: dict = {}
    sent, applied = [], []
    for stream, which, ts, take in steps:
        if stream == 3:
            event = Tick(due_monotonic=float(which + 1))
            q.offer(event)
        else:
            event = Heartbeat(stream + 1, sets[which], ts)
            previous[stream] = q.offer_heartbeat(event, previous.get(stream))
        sent.append(event)
        if take:
            applied.extend(q.get_batch(timeout=0, limit=3))
    applied.extend(q.drain())
    assert _liveness(applied) == _liveness(sent)


def test_a_put_on_a_clock_that_never_moves_still_times_out():
    """The wait for room is a real wait: on a frozen fake clock a full queue still answers QueueFull."""
    import time

    from supervisor_service.core import FakeClock

    q = EventQueue(1, clock=FakeClock())
    q.put(Tick(), timeout=0.1)
    started = time.monotonic()
    with pytest.raises(QueueFull):
        q.put(Tick(), timeout=0.2)
    assert time.monotonic() - started < 5
