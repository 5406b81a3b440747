"""The base model for every spec type, and field paths for error messages.

Every spec is a frozen pydantic model that forbids unknown fields, reads camelCase keys
(the Kubernetes convention) and takes its documentation from attribute docstrings, so the
CRD's descriptions (``kubectl explain``) come from the same source as the code.

Cross-field rules are not pydantic validators: they are ``problems()`` methods that yield
:class:`Problem` values with a path relative to the model. A caller composes them by prefixing
paths, so every message names the exact field (``spec.stages[1].dataMix.web``) and all
problems are reported at once, not only the first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from ..errors import PermanentError

PathPart = str | int
Path = tuple[PathPart, ...]


class Spec(BaseModel):
    """Base of all spec models: frozen, strict about unknown keys, camelCase on the wire."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        strict=True,
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,
        validate_default=False,
    )


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec: where (a path of keys and list indexes) and why."""

    path: Path
    message: str

    def under(self, *prefix: PathPart) -> Problem:
        return Problem(path=(*prefix, *self.path), message=self.message)

    def __str__(self) -> str:
        return f"{format_path(self.path)}: {self.message}"


def format_path(path: Sequence[PathPart]) -> str:
    """Render a path the way Kubernetes and kubectl do: ``spec.stages[1].dataMix``."""
    out = ""
    for part in path:
        if isinstance(part, int) or any(c in part for c in "./[]"):
            out += f"[{part}]"  # list indexes, and map keys such as `nvidia.com/gpu`
        else:
            out += f".{part}" if out else part
    return out or "<root>"


def prefixed(problems: Iterable[Problem], *prefix: PathPart) -> Iterator[Problem]:
    """A nested model's problems, their paths put under the field that holds it."""
    for problem in problems:
        yield problem.under(*prefix)


# Bounds keep every number representable in the CRD's int64/double and every derived
# computation (divisors, step counts) cheap, whatever a fuzzer or a typo supplies.
Count = Annotated[int, Field(gt=0, le=2**31 - 1)]
BigCount = Annotated[int, Field(gt=0, le=2**62)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


class SpecError(PermanentError, ValueError):
    """A spec failed validation; carries every problem found, each with its field path.

    Permanent (the trainer exits without retrying) and still a ``ValueError``, as it always
    was: the operator side parses specs through this package and callers may catch either."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# Patterns shared by the models, with the words a user should read when a value misses one.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
SOURCE_NAME = r"^[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?$"
_PATTERN_HINTS = {
    DNS_LABEL: "must be lower-case letters, digits and '-', starting and ending with a letter "
    "or digit",
    SOURCE_NAME: "must be letters, digits, '_', '.' and '-', starting and ending with a letter "
    "or digit",
}

_MESSAGES = {
    "extra_forbidden": "unknown field",
    "missing": "required field is missing",
}


def problems_from_validation_error(error: ValidationError, *prefix: PathPart) -> list[Problem]:
    """Translate pydantic's errors into problems with Kubernetes-style paths."""
    out = []
    for item in error.errors(include_url=False):
        message = _MESSAGES.get(item["type"], item["msg"])
        pattern = (item.get("ctx") or {}).get("pattern")
        if item["type"] == "string_pattern_mismatch" and pattern in _PATTERN_HINTS:
            message = _PATTERN_HINTS[pattern]
        if item["type"] not in _MESSAGES and "input" in item:
            shown = repr(item["input"])
            message += f" (got {shown[:60]}{'...' if len(shown) > 60 else ''})"
        out.append(Problem(path=(*prefix, *item["loc"]), message=message))
    return out


class Checked(Spec):
    """A spec with cross-field rules, built only through :meth:`parse`."""

    def problems(self) -> Iterator[Problem]:
        return iter(())

    @classmethod
    def parse(cls, data: object, *at: PathPart) -> Self:
        """Validate ``data`` (as read from YAML or JSON); raise :class:`SpecError` with all
        problems, each path prefixed with ``at``."""
        try:
            value = cls.model_validate(data)
        except ValidationError as error:
            raise SpecError(problems_from_validation_error(error, *at)) from None
        problems = list(prefixed(value.problems(), *at))
        if problems:
            raise SpecError(problems)
        return value
