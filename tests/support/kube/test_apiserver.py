"""The API server fidelity layer, through the clients that use it: the ``kubernetes`` client,
``kubectl`` and a kopf operator. Each test names the behaviour of a real API server it checks."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kopf
import pytest
from kopf.testing import KopfRunner
from kubernetes import client as k8s
from kubernetes import watch
from kubernetes.client.exceptions import ApiException

from tests.support.kube.apiserver import ApiServer, kopf_login
from tests.support.kube.patches import PatchError, json_patch

GROUP, VERSION, PLURAL = "pretrain.dev", "v1alpha1", "pretrainjobs"
# The tests send plain dicts, as kopf does; the generated client declares only its models.
CoreApi = Any
CustomApi = Any


def job(name: str = "demo", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PretrainJob",
        "metadata": {"name": name},
        "spec": spec or {"image": "trainer:1"},
    }


def pod(name: str, *, labels: dict[str, str] | None = None, node: str = "") -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "main", "image": "trainer:1"}]}
    if node:
        spec["nodeName"] = node
    return {"metadata": {"name": name, "labels": labels or {}}, "spec": spec}


def owned_by(owner: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    ref = {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
    }
    return {**body, "metadata": {**body["metadata"], "ownerReferences": [ref]}}


def eventually(check: Callable[[], bool], *, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("the condition did not hold in time")
        time.sleep(0.02)


def get_json(server: ApiServer, path: str) -> Any:
    with urllib.request.urlopen(server.url + path, timeout=5) as response:
        return json.load(response)


def send_json(server: ApiServer, method: str, path: str, body: Any, content_type: str) -> Any:
    """A raw request, for the patch formats that the generated client does not choose."""
    request = urllib.request.Request(
        server.url + path,
        data=json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": content_type},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise ApiException(status=exc.code, reason=exc.reason) from exc


def error_of(call: Callable[[], Any]) -> tuple[int, dict[str, Any]]:
    with pytest.raises(ApiException) as info:
        call()
    cause = info.value.__cause__
    body = cause.read() if isinstance(cause, urllib.error.HTTPError) else info.value.body
    return int(info.value.status), json.loads(body or "{}")


@pytest.fixture
def core(api_client: Any) -> k8s.CoreV1Api:
    return k8s.CoreV1Api(api_client)


@pytest.fixture
def custom(api_client: Any) -> k8s.CustomObjectsApi:
    return k8s.CustomObjectsApi(api_client)


def create_job(custom: CustomApi, body: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = custom.create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, body
    )
    return created


def patch_job(
    custom: CustomApi, patch: Any, *, status: bool = False, name: str = "demo"
) -> dict[str, Any]:
    method = (
        custom.patch_namespaced_custom_object_status
        if status
        else custom.patch_namespaced_custom_object
    )
    patched: dict[str, Any] = method(GROUP, VERSION, "default", PLURAL, name, patch)
    return patched


# --- object metadata ---------------------------------------------------------------------


def test_create_sets_uid_resource_version_generation_and_timestamp(core: CoreApi) -> None:
    meta = core.create_namespaced_config_map("default", {"metadata": {"name": "c"}}).metadata
    assert meta.uid
    assert meta.creation_timestamp
    assert meta.resource_version
    assert meta.generation == 1
    assert meta.namespace == "default"  # taken from the URL


def test_every_write_bumps_one_global_resource_version(core: CoreApi, custom: CustomApi) -> None:
    first = int(
        core.create_namespaced_config_map(
            "default", {"metadata": {"name": "a"}}
        ).metadata.resource_version
    )
    second = int(create_job(custom, job())["metadata"]["resourceVersion"])
    third = int(
        patch_job(custom, {"metadata": {"labels": {"x": "1"}}})["metadata"]["resourceVersion"]
    )
    assert first < second < third


def test_a_write_that_changes_nothing_keeps_the_resource_version(
    custom: CustomApi,
) -> None:
    created = create_job(custom, job())
    again = patch_job(custom, {"spec": created["spec"]})
    assert again["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


def test_generation_bumps_on_spec_changes_only(custom: CustomApi) -> None:
    create_job(custom, job())
    assert patch_job(custom, {"metadata": {"labels": {"a": "b"}}})["metadata"]["generation"] == 1
    assert (
        patch_job(custom, {"status": {"phase": "Running"}}, status=True)["metadata"]["generation"]
        == 1
    )
    assert patch_job(custom, {"spec": {"image": "trainer:2"}})["metadata"]["generation"] == 2


def test_generate_name_gives_distinct_names(core: CoreApi) -> None:
    names = {
        core.create_namespaced_config_map(
            "default", {"metadata": {"generateName": "cfg-"}}
        ).metadata.name
        for _ in range(5)
    }
    assert len(names) == 5
    assert all(name.startswith("cfg-") and len(name) == 9 for name in names)


def test_namespaces_are_listed_and_required(core: CoreApi) -> None:
    core.create_namespace({"metadata": {"name": "team-a"}})
    assert {ns.metadata.name for ns in core.list_namespace().items} == {"default", "team-a"}
    assert core.read_namespace("team-a").status.phase == "Active"
    code, status = error_of(
        lambda: core.create_namespaced_config_map("nowhere", {"metadata": {"name": "c"}})
    )
    assert (code, status["reason"]) == (404, "NotFound")


def test_deleting_a_namespace_deletes_its_objects(core: CoreApi, apiserver: ApiServer) -> None:
    core.create_namespace({"metadata": {"name": "team-a"}})
    core.create_namespaced_config_map("team-a", {"metadata": {"name": "c"}})
    core.delete_namespace("team-a")
    assert apiserver.objects("configmaps") == []


# --- errors --------------------------------------------------------------------------------


def test_errors_are_status_objects_with_the_real_reasons(core: CoreApi) -> None:
    code, status = error_of(lambda: core.read_namespaced_pod("missing", "default"))
    assert (code, status["kind"], status["reason"], status["code"]) == (
        404,
        "Status",
        "NotFound",
        404,
    )
    assert status["message"] == 'pods "missing" not found'

    core.create_namespaced_config_map("default", {"metadata": {"name": "c"}})
    code, status = error_of(
        lambda: core.create_namespaced_config_map("default", {"metadata": {"name": "c"}})
    )
    assert (code, status["reason"]) == (409, "AlreadyExists")


def test_an_update_with_a_stale_resource_version_conflicts(core: CoreApi) -> None:
    stale = core.create_namespaced_config_map(
        "default", {"metadata": {"name": "c"}, "data": {"k": "1"}}
    )
    core.patch_namespaced_config_map("c", "default", {"data": {"k": "2"}})
    stale.data = {"k": "3"}
    code, status = error_of(lambda: core.replace_namespaced_config_map("c", "default", stale))
    assert (code, status["reason"]) == (409, "Conflict")
    fresh = core.read_namespaced_config_map("c", "default")
    fresh.data = {"k": "3"}
    assert core.replace_namespaced_config_map("c", "default", fresh).data == {"k": "3"}


# --- patches ---------------------------------------------------------------------------------


def test_json_patch_applies_and_a_failed_test_is_422(
    custom: CustomApi, apiserver: ApiServer
) -> None:
    created = create_job(custom, job())
    ops = [
        {
            "op": "test",
            "path": "/metadata/resourceVersion",
            "value": created["metadata"]["resourceVersion"],
        },
        {"op": "add", "path": "/metadata/finalizers", "value": ["pretrain.dev/finalizer"]},
    ]
    path = f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}/demo"
    patched = send_json(apiserver, "PATCH", path, ops, "application/json-patch+json")
    assert patched["metadata"]["finalizers"] == ["pretrain.dev/finalizer"]
    code, status = error_of(  # the version has moved on
        lambda: send_json(apiserver, "PATCH", path, ops, "application/json-patch+json")
    )
    assert (code, status["reason"]) == (422, "Invalid")


def test_merge_patch_removes_keys_with_null(core: CoreApi, apiserver: ApiServer) -> None:
    core.create_namespaced_config_map(
        "default", {"metadata": {"name": "c"}, "data": {"a": "1", "b": "2"}}
    )
    path = "/api/v1/namespaces/default/configmaps/c"
    patched = send_json(
        apiserver, "PATCH", path, {"data": {"a": None}}, "application/merge-patch+json"
    )
    assert patched["data"] == {"b": "2"}


def test_strategic_merge_patch_is_a_merge_patch_without_directives(core: CoreApi) -> None:
    core.create_namespaced_pod("default", pod("p", labels={"a": "1"}))
    patch = {
        "metadata": {"labels": {"b": "2"}},
        "spec": {"$setElementOrder/containers": [{"name": "main"}]},
    }
    patched = core.patch_namespaced_pod("p", "default", patch)  # the client sends it as strategic
    assert patched.metadata.labels == {"a": "1", "b": "2"}
    assert patched.spec.containers[0].name == "main"


@pytest.mark.parametrize(
    ("ops", "expected"),
    [
        ([{"op": "add", "path": "/a/-", "value": 3}], {"a": [1, 2, 3]}),
        ([{"op": "add", "path": "/a/0", "value": 0}], {"a": [0, 1, 2]}),
        ([{"op": "remove", "path": "/a/1"}], {"a": [1]}),
        ([{"op": "replace", "path": "/a", "value": "x"}], {"a": "x"}),
        ([{"op": "move", "from": "/a", "path": "/b"}], {"b": [1, 2]}),
        ([{"op": "copy", "from": "/a/0", "path": "/c~1d"}], {"a": [1, 2], "c/d": 1}),
    ],
)
def test_json_patch_operations(ops: list[dict[str, Any]], expected: dict[str, Any]) -> None:
    assert json_patch({"a": [1, 2]}, ops) == expected


def test_json_patch_is_all_or_nothing() -> None:
    document = {"a": 1}
    with pytest.raises(PatchError):
        json_patch(
            document,
            [{"op": "add", "path": "/b", "value": 2}, {"op": "test", "path": "/a", "value": 9}],
        )
    assert document == {"a": 1}


# --- status subresource ------------------------------------------------------------------------


def test_status_subresource_separates_status_from_the_rest(custom: CustomApi) -> None:
    created = create_job(custom, {**job(), "status": {"phase": "Ignored"}})
    assert "status" not in created
    main = patch_job(custom, {"spec": {"image": "trainer:2"}, "status": {"phase": "Ignored"}})
    assert "status" not in main
    assert main["spec"]["image"] == "trainer:2"
    status = patch_job(
        custom, {"spec": {"image": "ignored"}, "status": {"phase": "Running"}}, status=True
    )
    assert status["status"] == {"phase": "Running"}
    assert status["spec"]["image"] == "trainer:2"
    assert int(status["metadata"]["resourceVersion"]) > int(main["metadata"]["resourceVersion"])


# --- deletion: finalizers and garbage collection ---------------------------------------------


def test_finalizers_hold_deletion_until_they_are_emptied(custom: CustomApi) -> None:
    create_job(custom, {**job(), "metadata": {"name": "demo", "finalizers": ["x/y"]}})
    custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "demo")
    marked = custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "demo")
    assert marked["metadata"]["deletionTimestamp"]
    custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "demo")  # still there
    patch_job(custom, {"metadata": {"finalizers": None}})
    code, _ = error_of(
        lambda: custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "demo")
    )
    assert code == 404


def test_deleting_an_owner_collects_its_dependents_in_cascade(
    core: CoreApi, custom: CustomApi, apiserver: ApiServer
) -> None:
    owner = create_job(custom, job())
    config = core.create_namespaced_config_map(
        "default", owned_by(owner, {"metadata": {"name": "c"}})
    )
    config_body = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "c", "uid": config.metadata.uid},
    }
    core.create_namespaced_pod("default", owned_by(config_body, pod("p")))
    core.create_namespaced_pod("default", pod("unowned"))
    custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "demo")
    eventually(lambda: [p["metadata"]["name"] for p in apiserver.objects("pods")] == ["unowned"])
    assert apiserver.objects("configmaps") == []


def test_delete_collection_honours_the_label_selector(core: CoreApi, apiserver: ApiServer) -> None:
    for name, app in [("a", "x"), ("b", "x"), ("c", "y")]:
        core.create_namespaced_pod("default", pod(name, labels={"app": app}))
    core.delete_collection_namespaced_pod("default", label_selector="app=x")
    assert [p["metadata"]["name"] for p in apiserver.objects("pods")] == ["c"]


# --- lists and selectors ---------------------------------------------------------------------


@pytest.fixture
def labelled_pods(core: CoreApi) -> None:
    core.create_namespace({"metadata": {"name": "other"}})
    for name, labels, node in [
        ("a", {"app": "x", "tier": "web"}, "n1"),
        ("b", {"app": "y", "tier": "db"}, "n2"),
        ("c", {"app": "z"}, ""),
    ]:
        core.create_namespaced_pod("default", pod(name, labels=labels, node=node))
    core.create_namespaced_pod("other", pod("d", labels={"app": "x"}))
    core.patch_namespaced_pod_status("b", "default", {"status": {"phase": "Running"}})


@pytest.mark.usefixtures("labelled_pods")
@pytest.mark.parametrize(
    ("selector", "names"),
    [
        ("app=x", ["a", "d"]),
        ("app==x", ["a", "d"]),
        ("app!=x", ["b", "c"]),
        ("app in (x, y)", ["a", "b", "d"]),
        ("app notin (x,y)", ["c"]),
        ("tier", ["a", "b"]),
        ("!tier", ["c", "d"]),
        ("app in (x,y),tier=db", ["b"]),
    ],
)
def test_label_selectors_filter_lists(core: CoreApi, selector: str, names: list[str]) -> None:
    found = core.list_pod_for_all_namespaces(label_selector=selector).items
    assert sorted(p.metadata.name for p in found) == names


@pytest.mark.usefixtures("labelled_pods")
@pytest.mark.parametrize(
    ("selector", "names"),
    [
        ("metadata.name=a", ["a"]),
        ("metadata.namespace=other", ["d"]),
        ("status.phase=Running", ["b"]),
        ("status.phase!=Running", ["a", "c", "d"]),
        ("spec.nodeName=n1", ["a"]),
        ("spec.nodeName=,metadata.namespace=default", ["c"]),
    ],
)
def test_field_selectors_filter_lists(core: CoreApi, selector: str, names: list[str]) -> None:
    found = core.list_pod_for_all_namespaces(field_selector=selector).items
    assert sorted(p.metadata.name for p in found) == names


def test_a_bad_selector_is_a_bad_request(core: CoreApi) -> None:
    code, status = error_of(lambda: core.list_namespaced_pod("default", label_selector="a in b"))
    assert (code, status["reason"]) == (400, "BadRequest")


def test_lists_have_a_kind_and_a_resource_version(core: CoreApi, apiserver: ApiServer) -> None:
    core.create_namespaced_pod("default", pod("a"))
    listing = get_json(apiserver, "/api/v1/namespaces/default/pods")
    assert (listing["kind"], listing["apiVersion"]) == ("PodList", "v1")
    item_version = listing["items"][0]["metadata"]["resourceVersion"]
    assert int(listing["metadata"]["resourceVersion"]) >= int(item_version)


def test_lists_page_with_limit_and_continue(core: CoreApi) -> None:
    for index in range(5):
        core.create_namespaced_config_map("default", {"metadata": {"name": f"c{index}"}})
    first = core.list_namespaced_config_map("default", limit=3)
    rest = core.list_namespaced_config_map("default", limit=3, _continue=first.metadata._continue)
    assert [c.metadata.name for c in first.items + rest.items] == [f"c{i}" for i in range(5)]
    assert rest.metadata._continue is None


# --- watches -------------------------------------------------------------------------------------


def watch_events(core: CoreApi, **kwargs: Any) -> list[tuple[str, str]]:
    watcher = watch.Watch()  # type: ignore[no-untyped-call]
    stream = watcher.stream(core.list_namespaced_pod, "default", timeout_seconds=1, **kwargs)  # type: ignore[no-untyped-call]
    return [(event["type"], event["object"].metadata.name) for event in stream]


def test_watch_sends_only_events_after_the_resource_version(core: CoreApi) -> None:
    core.create_namespaced_pod("default", pod("before"))
    version = core.list_namespaced_pod("default").metadata.resource_version
    core.create_namespaced_pod("default", pod("after"))
    core.patch_namespaced_pod("after", "default", {"metadata": {"labels": {"x": "1"}}})
    core.delete_namespaced_pod("before", "default")
    assert watch_events(core, resource_version=version) == [
        ("ADDED", "after"),
        ("MODIFIED", "after"),
        ("DELETED", "before"),
    ]


def test_watch_without_a_version_starts_with_the_current_objects(core: CoreApi) -> None:
    core.create_namespaced_pod("default", pod("a"))
    assert watch_events(core) == [("ADDED", "a")]


def test_watch_streams_json_lines_and_ends_after_timeout_seconds(apiserver: ApiServer) -> None:
    started = time.monotonic()
    url = f"{apiserver.url}/api/v1/namespaces/default/pods?watch=true&timeoutSeconds=1"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("application/json")
        assert response.read() == b""
    assert 0.9 < time.monotonic() - started < 3


def test_watch_reports_objects_leaving_a_selector_as_deleted(core: CoreApi) -> None:
    core.create_namespaced_pod("default", pod("a", labels={"app": "x"}))
    version = core.list_namespaced_pod("default").metadata.resource_version
    core.patch_namespaced_pod("a", "default", {"metadata": {"labels": {"app": "y"}}})
    core.patch_namespaced_pod("a", "default", {"metadata": {"labels": {"app": "x"}}})
    events = watch_events(core, resource_version=version, label_selector="app=x")
    assert events == [("DELETED", "a"), ("ADDED", "a")]


def test_watch_delivers_writes_made_while_it_waits(core: CoreApi) -> None:
    version = core.list_namespaced_pod("default").metadata.resource_version
    writer = threading.Timer(0.2, lambda: core.create_namespaced_pod("default", pod("late")))
    writer.start()
    assert watch_events(core, resource_version=version) == [("ADDED", "late")]
    writer.join()


def test_watch_from_a_forgotten_version_is_gone() -> None:
    with ApiServer(history_limit=2) as server, server.client() as api_client:
        core: CoreApi = k8s.CoreV1Api(api_client)
        for name in ("default", "a", "b", "c", "d", "e"):
            core.create_namespace({"metadata": {"name": name}})
        url = f"{server.url}/api/v1/namespaces?watch=true&resourceVersion=1&timeoutSeconds=1"
        with urllib.request.urlopen(url, timeout=5) as response:
            event = json.loads(response.readline())
        assert (event["type"], event["object"]["code"]) == ("ERROR", 410)


# --- discovery ---------------------------------------------------------------------------


def resources_of(server: ApiServer, path: str) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in get_json(server, path)["resources"]}


def test_core_discovery_lists_what_kopf_and_kubectl_need(apiserver: ApiServer) -> None:
    assert get_json(apiserver, "/api")["versions"] == ["v1"]
    core = resources_of(apiserver, "/api/v1")
    assert {
        "pods",
        "services",
        "configmaps",
        "serviceaccounts",
        "events",
        "nodes",
        "namespaces",
    } <= set(core)
    assert core["pods"]["namespaced"]
    assert not core["namespaces"]["namespaced"]
    groups = {g["name"] for g in get_json(apiserver, "/apis")["groups"]}
    assert {
        "apps",
        "coordination.k8s.io",
        "events.k8s.io",
        "apiextensions.k8s.io",
        "kopf.dev",
    } <= groups
    assert "customresourcedefinitions" in resources_of(apiserver, "/apis/apiextensions.k8s.io/v1")


def test_a_created_crd_becomes_discoverable(apiserver: ApiServer) -> None:
    groups = {g["name"]: g for g in get_json(apiserver, "/apis")["groups"]}
    assert groups[GROUP]["preferredVersion"]["version"] == VERSION
    assert (
        get_json(apiserver, f"/apis/{GROUP}")["versions"][0]["groupVersion"] == f"{GROUP}/{VERSION}"
    )
    found = resources_of(apiserver, f"/apis/{GROUP}/{VERSION}")
    assert found[PLURAL]["kind"] == "PretrainJob"
    assert found[PLURAL]["namespaced"] is True
    assert found[PLURAL]["shortNames"] == ["ptj"]
    assert "watch" in found[PLURAL]["verbs"]
    assert f"{PLURAL}/status" in found


def test_a_created_crd_is_established(api_client: Any) -> None:
    crd: Any = k8s.ApiextensionsV1Api(api_client).read_custom_resource_definition(
        f"{PLURAL}.{GROUP}"
    )
    assert {c.type: c.status for c in crd.status.conditions}["Established"] == "True"


def test_deleting_a_crd_removes_its_resource_and_objects(
    api_client: Any, custom: CustomApi, apiserver: ApiServer
) -> None:
    create_job(custom, job())
    k8s.ApiextensionsV1Api(api_client).delete_custom_resource_definition(f"{PLURAL}.{GROUP}")
    code, _ = error_of(lambda: create_job(custom, job()))
    assert code == 404
    assert GROUP not in {g["name"] for g in get_json(apiserver, "/apis")["groups"]}


# --- counters and speed --------------------------------------------------------------------------


def test_requests_are_counted_by_verb(core: CoreApi, apiserver: ApiServer) -> None:
    apiserver.reset_counters()
    core.create_namespaced_pod("default", pod("a"))
    core.read_namespaced_pod("a", "default")
    core.patch_namespaced_pod("a", "default", {"metadata": {"labels": {"x": "1"}}})
    assert apiserver.requests == {"create": 1, "get": 1, "patch": 1}
    assert apiserver.requests_by_resource["patch", "pods"] == 1


def test_creating_and_listing_a_thousand_pods_takes_little_time(core: CoreApi) -> None:
    started = time.perf_counter()
    for index in range(1000):
        core.create_namespaced_pod("default", pod(f"p{index}", labels={"app": str(index % 2)}))
    listed = core.list_namespaced_pod("default", label_selector="app=1")
    elapsed = time.perf_counter() - started
    assert len(listed.items) == 500
    assert elapsed < 5, f"1,000 creates and a list took {elapsed:.2f} s"


def test_the_test_own_kmock_reactions_take_precedence(core: CoreApi, apiserver: ApiServer) -> None:
    apiserver.handler["get /api/v1/namespaces/default/pods/flaky"][:1] << 503
    core.create_namespaced_pod("default", pod("flaky"))
    with pytest.raises(ApiException) as failure:
        core.read_namespaced_pod("flaky", "default")
    assert failure.value.status == 503
    assert core.read_namespaced_pod("flaky", "default").metadata.name == "flaky"  # depleted


# --- real clients: kubectl and kopf ---------------------------------------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")
def test_kubectl_gets_and_applies(apiserver: ApiServer, core: CoreApi, tmp_path: Path) -> None:
    config = apiserver.kubeconfig(tmp_path / "kubeconfig")

    def kubectl(*args: str) -> str:
        done = subprocess.run(
            ["kubectl", "--kubeconfig", str(config), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    core.create_namespaced_pod("default", pod("a", labels={"app": "x"}))
    core.create_namespaced_pod("default", pod("b", labels={"app": "y"}))
    listed = json.loads(kubectl("get", "pods", "-l", "app=x", "-o", "json"))
    assert [item["metadata"]["name"] for item in listed["items"]] == ["a"]

    manifest = tmp_path / "job.json"
    manifest.write_text(json.dumps(job("applied")))
    # Client-side validation needs OpenAPI schemas, which this server does not serve.
    assert "created" in kubectl("apply", "--validate=false", "-f", str(manifest))
    manifest.write_text(json.dumps(job("applied", image="trainer:2")))
    assert "configured" in kubectl("apply", "--validate=false", "-f", str(manifest))
    assert "applied" in kubectl("get", "pretrainjobs")
    fetched = json.loads(kubectl("get", "ptj", "applied", "-o", "json"))
    assert fetched["spec"] == {"image": "trainer:2"}
    assert fetched["metadata"]["generation"] == 2
    kubectl("delete", "pod", "a")
    assert [p["metadata"]["name"] for p in apiserver.objects("pods")] == ["b"]


def test_kopf_operator_reconciles_against_the_server(
    apiserver: ApiServer, custom: CustomApi
) -> None:
    registry = kopf.OperatorRegistry()
    settings = kopf.OperatorSettings()
    settings.persistence.finalizer = "pretrain.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="pretrain.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="pretrain.dev", key="last-handled-configuration"
    )
    settings.watching.server_timeout = 10  # watches end on their own, as on a real cluster
    kopf_login(apiserver, registry=registry)

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    def create_config(
        name: str, namespace: str | None, body: kopf.Body, patch: kopf.Patch, **_: Any
    ) -> None:
        config = {
            "metadata": {"name": f"{name}-config", "namespace": namespace},
            "data": {"k": "v"},
        }
        kopf.adopt(config, owner=body)
        with apiserver.client() as api_client:
            core: CoreApi = k8s.CoreV1Api(api_client)
            core.create_namespaced_config_map(namespace, config)
        patch.status["phase"] = "Configured"

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    def forget(**_: Any) -> None:
        pass  # a deletion handler makes kopf put its finalizer on the object

    args = ["run", "--standalone", "--namespace=default"]
    with KopfRunner(args, registry=registry, settings=settings, timeout=30) as runner:
        create_job(custom, job())
        eventually(lambda: apiserver.objects("configmaps") != [])
        eventually(
            lambda: apiserver.objects(PLURAL)[0].get("status", {}).get("phase") == "Configured"
        )
        stored = apiserver.objects(PLURAL)[0]
        assert stored["metadata"]["finalizers"] == ["pretrain.dev/finalizer"]
        assert "pretrain.dev/last-handled-configuration" in stored["metadata"]["annotations"]
        config = apiserver.objects("configmaps")[0]
        assert config["metadata"]["ownerReferences"][0]["uid"] == stored["metadata"]["uid"]

        custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "demo")
        eventually(
            lambda: apiserver.objects(PLURAL) == [] and apiserver.objects("configmaps") == []
        )

    assert runner.exit_code == 0
    assert runner.exception is None
