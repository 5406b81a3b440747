"""The states of a job's worker agents, read from their pods (``GET /`` on each slot pod's
agent port), all at once: a pass waits for the slowest answer, never for their sum. An agent
that does not answer within the client's timeout reads as None (still starting, or stuck: its
liveness probe has the last word). :class:`AgentCache` keeps them between passes."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pretrain_trainer.agent_client import AgentClient, AgentError
from pretrain_trainer.contract import AgentState

from .actions import agent_address
from .objects import ROLE, WORKER, PodPhase

AgentReader = Callable[[Sequence[Mapping[str, Any]]], Mapping[str, AgentState | None]]
"""Reads the agents of a job's slot pods: pod name -> state (None: did not answer)."""
READS_IN_FLIGHT = 16


def _state(client: AgentClient) -> AgentState | None:
    try:
        return client.state()
    except AgentError:
        return None


def _answers(pod: Mapping[str, Any]) -> bool:
    """A running slot pod with an address: one whose agent may answer."""
    role = pod["metadata"].get("labels", {}).get(ROLE)
    running = PodPhase.of(pod) == PodPhase.RUNNING
    return role == WORKER and running and agent_address(pod) is not None


def read_agents(
    pods: Sequence[Mapping[str, Any]],
    *,
    connect: Callable[[str], AgentClient] = AgentClient,
) -> dict[str, AgentState | None]:
    """The state of every running slot pod's agent."""
    targets = {
        pod["metadata"]["name"]: connect(str(agent_address(pod))) for pod in pods if _answers(pod)
    }
    if not targets:
        return {}
    with ThreadPoolExecutor(max_workers=min(READS_IN_FLIGHT, len(targets))) as pool:
        states = pool.map(_state, targets.values())
        return dict(zip(targets, states, strict=True))


class AgentCache:
    """A job's agents' states between passes: a pass reads again only the agents whose pod
    changed since (an attempt's end turns the pod not ready, and an order relabels it), those
    that did not answer last time, and every agent once ``refresh_seconds`` have passed. So a
    steady pass of a 1,024-worker job reads no agent at all."""

    def __init__(
        self,
        *,
        refresh_seconds: float,
        connect: Callable[[str], AgentClient] = AgentClient,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.refresh_seconds, self.connect, self.clock = refresh_seconds, connect, clock
        self.seen: dict[str, tuple[tuple[str, str], AgentState | None]] = {}
        self.refreshed = -float("inf")
        self.reads = 0  # agents read so far (what a pass cost)

    def __call__(self, pods: Sequence[Mapping[str, Any]]) -> dict[str, AgentState | None]:
        now = self.clock()
        full = now - self.refreshed >= self.refresh_seconds
        current = {p["metadata"]["name"]: p for p in pods if _answers(p)}
        stale = [
            pod
            for name, pod in current.items()
            if full
            or name not in self.seen
            or self.seen[name][0] != _version(pod)
            or self.seen[name][1] is None
        ]
        fresh = read_agents(stale, connect=self.connect) if stale else {}
        self.reads += len(stale)
        if full:
            self.refreshed = now
        self.seen = {
            name: (_version(pod), fresh[name] if name in fresh else self.seen[name][1])
            for name, pod in current.items()
        }
        return {name: state for name, (_, state) in self.seen.items()}


def _version(pod: Mapping[str, Any]) -> tuple[str, str]:
    meta = pod["metadata"]
    return str(meta.get("uid", "")), str(meta.get("resourceVersion", ""))
