"""A Kubernetes API server for tests: KMock plus the fidelity that kopf, kubectl and the
``kubernetes`` client need.

KMock 0.8 (``kmock.KubernetesEmulator``) serves objects from memory, but real clients trip over
what it leaves out. This layer keeps KMock's server (``kmock.Server``), its request records
(``kmock.Request``), its discovery (``kmock.KubernetesScaffold`` over ``kmock.ResourcesArray``,
preloaded with KMock's bundled K3s resources) and its object store with history
(``kmock.ObjectsArray``), and replaces the emulator's request handling, which each gap below
touches (``emulator.py``; patches and selectors in ``patches.py`` and ``selectors.py``). This
module runs it in a thread for synchronous tests. The gaps it fills, as seen with kmock 0.8:

1. Objects get no ``uid``, ``resourceVersion``, ``generation`` or ``creationTimestamp``; kopf's
   JSON patch with a ``test`` op on ``/metadata/resourceVersion`` then fails with 500 and its
   handlers never run. Here: a uid on create, one global resourceVersion bumped on every write,
   ``generation`` from 1, bumped only when something outside metadata and status changes;
   writes that change nothing are no-ops, as on a real server.
2. ``GET /api/v1/namespaces`` answers 500: KMock's path parser reads ``namespaces/<name>`` as a
   namespace prefix even where it is the resource itself. The namespace from the URL is not
   stored in ``metadata.namespace``, and ``generateName`` is ignored.
3. No garbage collection: deleting an owner leaves the objects whose ownerReferences point at
   its uid. Here they are deleted in the background, cascading, once all their owners are gone.
4. Finalizers: deletion marks ``deletionTimestamp`` and the object goes when a write empties its
   finalizers (KMock had this; it is kept), plus DeleteOptions preconditions.
5. ``labelSelector`` and ``fieldSelector`` are ignored on list and watch (see ``selectors.py``).
6. Watches ignore ``resourceVersion`` (kopf lists, then watches from the list's version, and
   sees every object twice or misses writes in between), ignore ``timeoutSeconds`` and stream as
   ``application/octet-stream``. Here: events after the given version only, as JSON lines; an
   ``ERROR`` event with 410 Gone when the version is older than the retained history; objects
   that start or stop matching a selector arrive as ADDED or DELETED.
7. Lists have no ``kind``, ``apiVersion`` or a real ``metadata.resourceVersion``; ``limit`` and
   ``continue`` are ignored (kubectl pages by 500).
8. Creating a CustomResourceDefinition does not make its resource discoverable, so neither kopf
   nor kubectl can use it. Here it is registered (scope, kind, names, ``status`` subresource) and
   gets an ``Established`` condition; deleting the CRD removes its objects.
9. The status subresource is not separate: writes to ``/status`` change only ``.status`` and
   writes to the object keep the stored ``.status``, for every resource that declares it.
10. PATCH is always a recursive dict merge and PUT is not recognized at all. Here: RFC 6902 JSON
    patch (with ``test``; a failed test is 422, which kopf expects), RFC 7386 merge patch,
    strategic merge patch *treated as a merge patch* (lists replaced, ``$`` directives dropped),
    and server-side apply *treated as create-or-merge* (no field managers, no conflicts). PUT
    with a stale ``resourceVersion`` is 409 Conflict; creating an existing name is 409
    AlreadyExists; errors are ``Status`` objects with the real ``reason`` values.
11. Each request re-scans the whole request log (``request in payload._source`` walks every
    recorded request for every reaction), so 1,000 creates cost about a million filter checks.
    Here requests go straight to the emulator unless a test adds its own KMock reactions
    (``server.handler[...] << ...``), which then take precedence as before.
12. ``DELETE`` on a collection (deletecollection, with selectors) is not supported.

Simplifications that remain: no admission, defaulting or schema validation; no server-side
field ownership; no Table output (kubectl prints its own columns); namespace deletion removes
the contents at once instead of going through ``Terminating``.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import kmock
import yaml

from tests.support.kube.emulator import Body, Emulator

T = TypeVar("T")


class ApiServer:
    """The emulator on ``127.0.0.1:<free port>``, served from a thread with its own loop.

    Use as a context manager; the ``kubernetes`` client, ``kubectl`` and kopf talk to ``url``.
    """

    def __init__(self, *, history_limit: int = 10_000) -> None:
        self.handler = Emulator(history_limit=history_limit)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="apiserver", daemon=True
        )
        self._server: kmock.Server | None = None
        self.url = ""

    def __enter__(self) -> ApiServer:
        self._thread.start()
        self._call(self._start())
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._call(self._stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    async def _start(self) -> None:
        await self.handler.__aenter__()
        self._server = kmock.Server(self.handler)
        await self._server.__aenter__()
        self.url = str(self._server.url).rstrip("/")

    async def _stop(self) -> None:
        await self.handler.close()
        if self._server is not None:
            await self._server.__aexit__(None, None, None)
        await self.handler.__aexit__(None, None, None)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    async def _read(self, fn: Callable[[], T]) -> T:
        return fn()

    # --- helpers for tests ---------------------------------------------------------------

    def resource(self, spec: str) -> kmock.resource:
        """``"pods"``, ``"v1/pods"``, ``"pretrainjobs.pretrain.dev"``... as a known resource."""
        wanted = kmock.resource(spec)
        known = self._call(self._read(lambda: list(self.handler.resources)))
        found = [r for r in known if isinstance(r, kmock.resource) and wanted.check(r)]
        found.sort(key=lambda r: (r.group != "", r.group or ""))  # the core group wins
        if not found:
            raise KeyError(f"unknown resource: {spec!r}")
        return found[0]

    def objects(self, resource: str, namespace: str | None = None) -> list[Body]:
        """Copies of the stored objects of a resource, sorted by namespace and name."""
        res = self.resource(resource)

        def read() -> list[Body]:
            bodies = self.handler._live[res]
            return [
                copy.deepcopy(bodies[k])
                for k in sorted(bodies, key=str)
                if namespace in {None, k[0]}
            ]

        return self._call(self._read(read))

    @property
    def requests(self) -> collections.Counter[str]:
        """Requests served so far, by verb (get, list, watch, create, patch, ..., discovery)."""
        return collections.Counter(dict(self.handler.requests))

    @property
    def requests_by_resource(self) -> collections.Counter[tuple[str, str]]:
        """Requests served so far, by verb and resource plural."""
        return collections.Counter(dict(self.handler.requests_by_resource))

    @property
    def requests_by_agent(self) -> collections.Counter[tuple[str, str, str, str]]:
        """Per (user agent's product, API group, resource[/subresource], verb)."""
        return collections.Counter(dict(self.handler.requests_by_agent))

    def reset_counters(self) -> None:
        def reset() -> None:
            self.handler.requests.clear()
            self.handler.requests_by_resource.clear()

        self._call(self._read(reset))

    def kubeconfig(self, path: Path) -> Path:
        """Write a kubeconfig for ``kubectl`` and the ``kubernetes`` client; returns ``path``."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "kmock", "user": {"token": "test"}}],
            "contexts": [
                {
                    "name": "kmock",
                    "context": {"cluster": "kmock", "user": "kmock", "namespace": "default"},
                }
            ],
            "current-context": "kmock",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` for this server (close it, or use ``with``)."""
        import kubernetes

        configuration = kubernetes.client.Configuration()
        configuration.host = self.url
        return kubernetes.client.ApiClient(configuration)

    def connection_info(self) -> Any:
        """What a ``@kopf.on.login()`` handler returns to reach this server."""
        import kopf

        return kopf.ConnectionInfo(server=self.url, insecure=True, default_namespace="default")


def kopf_login(server: ApiServer, *, registry: Any = None) -> None:
    """Register a kopf login handler for ``server`` (kopf ignores a KUBECONFIG set after import)."""
    import kopf

    def login(**_: Any) -> Any:
        return server.connection_info()

    kopf.on.login(registry=registry)(login)


def load_yaml_documents(path: Path) -> list[Body]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
