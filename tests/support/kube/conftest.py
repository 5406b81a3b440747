"""Fixtures for tests against the in-memory API server (see ``apiserver.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest

from tests.conftest import ROOT
from tests.support.kube.apiserver import ApiServer, load_yaml_documents

CRD_PATH = ROOT / "crds" / "pretrainjob.yaml"


@pytest.fixture
def apiserver() -> Iterator[ApiServer]:
    """A fresh server per test, on its own port, with the PretrainJob CRD and ``default``."""
    with ApiServer() as server, server.client() as client:
        # Typed as Any: plain dicts go in, which the generated client does not declare.
        extensions: Any = kubernetes.client.ApiextensionsV1Api(client)
        core: Any = kubernetes.client.CoreV1Api(client)
        for crd in load_yaml_documents(CRD_PATH):
            extensions.create_custom_resource_definition(crd)
        core.create_namespace({"metadata": {"name": "default"}})
        yield server


@pytest.fixture
def api_client(apiserver: ApiServer) -> Iterator[Any]:
    """A ``kubernetes.client.ApiClient`` for ``apiserver``."""
    with apiserver.client() as client:
        yield client
