"""A job's pods as the operator's watch cache shows them, corrected for its own recent writes.

The cache (a kopf index fed by the pod watch) spares every reconcile a LIST of the job's pods,
which for a 1,024-worker job is most of the cost. But it trails the API server: a pod created a
moment ago may not be in it yet, and one just deleted may still be. Read as it is, a new
group's pods would look lost and a deleted standby would look alive. :class:`Expectations`
remembers this operator's own pod creates and deletes until the cache shows them, or for
``ttl`` seconds, after which the cache is believed (a watch that lost an event heals by
relisting), much like controller-runtime's expectations. Pure: no kopf, no API calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

DELETING = "1970-01-01T00:00:00Z"  # stands in for a deletionTimestamp the cache has not seen


def _uid(pod: Mapping[str, Any]) -> str:
    return str(pod["metadata"].get("uid") or "")


@dataclass
class Expectations:
    ttl: float = 30.0
    created: dict[str, tuple[float, Mapping[str, Any]]] = field(default_factory=dict)  # by uid
    deleted: dict[str, float] = field(default_factory=dict)  # by uid

    def record(
        self,
        *,
        created: Iterable[Mapping[str, Any]],
        deleted: Iterable[Mapping[str, Any]],
        now: float,
    ) -> None:
        for pod in created:
            self.created[_uid(pod)] = (now, pod)
        for pod in deleted:
            self.deleted[_uid(pod)] = now
            self.created.pop(_uid(pod), None)

    def correct(
        self, cached: Iterable[Mapping[str, Any]], *, now: float
    ) -> list[Mapping[str, Any]]:
        """The cached pods, plus those created and not yet seen, with those deleted and still
        seen marked as being deleted."""
        pods: list[Mapping[str, Any]] = []
        seen = set()
        for pod in cached:
            uid = _uid(pod)
            seen.add(uid)
            self.created.pop(uid, None)  # the cache caught up with the create
            since = self.deleted.get(uid)
            if since is not None and now - since <= self.ttl:
                if not pod["metadata"].get("deletionTimestamp"):
                    pod = {**pod, "metadata": {**pod["metadata"], "deletionTimestamp": DELETING}}
            elif since is not None:
                del self.deleted[uid]  # still there after the ttl: believe the cache
            pods.append(pod)
        for uid in [u for u in self.deleted if u not in seen]:
            del self.deleted[uid]  # gone from the cache too: nothing left to expect
        names = {p["metadata"]["name"] for p in pods}
        for uid, (since, pod) in list(self.created.items()):
            if now - since > self.ttl:
                del self.created[uid]
            elif pod["metadata"]["name"] not in names:
                pods.append(pod)
        return pods
