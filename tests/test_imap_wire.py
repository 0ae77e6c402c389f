"""Unit tests of the IMAP front-end's message-set selection (pure functions, no server)."""
from __future__ import annotations

import random

import pytest

from undo_proxy.imap_wire import select_uids, sequence_number, set_ranges


def by_walk(order: list[int], spec: str, uid: bool) -> list[int]:
    """The obvious definition: every message of the mailbox tested against every range."""
    star = (order[-1] if order else 0) if uid else len(order)
    ranges = set_ranges(spec, star)
    return [u for n, u in enumerate(order, 1) if any(a <= (u if uid else n) <= b for a, b in ranges)]


@pytest.mark.parametrize("spec,uid,expected", [
    ("1", False, [3]),
    ("2:3", False, [5, 9]),
    ("3:2", False, [5, 9]),             # a range may be written backwards
    ("*", False, [20]),
    ("4:*", False, [10, 20]),
    ("1,1,2", False, [3, 5]),           # named twice: once
    ("9", True, [9]),
    ("6:9", True, [9]),                 # UIDs that do not exist are skipped
    ("11:*", True, [20]),
    ("21:*", True, [20]),               # '*' is the largest UID: 21:* is 20:21
    ("7", True, []),
    ("0", False, []),
    ("1:0", False, []),                 # 0 is no message number: the server answers BAD
    ("2,0:3", True, []),
    ("+1", False, []),
    ("1:-2", False, []),
    ("99", False, []),
    ("x:y", False, []),                 # unparsable: nothing
])
def test_select_uids_examples(spec: str, uid: bool, expected: list[int]) -> None:
    assert select_uids([3, 5, 9, 10, 20], spec, uid) == expected


def test_select_uids_matches_a_walk_over_the_mailbox() -> None:
    rng = random.Random(7)
    for _ in range(300):
        order = sorted(rng.sample(range(1, 400), rng.randint(0, 60)))
        parts = []
        for _ in range(rng.randint(1, 4)):
            a, b = rng.randint(1, 420), rng.choice([None, "*", rng.randint(1, 420)])
            parts.append(f"{a}" if b is None else f"{a}:{b}")
        spec, uid = ",".join(parts), rng.random() < 0.5
        assert select_uids(order, spec, uid) == by_walk(order, spec, uid), (order, spec, uid)


def test_sequence_number() -> None:
    order = [3, 5, 9]
    assert [sequence_number(order, u) for u in (3, 5, 9, 4, 1, 10)] == [1, 2, 3, None, None, None]
    assert sequence_number([], 1) is None


def test_a_set_that_repeats_the_whole_mailbox_costs_no_more_than_one_range() -> None:
    """`1:*,1:*,...` a hundred thousand times over a mailbox of 10,000: overlapping ranges are merged before
    they are expanded (expanded one by one, this is 10^9 steps and stalls every session of the daemon)."""
    order = list(range(1, 20_001, 2))
    spec = ",".join(["1:*"] * 100_000)
    calls = 0

    class Counting(list):
        def __getitem__(self, index):  # noqa: ANN001, ANN204
            nonlocal calls
            calls += 1
            return super().__getitem__(index)
    assert select_uids(Counting(order), spec, uid=False) == order
    assert select_uids(order, ",".join(["1:*"] * 1000), uid=True) == order
    assert calls < 1000, f"{calls} slices of the mailbox for one merged range"
