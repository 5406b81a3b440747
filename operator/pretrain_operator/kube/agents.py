"""The states of a job's worker agents, read from their pods (``GET /`` on each slot pod's
agent port), all at once: a pass waits for the slowest answer, never for their sum. An agent
that does not answer within the client's timeout reads as None (still starting, or stuck: its
liveness probe has the last word)."""

from __future__ import annotations

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


def read_agents(
    pods: Sequence[Mapping[str, Any]],
    *,
    connect: Callable[[str], AgentClient] = AgentClient,
) -> dict[str, AgentState | None]:
    """The state of every running slot pod's agent."""
    targets = {}
    for pod in pods:
        address = agent_address(pod)
        role = pod["metadata"].get("labels", {}).get(ROLE)
        if role == WORKER and address is not None and PodPhase.of(pod) == PodPhase.RUNNING:
            targets[pod["metadata"]["name"]] = connect(address)
    if not targets:
        return {}
    with ThreadPoolExecutor(max_workers=min(READS_IN_FLIGHT, len(targets))) as pool:
        states = pool.map(_state, targets.values())
        return dict(zip(targets, states, strict=True))
