"""The worker agent's HTTP client (:mod:`.agent`): what the local backend and the operator
use to instruct an agent. Standard library only; it never imports torch.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from . import contract

TIMEOUT = 2.0  # seconds for one request: the agent answers from memory


class AgentError(Exception):
    """The agent did not answer, or not with an AgentState (still starting, or gone)."""


class AgentClient:
    """An agent at ``host:port``."""

    def __init__(self, address: str, *, timeout: float = TIMEOUT) -> None:
        self.address, self.timeout = address, timeout

    def _call(self, method: str, path: str, body: object = None) -> contract.AgentState:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://{self.address}{path}", data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                state = contract.AgentState.parse(response.read())
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise AgentError(f"agent at {self.address}: {error}") from None
        if state is None:
            raise AgentError(f"agent at {self.address}: its answer is not an AgentState")
        return state

    def state(self) -> contract.AgentState:
        return self._call("GET", "/")

    def run(self, order: contract.AttemptOrder) -> contract.AgentState:
        """Start ``order`` (the same order again is a no-op)."""
        return self._call("PUT", "/attempt", order.model_dump(mode="json", by_alias=True))

    def stop(self, attempt: int, *, grace: float) -> contract.AgentState:
        """SIGTERM ``attempt``'s processes, SIGKILL after ``grace`` seconds."""
        return self._call("POST", "/stop", {"attempt": attempt, "graceSeconds": grace})
