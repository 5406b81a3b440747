"""The request handler behind ``ApiServer``: KMock's scaffold and object store with the API
server's semantics (see ``apiserver.py`` for the gaps of KMock 0.8 that it fills)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import json
import math
import secrets
import string
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml
from kmock import Response  # type: ignore[attr-defined]  # exported, not in __all__

from tests.support.kube import patches, selectors

Body = dict[str, Any]
Key = tuple[kmock.resource, str | None, str]  # (resource, namespace, name), as in kmock.objects

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
CRDS = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
NAMESPACES = kmock.resource("", "v1", "namespaces")
PEERINGS = {
    "clusterkopfpeerings": ("ClusterKopfPeering", False),
    "kopfpeerings": ("KopfPeering", True),
}
STATUS_SUBRESOURCE = "status"


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _api_version(resource: kmock.resource) -> str:
    return f"{resource.group}/{resource.version}" if resource.group else str(resource.version)


def _failure(code: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=code, reason=reason, message=message, details=details)


def _status(code: int, reason: str, message: str, details: Any = None) -> Body:
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Success" if code < 400 else "Failure",
        "code": code,
        "reason": reason,
        "message": message,
        "details": details or {},
    }


def _without(body: Mapping[str, Any], *keys: str) -> Body:
    return {key: value for key, value in body.items() if key not in keys}


@attrs.frozen
class Event:
    """One write, as watchers see it; ``old`` is the state before, for selector transitions."""

    resource_version: int
    type: str
    resource: kmock.resource
    namespace: str | None
    old: Body | None
    new: Body


@attrs.frozen
class RequestPath:
    """A request path, parsed (KMock's parser breaks on ``/api/v1/namespaces[/name]``)."""

    resource: kmock.resource | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None

    @classmethod
    def parse(cls, path: str) -> RequestPath:
        parts = path.strip("/").split("/")
        version: str | None
        if parts[0] == "api" and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 2:
            group, version, rest = parts[1], (parts[2] if len(parts) > 2 else None), parts[3:]
        else:
            return cls()
        namespace = None
        is_namespace_itself = len(rest) <= 2 or (group == "" and rest[2] in {"status", "finalize"})
        if len(rest) >= 2 and rest[0] == "namespaces" and not is_namespace_itself:
            namespace, rest = rest[1], rest[2:]
        return cls(
            resource=kmock.resource(group=group, version=version, plural=rest[0] if rest else None),
            namespace=namespace,
            name=rest[1] if len(rest) > 1 else None,
            subresource="/".join(rest[2:]) or None,
        )


async def _parse_request(raw: aiohttp.web.BaseRequest, *, id: int) -> kmock.Request:
    body = await raw.read()
    text = body.decode("utf-8", errors="replace")
    data: Any = None
    if body:
        try:
            data = json.loads(text)
        except ValueError:
            data = yaml.safe_load(text)  # server-side apply sends YAML
    path = RequestPath.parse(raw.path)
    return kmock.Request(
        id=id,
        raw_request=raw,
        url=raw.url,
        method=raw.method,
        params=dict(raw.query),
        headers=dict(raw.headers),
        cookies=dict(raw.cookies),
        body=body,
        text=text,
        data=data,
        resource=path.resource,
        namespace=path.namespace,
        name=path.name,
        subresource=path.subresource,
    )


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesScaffold):
    """The request handler: KMock's scaffold and store, with the API server's semantics."""

    history_limit: int = 10_000  # watch events kept; older resourceVersions get 410 Gone
    objects: kmock.ObjectsArray = attrs.field(factory=kmock.ObjectsArray)
    requests: collections.Counter[str] = attrs.field(factory=collections.Counter)
    # (user agent's product, API group, resource[/subresource], verb): what RBAC must grant.
    requests_by_agent: collections.Counter[tuple[str, str, str, str]] = attrs.field(
        factory=collections.Counter
    )
    requests_by_resource: collections.Counter[tuple[str, str]] = attrs.field(
        factory=collections.Counter
    )
    _resource_version: int = 0
    _live: dict[kmock.resource, dict[tuple[str | None, str], Body]] = attrs.field(
        factory=lambda: collections.defaultdict(dict)
    )
    _uids: dict[str, Key] = attrs.field(factory=dict)
    _dependents: dict[str, set[Key]] = attrs.field(factory=lambda: collections.defaultdict(set))
    _events: list[Event] = attrs.field(factory=list)
    _wakeup: asyncio.Event = attrs.field(factory=asyncio.Event)
    _closing: bool = False

    def __attrs_post_init__(self) -> None:
        # Not the scaffold's: its regex fallbacks would shadow the resource URLs.
        with warnings.catch_warnings():  # kmock reads its bundle with a deprecated call
            warnings.simplefilter("ignore", DeprecationWarning)
            self.resources.load_bundled()
        for plural, (kind, namespaced) in PEERINGS.items():
            self.resources[kmock.resource("kopf.dev", "v1", plural)] = kmock.ResourceInfo(
                namespaced=namespaced, kind=kind, singular=kind.lower(), verbs=ALL_VERBS
            )
        self.fallback << self._serve

    # --- the request path ------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        request = await _parse_request(raw_request, id=len(self._requests))
        self._requests.append(request)  # KMock's request log, for its assertion DSL
        try:
            return await self._handle(request)
        except Exception as exc:  # a bug in this layer: record it, answer 500
            if self._errors:
                self._errors[-1].append(exc)
            return await self._render_error(exc)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if any(reaction.priorities[:1] != (-math.inf,) for reaction in self._payloads):
            return await super()._handle(request)  # the test's own reactions come first
        return await Response(payload=self._serve)(request)

    async def _serve(self, request: kmock.Request) -> Response:
        try:
            if request.resource is None or request.resource.plural is None:
                self.requests["discovery"] += 1
                return Response(payload=await self._discover(request))
            return self._serve_resource(request)
        except kmock.KubernetesError as exc:
            body = _status(exc.status, exc.reason or "", exc.message or "", exc.details)
            return Response(status=exc.status, payload=body)

    async def _discover(self, request: kmock.Request) -> Any:
        path, resource = request.url.path.rstrip("/"), request.resource
        if path == "/api":
            address = f"{request.url.host}:{request.url.port}"
            cidrs = [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}]
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": cidrs}
        if path == "/openapi/v3":  # no schemas: kubectl then validates nothing client-side
            return {"paths": {}}
        if path in {"", "/version", "/apis"}:
            serve = {"": self._serve_root, "/version": self._serve_server_version}
            return await serve.get(path, self._serve_apis)(request)
        if resource is not None and resource.version is None:
            return await self._serve_group(request)
        if resource is not None:
            return await self._serve_version(request)
        raise _failure(404, "NotFound", "the server could not find the requested resource")

    async def _serve_version(self, request: kmock.Request) -> Any:
        # The scaffold copies names, short names and all verbs into the subresource entries,
        # which makes kubectl's "pod" and "ptj" ambiguous; a real server leaves them out.
        wanted = request.resource
        assert wanted is not None  # a discovery request; for type checkers
        found = [
            r for r in self.resources if r.group == wanted.group and r.version == wanted.version
        ]
        if not found:
            raise _failure(404, "NotFound", "the server could not find the requested resource")
        entries = []
        for resource in sorted(found, key=lambda r: str(r.plural)):
            info = self.resources[resource]
            entries.append(
                {
                    "name": resource.plural,
                    "singularName": info.singular or "",
                    "namespaced": bool(info.namespaced),
                    "kind": info.kind,
                    "verbs": sorted(info.verbs),
                    "shortNames": sorted(info.shortnames),
                    "categories": sorted(info.categories),
                }
            )
            for sub in sorted(info.subresources):
                entries.append(
                    {
                        "name": f"{resource.plural}/{sub}",
                        "singularName": "",
                        "namespaced": bool(info.namespaced),
                        "kind": info.kind,
                        "verbs": ["get", "patch", "update"],
                    }
                )
        return {
            "apiVersion": "v1",
            "kind": "APIResourceList",
            "groupVersion": _api_version(wanted),
            "resources": entries,
        }

    def _serve_resource(self, request: kmock.Request) -> Response:
        resource, namespace, name = request.resource, request.namespace, request.name
        if resource is None or resource not in self.resources:
            raise _failure(404, "NotFound", "the server could not find the requested resource")
        watching = request.params.get("watch") in {"true", "1"}
        verb = {
            ("GET", False): "watch" if watching else "list",
            ("GET", True): "watch" if watching else "get",
            ("POST", False): "create",
            ("PUT", True): "update",
            ("PATCH", True): "patch",
            ("DELETE", True): "delete",
            ("DELETE", False): "deletecollection",
        }.get((request.method.value, name is not None))
        if verb is None:
            raise _failure(405, "MethodNotAllowed", f"{request.method} is not supported here")
        self.requests[verb] += 1
        plural = str(resource.plural)
        kind = f"{plural}/{request.subresource}" if request.subresource else plural
        self.requests_by_resource[verb, kind] += 1
        agent = request.headers.get("User-Agent", "").split("/")[0]
        self.requests_by_agent[agent, str(resource.group or ""), kind, verb] += 1
        if request.subresource not in {None, STATUS_SUBRESOURCE} or (
            request.subresource and not self._has_status(resource)
        ):
            raise _failure(404, "NotFound", "the server could not find the requested resource")
        data = request.data if isinstance(request.data, dict | list) else {}
        if verb == "watch":
            headers = {"Content-Type": "application/json"}
            return Response(headers=headers, payload=self._watch(request))
        if verb == "list":
            return Response(payload=self._list(request))
        if verb == "deletecollection":
            for key in [self._key(resource, obj) for obj in self._select(request)]:
                self._delete(key, {})
            return Response(payload=_status(200, "", "", None))
        if verb == "create":
            return Response(status=201, payload=self._create(resource, namespace, data))
        key = (resource, namespace, str(name))
        if verb == "get":
            return Response(payload=self._get(key))
        if verb == "delete":
            return Response(payload=self._delete(key, data))
        content_type = request.headers.get("Content-Type", "").split(";")[0]
        server_side_apply = content_type == "application/apply-patch+yaml"
        if server_side_apply and self._find(key) is None and isinstance(data, dict):
            created = {**data, "metadata": {**data.get("metadata", {}), "name": name}}
            return Response(status=201, payload=self._create(resource, namespace, created))
        old = self._get(key)
        new = data if verb == "update" else self._patched(old, data, content_type)
        expected = (
            (data if isinstance(data, dict) else {}).get("metadata", {}).get("resourceVersion")
        )
        if expected and expected != old["metadata"]["resourceVersion"]:
            message = (
                "the object has been modified; please apply your changes to the latest version"
            )
            raise _failure(409, "Conflict", f"{self._describe(key)}: {message}")
        return Response(payload=self._update(key, old, new, request.subresource))

    @staticmethod
    def _patched(old: Body, patch: Any, content_type: str) -> Body:
        apply: dict[str, Callable[[Any, Any], Any]] = {
            "application/json-patch+json": patches.json_patch,
            "application/merge-patch+json": patches.merge_patch,
            "application/strategic-merge-patch+json": patches.strategic_merge_patch,
            "application/apply-patch+yaml": patches.merge_patch,
        }
        if content_type not in apply:
            raise _failure(415, "UnsupportedMediaType", f"unsupported patch type {content_type!r}")
        try:
            result = apply[content_type](old, patch)
        except patches.PatchError as exc:
            raise _failure(422, "Invalid", f"the patch does not apply: {exc}") from exc
        if not isinstance(result, dict):
            raise _failure(422, "Invalid", "the patch does not produce an object")
        return result

    # --- reads -------------------------------------------------------------------------------

    def _key(self, resource: kmock.resource, body: Mapping[str, Any]) -> Key:
        meta = body.get("metadata", {})
        return resource, meta.get("namespace"), meta["name"]

    def _find(self, key: Key) -> Body | None:
        resource, namespace, name = key
        return self._live[resource].get((namespace, name))

    def _get(self, key: Key) -> Body:
        found = self._find(key)
        if found is None:
            details = {"name": key[2], "group": key[0].group, "kind": key[0].plural}
            raise _failure(404, "NotFound", f"{self._describe(key)} not found", **details)
        return found

    def _describe(self, key: Key) -> str:
        resource, _, name = key
        qualified = f"{resource.plural}.{resource.group}" if resource.group else resource.plural
        return f'{qualified} "{name}"'

    def _has_status(self, resource: kmock.resource) -> bool:
        return STATUS_SUBRESOURCE in self.resources[resource].subresources

    def _matcher(self, request: kmock.Request) -> Callable[[Event | Body], Body | None]:
        """A filter for objects and events by the request's namespace, name and selectors."""
        try:
            labels = selectors.label_selector(request.params.get("labelSelector"))
            fields = selectors.field_selector(request.params.get("fieldSelector"))
        except selectors.SelectorError as exc:
            raise _failure(400, "BadRequest", str(exc)) from exc
        namespace, name = request.namespace, request.name

        def matches(body: Body) -> bool:
            meta = body.get("metadata", {})
            return (
                (namespace is None or meta.get("namespace") == namespace)
                and (name is None or meta.get("name") == name)
                and labels(body)
                and fields(body)
            )

        def check(item: Event | Body) -> Body | None:
            if not isinstance(item, Event):
                return item if matches(item) else None
            if item.resource != request.resource:
                return None
            was = item.old is not None and matches(item.old)
            now = matches(item.new)
            if item.type == "DELETED" or (was and not now):
                return {"type": "DELETED", "object": item.new} if was else None
            if now:
                return {"type": "MODIFIED" if was else "ADDED", "object": item.new}
            return None

        return check

    def _select(self, request: kmock.Request) -> list[Body]:
        check = self._matcher(request)
        bodies = self._live[request.resource].values() if request.resource else []
        found = [body for body in bodies if check(body) is not None]
        return sorted(
            found, key=lambda b: (b["metadata"].get("namespace") or "", b["metadata"]["name"])
        )

    def _list(self, request: kmock.Request) -> Body:
        resource = request.resource
        assert resource is not None  # checked by the caller; for type checkers
        items = self._select(request)
        start = int(request.params.get("continue") or 0)
        limit = int(request.params.get("limit") or 0) or len(items)
        meta: Body = {"resourceVersion": str(self._resource_version)}
        if start + limit < len(items):
            meta["continue"] = str(start + limit)
            meta["remainingItemCount"] = len(items) - start - limit
        return {
            "apiVersion": _api_version(resource),
            "kind": f"{self.resources[resource].kind}List",
            "metadata": meta,
            "items": items[start : start + limit],
        }

    async def _watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        yield b""  # send the headers now, even if no event ever comes
        check = self._matcher(request)
        timeout = request.params.get("timeoutSeconds")
        deadline = asyncio.get_running_loop().time() + float(timeout) if timeout else math.inf
        since = int(request.params.get("resourceVersion") or 0)
        if since == 0:  # "any version": the current state first, as ADDED events
            for body in self._select(request):
                yield {"type": "ADDED", "object": body}
            since = self._resource_version
        while not self._closing:
            first = self._events[0].resource_version if self._events else since + 1
            if since + 1 < first:
                reason = f"too old resource version: {since} ({first - 1})"
                yield {"type": "ERROR", "object": _status(410, "Expired", reason)}
                return
            for event in self._events[since + 1 - first :]:
                since = event.resource_version
                if (message := check(event)) is not None:
                    yield message
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):  # wake up now and then to see the deadline
                await asyncio.wait_for(self._wakeup.wait(), timeout=min(remaining, 1.0))

    # --- writes (synchronous: nothing else runs on the loop in between) --------------------

    def _commit(self, key: Key, event_type: str, old: Body | None, new: Body) -> Body:
        """Store a new state under a new resourceVersion and tell the watchers."""
        resource, namespace, name = key
        self._resource_version += 1
        new = {
            **new,
            "metadata": {**new["metadata"], "resourceVersion": str(self._resource_version)},
        }
        if old is not None:
            self._unindex_owners(key, old)
        if event_type == "DELETED":
            del self._live[resource][namespace, name]
            del self._uids[new["metadata"]["uid"]]
            self.objects[key].delete()  # soft: KMock keeps the history for assertions
            asyncio.get_running_loop().call_soon(self._collect_garbage, new["metadata"]["uid"])
        else:
            self._live[resource][namespace, name] = new
            self._uids[new["metadata"]["uid"]] = key
            for ref in new["metadata"].get("ownerReferences") or []:
                self._dependents[ref["uid"]].add(key)
            if key not in self.objects:
                self.objects[key] = new
            else:
                self.objects[key].history.append(new)
        self._events.append(
            Event(self._resource_version, event_type, resource, namespace, old, new)
        )
        if len(self._events) > 2 * self.history_limit:
            del self._events[: -self.history_limit]
        self._wakeup.set()
        self._wakeup = asyncio.Event()
        if event_type == "DELETED":
            self._forget(resource, new)  # after this event: the log stays in version order
        elif resource == CRDS:
            self._register_crd(new)
        return new

    def _unindex_owners(self, key: Key, body: Body) -> None:
        for ref in body["metadata"].get("ownerReferences") or []:
            self._dependents.get(ref["uid"], set()).discard(key)

    def _create(self, resource: kmock.resource, namespace: str | None, body: Any) -> Body:
        if not isinstance(body, dict):
            raise _failure(400, "BadRequest", "the body must be an object")
        info = self.resources[resource]
        meta = dict(body.get("metadata") or {})
        if info.namespaced:
            namespace = namespace or meta.get("namespace")
            if meta.get("namespace", namespace) != namespace:
                raise _failure(400, "BadRequest", "the namespace of the object does not match")
            if not namespace:
                raise _failure(400, "BadRequest", "a namespace is required")
            if self._find((NAMESPACES, None, namespace)) is None:
                raise _failure(404, "NotFound", f'namespaces "{namespace}" not found')
            meta["namespace"] = namespace
        else:
            namespace = None
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            alphabet = string.ascii_lowercase + string.digits
            meta["name"] = meta["generateName"] + "".join(
                secrets.choice(alphabet) for _ in range(5)
            )
        if not meta.get("name"):
            raise _failure(422, "Invalid", "metadata.name: Required value: name or generateName")
        key = (resource, namespace, meta["name"])
        if self._find(key) is not None:
            message = f"{self._describe(key)} already exists"
            raise _failure(409, "AlreadyExists", message, name=meta["name"], kind=resource.plural)
        for server_owned in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion"):
            meta.pop(server_owned, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        new = {"apiVersion": _api_version(resource), "kind": info.kind, **body, "metadata": meta}
        if self._has_status(resource):
            new = _without(new, "status")
        new |= self._initial_status(resource, new)
        return self._commit(key, "ADDED", None, new)

    def _initial_status(self, resource: kmock.resource, body: Body) -> Body:
        if resource == NAMESPACES:
            return {"status": {"phase": "Active"}}
        if resource == kmock.resource("", "v1", "pods"):
            return {"status": {"phase": "Pending"}}
        if resource == CRDS:
            names, versions = body["spec"]["names"], body["spec"]["versions"]
            conditions = [
                {"type": kind, "status": "True", "reason": reason, "lastTransitionTime": _now()}
                for kind, reason in (("NamesAccepted", "NoConflicts"), ("Established", ""))
            ]
            stored = [v["name"] for v in versions if v.get("storage")]
            return {
                "status": {
                    "acceptedNames": names,
                    "conditions": conditions,
                    "storedVersions": stored,
                }
            }
        return {}

    def _update(self, key: Key, old: Body, new: Any, subresource: str | None) -> Body:
        if not isinstance(new, dict):
            raise _failure(400, "BadRequest", "the body must be an object")
        if subresource == STATUS_SUBRESOURCE:
            new = _without(old, "status") | ({"status": new["status"]} if "status" in new else {})
        elif self._has_status(key[0]):
            new = _without(new, "status") | ({"status": old["status"]} if "status" in old else {})
        meta = dict(new.get("metadata") or {})
        if meta.get("name", key[2]) != key[2] or meta.get("namespace", key[1]) != key[1]:
            raise _failure(400, "BadRequest", "the name and namespace cannot change")
        server_owned = ("uid", "creationTimestamp", "deletionTimestamp", "generation", "name")
        for field in (*server_owned, "namespace", "deletionGracePeriodSeconds", "resourceVersion"):
            if field in old["metadata"]:
                meta[field] = old["metadata"][field]
            else:
                meta.pop(field, None)
        if _without(new, "metadata", "status") != _without(old, "metadata", "status"):
            meta["generation"] = old["metadata"]["generation"] + 1
        new = {**new, "metadata": meta}
        if new == old:
            return old  # a no-op write: no new resourceVersion, no event
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._commit(key, "DELETED", old, new)
        return self._commit(key, "MODIFIED", old, new)

    def _delete(self, key: Key, options: Any) -> Body:
        old = self._get(key)
        preconditions = (options if isinstance(options, dict) else {}).get("preconditions") or {}
        for field in ("uid", "resourceVersion"):
            if preconditions.get(field) not in {None, old["metadata"][field]}:
                message = f"{self._describe(key)}: precondition failed for {field}"
                raise _failure(409, "Conflict", message)
        if old["metadata"].get("finalizers"):
            if old["metadata"].get("deletionTimestamp"):
                return old
            meta = {**old["metadata"], "deletionTimestamp": _now(), "deletionGracePeriodSeconds": 0}
            return self._commit(key, "MODIFIED", old, {**old, "metadata": meta})
        if isinstance(options, dict) and options.get("propagationPolicy") == "Orphan":
            self._dependents.pop(old["metadata"]["uid"], None)
        return self._commit(key, "DELETED", old, old)

    def _collect_garbage(self, owner_uid: str) -> None:
        """Delete the dependents that no living owner holds any more (each may cascade)."""
        for key in sorted(self._dependents.pop(owner_uid, set()), key=str):
            body = self._find(key)
            owners = (body or {}).get("metadata", {}).get("ownerReferences") or []
            if body is not None and not any(ref["uid"] in self._uids for ref in owners):
                self._delete(key, {})

    def _forget(self, resource: kmock.resource, body: Body) -> None:
        """What goes with a deleted object: a namespace's contents, a CRD's objects."""
        doomed: list[Key] = []
        if resource == NAMESPACES:
            namespace = body["metadata"]["name"]
            for other, bodies in self._live.items():
                doomed += [(other, ns, name) for ns, name in bodies if ns == namespace]
        if resource == CRDS:
            for crd_resource in self._crd_resources(body):
                doomed += [(crd_resource, ns, name) for ns, name in self._live[crd_resource]]
                self.resources.pop(crd_resource, None)
        for key in doomed:  # finalizers are not waited for here
            found = self._get(key)
            self._commit(key, "DELETED", found, found)

    @staticmethod
    def _crd_resources(crd: Body) -> list[kmock.resource]:
        spec = crd["spec"]
        plural = spec["names"]["plural"]
        return [kmock.resource(spec["group"], v["name"], plural) for v in spec["versions"]]

    def _register_crd(self, crd: Body) -> None:
        spec, names = crd["spec"], crd["spec"]["names"]
        for version, resource in zip(spec["versions"], self._crd_resources(crd), strict=True):
            if not version.get("served", True):
                continue
            subresources = version.get("subresources") or {}
            self.resources[resource] = kmock.ResourceInfo(
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                kind=names["kind"],
                singular=names.get("singular") or names["kind"].lower(),
                verbs=ALL_VERBS,
                shortnames=names.get("shortNames") or [],
                categories=names.get("categories") or [],
                subresources=[name for name in ("status", "scale") if name in subresources],
            )

    async def close(self) -> None:
        """End the watch streams, so that the server can stop without waiting for them."""
        self._closing = True
        self._wakeup.set()
