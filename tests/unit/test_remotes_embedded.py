"""The embedded remotes, without threads: the dry-run journal's fencing of older leader terms."""

from __future__ import annotations

import pytest

from supervisor_service.core import FakeClock, MigrationTask, Peer
from supervisor_service.remotes import DryRunJournal, StaleLeaderTerm


def test_dry_run_journal_fences_a_lower_term():
    journal = DryRunJournal(FakeClock())
    task = MigrationTask(1, 1, Peer(1), Peer(2), (10,), 120_000, leader_term=5)
    journal.submit(task)
    with pytest.raises(StaleLeaderTerm):
        journal.submit(MigrationTask(2, 1, Peer(1), Peer(2), (11,), 120_000, leader_term=4))
    journal.restore([], highest_term=9)
    with pytest.raises(StaleLeaderTerm):
        journal.submit(task)
