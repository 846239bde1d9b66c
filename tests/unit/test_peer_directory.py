"""The peer directory as the heartbeats fill it: a repeated heartbeat (same address, same epoch:
the path taken without the lock) refreshes the times as any other does, and every change of
address or epoch, the epoch fence and a new life included, is taken as before."""

from __future__ import annotations

from supervisor_service.core import FakeClock, Peer
from supervisor_service.remotes import PeerDirectory

START = 1_700_000_000_000


def test_a_repeated_heartbeat_refreshes_last_seen_and_the_epoch_heard():
    clock = FakeClock(START)
    directory = PeerDirectory(clock, new_life_after_ms=1_000)
    directory.observe(1, "dn1:4001", 5)
    clock.advance(900)
    directory.observe(1, "dn1:4001", 5)  # the same again
    clock.advance(900)
    assert directory.alive(1_000) == [Peer(1, "dn1:4001")]  # seen 900 ms ago, not 1,800
    assert directory.epoch_silence(1, 4) == 900  # the epoch 5 heard 900 ms ago
    directory.observe(1, "", 0)  # no address, no epoch: the times of heartbeats, not of the epoch
    clock.advance(200)
    assert directory.alive(300) == [Peer(1, "dn1:4001")]
    assert directory.epoch_silence(1, 4) == 1_100
    assert directory.epoch_silence(1, 5) is None and directory.epoch_silence(1, 6) is None


def test_changes_of_address_and_epoch_are_taken():
    clock = FakeClock(START)
    directory = PeerDirectory(clock, new_life_after_ms=1_000)
    assert directory.epoch_silence(1, 3) is None  # unknown datanode
    directory.observe(1, "dn1:4001", 5)
    directory.observe(1, "dn1:4002", 5)
    assert directory.peer(1) == Peer(1, "dn1:4002")
    directory.observe(1, "", 7)
    assert (directory.peer(1), directory.epoch(1)) == (Peer(1, "dn1:4002"), 7)
    clock.advance(500)
    directory.observe(1, "dn1:4002", 6)  # lower, while 7 was heard 500 ms ago: not taken
    assert directory.epoch(1) == 7
    assert directory.epoch_silence(1, 6) == 500
    clock.advance(1_001)
    directory.observe(1, "dn1:4002", 2)  # 7 silent for longer than new_life_after_ms: a new life
    assert directory.epoch(1) == 2
    assert directory.epoch_silence(1, 2) is None
    clock.advance(10)
    assert directory.epoch_silence(1, 1) == 10
