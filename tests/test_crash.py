"""Crash-only, the fast version of bench/crash_harness.py (which does 20+ kills and writes
docs/reliability.md): the daemon is kill -9ed under mixed PUT/GET/DELETE load a few times (once in the middle
of a snapshot) and once during a replay. After every restart each acknowledged request is committed in the
timeline, nothing stays pending, the database passes its integrity check and WsgiDAV's files are what the
committed verbs say; the interrupted replay is cancelled and the pre-rewind state is back byte for byte."""
from __future__ import annotations

import os
import shutil

from bench.crash_harness import run


def test_kill_9_under_load_and_during_a_replay_loses_nothing(tmp_path):
    btrfs = os.geteuid() == 0 and shutil.which("btrfs") is not None
    figures = run(kills=4, snapshot_kills=1, rewind_kills=0, cancel_kills=0, replay_kills=1, budget=100,
                  use_btrfs=btrfs, smtp=False, workdir=tmp_path, http_clients=3)
    assert figures.lost == 0, figures.problems
    assert figures.kills >= 4, figures          # fewer only when the time budget ran out on a slow machine
    assert figures.kills_replay == 1 and figures.cycles_cancelled == 1
    assert figures.http_ok > 50, figures
