"""The PretrainJob resource as a whole, and the one boundary that parses it.

:func:`parse_job` is where untrusted input (a YAML file, an object from the API server)
becomes typed data; everything above works with the frozen models it returns.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Annotated, Any

from pretrain_trainer.config import Problem, SpecError
from pretrain_trainer.config.base import DNS_LABEL, problems_from_validation_error
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from .spec import PretrainJobSpec
from .status import JobStatus

GROUP = "pretrain.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "PretrainJob"
PLURAL = "pretrainjobs"
SINGULAR = "pretrainjob"
SHORT_NAMES = ("ptj",)

# Child objects are named `<job>-<suffix>` (e.g. `<job>-a12-w1023`); a shorter job name keeps
# every derived name a valid DNS label (63 characters).
MAX_JOB_NAME = 45


class ObjectMeta(BaseModel):
    """The parts of Kubernetes object metadata the project reads; the rest passes through."""

    model_config = ConfigDict(
        frozen=True, extra="allow", alias_generator=to_camel, populate_by_name=True
    )

    name: Annotated[str, Field(pattern=DNS_LABEL, max_length=MAX_JOB_NAME)]
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class PretrainJob(BaseModel):
    """A parsed PretrainJob: metadata, a validated spec and (when read back) its status."""

    model_config = ConfigDict(frozen=True)

    metadata: ObjectMeta
    spec: PretrainJobSpec
    status: JobStatus = JobStatus()

    @property
    def name(self) -> str:
        return self.metadata.name

    def warnings(self) -> Iterator[Problem]:
        return (p.under("spec") for p in self.spec.warnings())


def _header_problems(doc: Mapping[str, Any]) -> Iterator[Problem]:
    kind, api_version = doc.get("kind"), doc.get("apiVersion")
    if kind != KIND:
        yield Problem(("kind",), f"expected {KIND}, got {kind!r}")
    if api_version != API_VERSION:
        yield Problem(("apiVersion",), f"expected {API_VERSION}, got {api_version!r}")
    if "spec" not in doc:
        yield Problem(("spec",), "required field is missing")


def parse_job(doc: object) -> PretrainJob:
    """Validate a PretrainJob document; raise :class:`SpecError` listing every problem."""
    if not isinstance(doc, Mapping):
        raise SpecError([Problem((), f"expected a {KIND} object, got {type(doc).__name__}")])
    problems = list(_header_problems(doc))
    if problems:
        raise SpecError(problems)
    try:
        metadata = ObjectMeta.model_validate(doc.get("metadata") or {})
    except ValidationError as error:
        problems += problems_from_validation_error(error, "metadata")
    try:
        spec = PretrainJobSpec.parse(doc["spec"], "spec")
    except SpecError as error:
        problems += error.problems
    if problems:
        raise SpecError(problems)
    try:
        # The operator writes status; anything unreadable in it is reset rather than fatal.
        status = JobStatus.model_validate(doc.get("status") or {})
    except ValidationError:
        status = JobStatus()
    return PretrainJob(metadata=metadata, spec=spec, status=status)
