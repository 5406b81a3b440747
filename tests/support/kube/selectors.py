"""Label and field selectors, parsed once per request into predicates over JSON objects.

Label selectors follow the Kubernetes grammar: ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``,
``k notin (a,b)``, ``k`` (exists) and ``!k`` (does not exist), joined by commas.

Field selectors accept ``=``, ``==`` and ``!=`` on any dotted path (``metadata.name``,
``status.phase``, ``spec.nodeName``...). A real API server accepts only a few paths per
resource and answers 400 for the others; this one accepts every path, and a missing field
compares as the empty string, as it does on the server.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

Predicate = Callable[[Mapping[str, Any]], bool]

_SET_TERM = re.compile(r"^\s*([^\s!=(),]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_EQUALITY_TERM = re.compile(r"^\s*([^\s!=(),]+)\s*(==|=|!=)\s*([^\s!=(),]*)\s*$")
_EXISTS_TERM = re.compile(r"^\s*(!?)\s*([^\s!=(),]+)\s*$")


class SelectorError(ValueError):
    """The selector does not parse (the server answers 400 BadRequest)."""


def _split_terms(selector: str) -> list[str]:
    """Split on the commas that are not inside ``in (...)`` value sets."""
    terms, depth, start = [], 0, 0
    for position, char in enumerate(selector):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(selector[start:position])
            start = position + 1
    terms.append(selector[start:])
    return [term for term in terms if term.strip()]


def _label_term(term: str) -> Callable[[Mapping[str, str]], bool]:
    if match := _SET_TERM.match(term):
        key, operator, raw_values = match.groups()
        values = {value.strip() for value in raw_values.split(",") if value.strip()}
        if operator == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if match := _EQUALITY_TERM.match(term):
        key, operator, value = match.groups()
        if operator == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    if match := _EXISTS_TERM.match(term):
        negated, key = match.groups()
        if negated:
            return lambda labels: key not in labels
        return lambda labels: key in labels
    raise SelectorError(f"unable to parse requirement: {term!r}")


def label_selector(selector: str | None) -> Predicate:
    """A predicate over whole objects for a ``labelSelector`` query parameter."""
    terms = [_label_term(term) for term in _split_terms(selector or "")]

    def matches(obj: Mapping[str, Any]) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all(term(labels) for term in terms)

    return matches


def field_value(obj: Mapping[str, Any], path: str) -> str:
    """The value at a dotted path as the server compares it: a string, "" when missing."""
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _field_term(term: str) -> Predicate:
    match = _EQUALITY_TERM.match(term)
    if match is None:
        raise SelectorError(f"invalid field selector: {term!r}")
    path, operator, value = match.groups()
    if operator == "!=":
        return lambda obj: field_value(obj, path) != value
    return lambda obj: field_value(obj, path) == value


def field_selector(selector: str | None) -> Predicate:
    """A predicate over whole objects for a ``fieldSelector`` query parameter."""
    terms = [_field_term(term) for term in _split_terms(selector or "")]
    return lambda obj: all(term(obj) for term in terms)
