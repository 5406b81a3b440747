"""Which worker counts keep a stage's global batch exact: the divisors behind the planner's
world sizes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from pretrain_operator.api import WorkerCounts
from pretrain_operator.api.spec import _divisors


@given(n=st.integers(1, 10**7))
def test_divisors_are_exactly_the_numbers_dividing_n(n: int) -> None:
    found = _divisors(n)
    assert found == sorted(found)
    assert all(n % d == 0 for d in found)
    if n <= 5000:
        assert found == [d for d in range(1, n + 1) if n % d == 0]


@given(
    low=st.integers(1, 40),
    span=st.integers(0, 40),
    usable=st.sets(st.integers(1, 80)),
)
def test_impossible_counts_are_the_complement_of_the_usable_ones(
    low: int, span: int, usable: set[int]
) -> None:
    high = low + span
    counts = WorkerCounts(low, high, tuple(sorted(u for u in usable if low <= u <= high)))
    listed: set[int] = set()
    for part in filter(None, counts.impossible().split(", ")):
        first, _, last = part.partition("-")
        listed |= set(range(int(first), int(last or first) + 1))
    assert listed == set(range(low, high + 1)) - set(counts.usable)
