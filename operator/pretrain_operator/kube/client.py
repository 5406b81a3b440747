"""Every call the operator makes to the API server, and its error taxonomy, in one place.

Objects travel as plain dicts (JSON in, JSON out): the generated models of the ``kubernetes``
client cost more to build for 1,000 pods than the request itself. Errors become
:class:`TemporaryApiError` (retry later: 5xx, 429, a write that raced another, connection
trouble) or :class:`PermanentApiError` (the request itself is wrong: 4xx), with the cases the
operator branches on typed: :class:`NotFoundError`, :class:`ForbiddenError` and
:class:`ConflictError`. Callers catch types, never status codes. "Already exists" on create and
"not found" on delete are success, which is what makes applying a plan idempotent.
"""

from __future__ import annotations

import contextlib
import json
import threading
import urllib.parse
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import kubernetes

from .. import __version__
from ..api import GROUP, PLURAL, VERSION


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class TemporaryApiError(ApiError):
    """Worth retrying: the server is busy or briefly unreachable, or a write raced another."""


class PermanentApiError(ApiError):
    """Retrying the same request cannot succeed."""


class NotFoundError(PermanentApiError):
    """404: the object (or its namespace) does not exist."""


class ForbiddenError(PermanentApiError):
    """401 or 403: the operator may not make this request (a namespaced install, say)."""


class ConflictError(TemporaryApiError):
    """409: the object already exists, or the write raced another one."""


def _error_for(status: int) -> type[ApiError]:
    if status == 404:
        return NotFoundError
    if status in (401, 403):
        return ForbiddenError
    if status == 409:
        return ConflictError
    if status >= 500 or status == 429:
        return TemporaryApiError
    return PermanentApiError


_CORE = {
    "Pod": "pods",
    "Service": "services",
    "ConfigMap": "configmaps",
    "ServiceAccount": "serviceaccounts",
    "Event": "events",
}


def _path(obj: Mapping[str, Any], namespace: str) -> str:
    kind = obj["kind"]
    if kind == "PodGroup":  # Volcano's or the coscheduling plugin's: the apiVersion says which
        return f"/apis/{obj['apiVersion']}/namespaces/{namespace}/podgroups"
    return f"/api/v1/namespaces/{namespace}/{_CORE[kind]}"


class KubeClient:
    """Thin, synchronous, JSON-only access through a ``kubernetes.client.ApiClient``."""

    def __init__(
        self, api_client: kubernetes.client.ApiClient, *, field_manager: str = "pretrain-operator"
    ) -> None:
        self.api = api_client
        self.api.user_agent = f"{field_manager}/{__version__}"  # how audit logs tell us apart
        self.field_manager = field_manager
        self.requests: Counter[str] = Counter()  # by verb, for benchmarks and metrics
        self._counting = threading.Lock()  # a pass sends some requests at once

    # -- transport ---------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: object = None,
        content_type: str = "application/json",
        verb: str | None = None,
    ) -> Any:
        with self._counting:
            self.requests[verb or method.lower()] += 1
        if query:
            path = f"{path}?{urllib.parse.urlencode(query)}"
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            method_, url, headers_, body_, _ = self.api.param_serialize(
                method=method,
                resource_path=path,
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
            )
            response = self.api.call_api(method_, url, header_params=headers_, body=body_)
            data = response.read()  # type: ignore[no-untyped-call]  # the client leaves it untyped
        except Exception as error:  # urllib3 and socket errors: the server is unreachable
            if isinstance(error, ApiError):
                raise
            raise TemporaryApiError(0, f"{method} {path}: {error}") from error
        if 200 <= response.status < 300:
            return json.loads(data) if data else None
        try:
            message = json.loads(data).get("message", "")
        except (ValueError, AttributeError):
            message = (data or b"").decode(errors="replace")[:200]
        raise _error_for(response.status)(response.status, f"{method} {path}: {message}")

    # -- reads -------------------------------------------------------------------------------
    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}"
        try:
            job: dict[str, Any] = self.request("GET", path)
        except NotFoundError:
            return None
        return job

    def list_pods(self, namespace: str, *, selector: str) -> list[dict[str, Any]]:
        path = f"/api/v1/namespaces/{namespace}/pods"
        listed = self.request("GET", path, query={"labelSelector": selector}, verb="list")
        return list(listed.get("items") or [])

    def list_nodes(self) -> list[dict[str, Any]] | None:
        """All nodes, or None where the operator may not read them (namespaced installs)."""
        try:
            listed = self.request("GET", "/api/v1/nodes", verb="list")
        except ForbiddenError:
            return None
        return list(listed.get("items") or [])

    # -- writes ------------------------------------------------------------------------------
    def create(self, obj: Mapping[str, Any], *, namespace: str) -> dict[str, Any] | None:
        """Create ``obj`` and return it as stored; None when it already exists (someone,
        maybe us, was first)."""
        try:
            created: dict[str, Any] = self.request(
                "POST", _path(obj, namespace), body=obj, verb="create"
            )
        except ConflictError:
            return None
        return created

    def replace_or_create(self, obj: Mapping[str, Any], *, namespace: str) -> None:
        """Make a (small, whole) object read as ``obj``: a merge patch, or a create."""
        path = f"{_path(obj, namespace)}/{obj['metadata']['name']}"
        try:
            self.request("PATCH", path, body=obj, content_type="application/merge-patch+json")
        except NotFoundError:
            self.create(obj, namespace=namespace)

    def patch_pod_metadata(
        self,
        name: str,
        *,
        namespace: str,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        """Set some of a pod's labels and annotations; a pod already gone is fine."""
        path = f"/api/v1/namespaces/{namespace}/pods/{name}"
        metadata: dict[str, Any] = {}
        if labels:
            metadata["labels"] = dict(labels)
        if annotations:
            metadata["annotations"] = dict(annotations)
        with contextlib.suppress(NotFoundError):
            self.request(
                "PATCH",
                path,
                body={"metadata": metadata},
                content_type="application/merge-patch+json",
            )

    def delete(
        self,
        kind: str,
        name: str,
        *,
        namespace: str,
        api_version: str = "v1",
        grace_seconds: int | None = None,
        uid: str | None = None,
    ) -> bool:
        """Delete (only the object with ``uid``, when given); False when it was already gone
        (or replaced by another of the same name)."""
        path = f"{_path({'kind': kind, 'apiVersion': api_version}, namespace)}/{name}"
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        if uid is not None:
            body["preconditions"] = {"uid": uid}
        try:
            self.request("DELETE", path, body=body)
        except NotFoundError:
            return False
        except ConflictError:
            if uid is None:
                raise
            return False  # the uid precondition failed: the one we meant is gone
        return True

    def patch_job_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"
        self.request(
            "PATCH", path, body={"status": status}, content_type="application/merge-patch+json"
        )

    def event(
        self,
        job: Mapping[str, Any],
        *,
        reason: str,
        message: str,
        warning: bool = False,
    ) -> None:
        """A core/v1 Event on the job, as ``kubectl describe`` shows them."""
        meta = job["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": job.get("apiVersion"),
                "kind": job.get("kind"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": self.field_manager},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self.request("POST", _path(event, meta["namespace"]), body=event, verb="create")
