"""The failover history (core/failovers.py): a record per decision with the evidence a Dump showed, its
checks, its submit result and its end; bounded; stored through the codec and restored by a new leader."""

from __future__ import annotations

import math
from concurrent.futures import Future

from supervisor_service.core import (
    BecomeLeader,
    Dump,
    FailoverDrop,
    FailoverPolicy,
    FailoverSet,
    GuardSettings,
    MigrationState,
    StoredState,
)
from supervisor_service.core.insight import ListFailoversQuery
from supervisor_service.store.codec import Mirror, decode_state, encode
from supervisor_service.store.failover_codec import failover_from_json, failover_to_json
from tests.support.insight_sim import START, TICK, InsightSim


def dead(sim: InsightSim, d: int, until_submitted: bool = True) -> int:
    """Datanode `d` stops; run until its regions are submitted. Returns the time of the last Dump before it."""
    sim.run_to(START + 20 * TICK)
    sim.alive.discard(d)
    while not sim.submissions():
        sim.step()
        assert sim.now < START + 120 * TICK, "never failed over"
    return sim.now


def dump_rows(sim: InsightSim, d: int, at: int) -> dict[int, tuple]:
    snap = sim.handle(Dump(Future(), frozenset({d})))
    node = snap.nodes[0]
    samples, means, stds = (a.tolist() for a in node.observed())
    out = {}
    for i, r in enumerate(node.regions.tolist()):
        g = int(node.gids[i])
        out[r] = (node.groups[g].phi(at), node.groups[g].last, means[g], stds[g], samples[g])
    return out


def test_a_decision_is_recorded_with_the_evidence_the_dump_showed_its_checks_and_its_end():
    sim = InsightSim()
    sim.run_to(START + 20 * TICK)
    sim.alive.discard(3)
    before = None
    while not sim.submissions():
        # The Dump taken just before each tick: the last one is the conviction's evidence.
        before = dump_rows(sim, 3, sim.now + TICK)
        sim.step()
    recs = sim.ask(ListFailoversQuery())
    assert len(recs) == 1
    rec = recs[0]
    task = sim.submissions()[0][1]
    assert rec.failover_id == task.request_id and rec.decided_at_millis == sim.now
    assert rec.datanode_id == 3 and rec.from_peer.id == 3 and rec.to_peer.id == 1
    assert rec.region_ids == task.region_ids and rec.timeout_ms == task.timeout_ms
    assert rec.threshold == 8.0 and rec.acceptable_heartbeat_pause_ms == 10_000.0
    for e in rec.evidence:
        phi, last, mean, std, samples = before[e.region_id]
        assert e.phi == phi >= rec.threshold
        assert (e.last_heartbeat_millis, e.mean_interval_millis, e.std_deviation_millis, e.sample_count) == (
            last, mean, std, samples)
        assert e.result == "submitted"
    checks = "\n".join(rec.checks)
    for name in ("phi:", "maintenance: off", "mass_failure: 1 of 10 datanodes silent (0.10 <= 0.50)",
                 "rate_limit: global token taken", "target_rate_limit: datanode 1 granted 2 of 2",
                 "excluded datanodes [3]", "source: datanode 3 at 10.0.0.3:4001"):
        assert name in checks
    assert rec.procedure_id == "proc-1" and rec.result == "submitted: 2"
    assert rec.final_state is MigrationState.UNSPECIFIED and rec.finished_at_millis == 0
    # The procedure ends: the record says so, once.
    sim.poll_state = MigrationState.SUCCEEDED
    sim.run_to(sim.now + 10 * TICK)
    rec = sim.ask(ListFailoversQuery())[0]
    assert rec.final_state is MigrationState.SUCCEEDED and START < rec.finished_at_millis <= sim.now
    # Every step was handed to the store: the last write of the record is the record.
    stored = [c.record for c in sim.changes if isinstance(c, FailoverSet)]
    assert stored[-1] == rec and len(stored) == 3  # decided, answered, finished


def test_a_refused_submit_ends_the_record_failed_with_the_error():
    sim = InsightSim()
    sim.submit_error = "INVALID_ARGUMENT: table 1024 is being dropped"
    dead(sim, 4)
    rec = sim.ask(ListFailoversQuery())[0]
    assert rec.final_state is MigrationState.FAILED and rec.finished_at_millis == sim.now
    assert rec.result == "refused: refused: INVALID_ARGUMENT: table 1024 is being dropped"


def test_an_answer_with_nothing_in_flight_ends_the_record_at_once():
    sim = InsightSim()
    sim.submit_category = "migrated"
    dead(sim, 5)
    rec = sim.ask(ListFailoversQuery())[0]
    assert rec.final_state is MigrationState.SUCCEEDED and rec.finished_at_millis == sim.now
    assert rec.procedure_id == "" and rec.result == "migrated: 2"


def test_a_migration_that_times_out_says_so():
    sim = InsightSim(policy=FailoverPolicy(base_timeout_ms=5_000))
    dead(sim, 6)
    sim.run_to(sim.now + 10 * TICK)
    rec = sim.ask(ListFailoversQuery())[-1]  # the first decision (the regions were failed over again since)
    assert rec.finished_at_millis and rec.final_state is MigrationState.UNSPECIFIED
    assert rec.result.endswith("timed out after 5000 ms")


def test_the_history_is_bounded_and_filtered_newest_first():
    sim = InsightSim(datanodes=10, policy=FailoverPolicy(failover_history_capacity=3),
                     guards=GuardSettings(max_failed_datanode_fraction=1.0, flap_backoff_base_ms=0))
    sim.run_to(START + 20 * TICK)
    for d in (2, 3, 4, 5):
        sim.alive.discard(d)
        n = len(sim.submissions())
        while len(sim.submissions()) == n:
            sim.step()
    recs = sim.ask(ListFailoversQuery())
    assert [r.datanode_id for r in recs] == [5, 4, 3]
    assert sum(isinstance(c, FailoverDrop) for c in sim.changes) == 1
    assert sim.registry.get_sample_value("supervisor_failover_history_records") == 3
    assert [r.datanode_id for r in sim.ask(ListFailoversQuery(datanode_ids=(4, 9)))] == [4]
    assert [r.datanode_id for r in sim.ask(ListFailoversQuery(region_ids=((3 << 32) | 1,)))] == [3]
    assert sim.ask(ListFailoversQuery(since_millis=recs[0].decided_at_millis)) == recs[:1]
    assert len(sim.ask(ListFailoversQuery(limit=2))) == 2


def test_records_go_through_the_codec_and_a_new_leader_restores_them():
    sim = InsightSim()
    dead(sim, 7)
    mirror, prefix = Mirror(), "/x/"
    enc = encode(sim.changes, mirror, prefix, 100)
    state = decode_state(enc.puts, prefix)
    assert state.failovers == sim.ask(ListFailoversQuery())
    # A new leader (another core) restores them and updates them as the migration ends.
    other = InsightSim()
    other.handle(BecomeLeader(2, StoredState(failovers=state.failovers)))
    assert other.ask(ListFailoversQuery()) == state.failovers
    other.sup.history.finished(state.failovers[0].failover_id, MigrationState.FAILED, other.now)
    assert other.ask(ListFailoversQuery())[0].final_state is MigrationState.FAILED
    # A dropped record is a deleted key.
    enc2 = encode([FailoverDrop(state.failovers[0].failover_id)], mirror, prefix, 100)
    assert enc2.deletes == {f"{prefix}failovers/{state.failovers[0].failover_id}"}


def test_the_record_codec_keeps_every_field_and_odd_values():
    sim = InsightSim()
    dead(sim, 8)
    rec = sim.ask(ListFailoversQuery())[0]
    assert failover_from_json(failover_to_json(rec)) == rec
    import dataclasses

    odd = dataclasses.replace(rec, evidence=(dataclasses.replace(rec.evidence[0], phi=math.inf),), checks=("ü\n\"",),
                              result="x" * 300, final_state=MigrationState.NOT_FOUND)
    back = failover_from_json(failover_to_json(odd))
    assert back == odd and math.isinf(back.evidence[0].phi)
    empty = dataclasses.replace(rec, evidence=())
    assert failover_from_json(failover_to_json(empty)) == empty


def test_an_unreadable_stored_record_is_left_out_and_a_lowered_capacity_drops_the_oldest(caplog):
    sim = InsightSim(guards=GuardSettings(max_failed_datanode_fraction=1.0, flap_backoff_base_ms=0))
    sim.run_to(START + 20 * TICK)
    for d in (2, 3, 4):
        sim.alive.discard(d)
        n = len(sim.submissions())
        while len(sim.submissions()) == n:
            sim.step()
    enc = encode(sim.changes, Mirror(), "/x/", 100)
    raw = dict(enc.puts)
    raw["/x/failovers/garbage"] = b"{not json"
    raw["/x/failovers/half"] = b'{"id": "half"}'
    state = decode_state(raw, "/x/")
    assert len(state.failovers) == 3 and sorted(state.failovers_unreadable) == ["garbage", "half"]
    other = InsightSim(policy=FailoverPolicy(failover_history_capacity=2))
    other.handle(BecomeLeader(2, state))
    kept = other.ask(ListFailoversQuery())
    assert [r.datanode_id for r in kept] == [4, 3]
    dropped = [c.failover_id for c in other.changes if isinstance(c, FailoverDrop)]
    assert dropped == [r.failover_id for r in state.failovers if r.datanode_id == 2]
    assert any(r.getMessage() == "failover_records_unreadable" for r in caplog.records)


def test_an_ambiguous_call_is_recorded_then_its_retry_answered_in_the_same_record():
    sim = InsightSim(policy=FailoverPolicy(submit_retry_backoff_ms=1000))
    sim.submit_error, sim.submit_error_kind = "DEADLINE_EXCEEDED: no answer within 5 s", "ambiguous"
    dead(sim, 2)
    rec = sim.ask(ListFailoversQuery())[0]
    assert rec.result == "call failed, retried: ambiguous: DEADLINE_EXCEEDED: no answer within 5 s"
    assert rec.finished_at_millis == 0
    sim.submit_error = None  # the remote answers again: the retry, same request_id
    sim.run_to(sim.now + 5 * TICK)
    recs = sim.ask(ListFailoversQuery())
    assert len(recs) == 1 and recs[0].failover_id == rec.failover_id and recs[0].result == "submitted: 2"
    assert len({t.request_id for _, t in sim.submissions()}) == 1 and len(sim.submissions()) >= 2
