"""Thousands of random and mutated specs: the validator returns a job or a list of problems
with field paths, and never raises anything else."""

from __future__ import annotations

import copy
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pretrain_operator.api import PretrainJob, parse_job
from pretrain_trainer.config import SpecError, format_path

from tests.conftest import EXAMPLES, load_yaml, minimal_job

SEEDS = [load_yaml(p) for p in EXAMPLES] + [minimal_job()]
ROOT_KEYS = {"apiVersion", "kind", "metadata", "spec"}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 1e308, "", "8", "1Gi", "fp16", "x" * 300]),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _containers(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    found = [(path, node)] if isinstance(node, dict | list) else []
    children = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, child in children:
        found += _containers(child, (*path, key))
    return found


@st.composite
def mutated_specs(draw: st.DrawFn) -> Any:
    doc = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        _, node = draw(st.sampled_from(_containers(doc)))
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        op = draw(st.sampled_from(["replace", "delete", "add", "nudge", "duplicate"]))
        if not keys or op == "add":
            if isinstance(node, dict):
                node[draw(st.text(max_size=10))] = draw(json_values)
            else:
                node.append(draw(json_values))
            continue
        key = draw(st.sampled_from(keys))
        if op == "replace":
            node[key] = draw(json_values)
        elif op == "delete":
            del node[key]
        elif op == "duplicate" and isinstance(node, list):
            node.append(copy.deepcopy(node[key]))
        elif isinstance(node[key], int | float) and not isinstance(node[key], bool):
            node[key] = node[key] * draw(st.sampled_from([-1, 0, 3, 7, 0.5, 1e9])) + draw(
                st.integers(-2, 2)
            )
        else:
            node[key] = draw(scalars)
    return doc


def _check(doc: Any) -> None:
    try:
        job = parse_job(doc)
    except SpecError as error:
        _check_problems(doc, error)
        return
    assert isinstance(job, PretrainJob)
    for stage in job.spec.stages:  # a valid job can always be run at some world size
        counts = job.spec.worker_counts(stage)
        assert counts.usable
        nproc = job.spec.nproc_per_worker
        fewest, most = counts.usable[0], counts.usable[-1]  # the counts its layout can split
        assert all(stage.split(w * nproc).most >= 1 for w in (fewest, most))
        assert math.isfinite(sum(stage.data_mix.values()))
    list(job.warnings())


def _check_problems(doc: Any, error: SpecError) -> None:
    assert error.problems
    for problem in error.problems:
        assert problem.message.strip()
        if isinstance(doc, dict):
            assert problem.path, problem
            assert problem.path[0] in ROOT_KEYS, problem
        assert format_path(problem.path)


FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))


def test_mutated_specs_yield_a_job_or_field_paths() -> None:
    seen: list[int] = []

    @FUZZ
    @given(doc=mutated_specs())
    def check(doc: Any) -> None:
        seen.append(1)
        _check(doc)

    check()
    assert len(seen) >= 1500


def test_random_documents_yield_a_job_or_field_paths() -> None:
    seen: list[int] = []
    documents = json_values | st.fixed_dictionaries(
        {"apiVersion": st.just("pretrain.dev/v1alpha1"), "kind": st.just("PretrainJob")},
        optional={"metadata": json_values, "spec": json_values, "status": json_values},
    )

    @settings(FUZZ, max_examples=1000)
    @given(doc=documents)
    def check(doc: Any) -> None:
        seen.append(1)
        _check(doc)

    check()
    assert len(seen) >= 1000
