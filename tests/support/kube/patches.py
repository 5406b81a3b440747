"""The three patch formats of the Kubernetes API, as pure functions over JSON documents.

- RFC 6902 JSON patch (``application/json-patch+json``), with ``test``;
- RFC 7386 merge patch (``application/merge-patch+json``);
- strategic merge patch (``application/strategic-merge-patch+json``), simplified to a merge
  patch: lists are replaced rather than merged by their patch-merge key, and the ``$``-directives
  that kubectl sends (``$setElementOrder/...``, ``$retainKeys``, ``$patch``) are dropped.

Functions never mutate their inputs; a patch that cannot apply raises :class:`PatchError`
(the server answers 422, which is what kopf expects when its ``test`` op fails).
"""

from __future__ import annotations

import copy
from typing import Any


class PatchError(ValueError):
    """The patch is malformed or does not apply (a failed ``test`` included)."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: dicts merge recursively, ``null`` removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """A strategic merge patch treated as a merge patch, minus its ``$``-directives."""
    return merge_patch(target, _without_directives(patch))


def _without_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_without_directives(item) for item in value]
    return value


def json_patch(target: Any, operations: Any) -> Any:
    """RFC 6902: apply the operations in order, all or nothing."""
    if not isinstance(operations, list):
        raise PatchError("a JSON patch must be a list of operations")
    document = copy.deepcopy(target)
    for operation in operations:
        document = _apply_operation(document, operation)
    return document


def _apply_operation(document: Any, operation: Any) -> Any:
    if not isinstance(operation, dict) or "op" not in operation or "path" not in operation:
        raise PatchError(f"malformed operation: {operation!r}")
    op, path = operation["op"], _parse_pointer(operation["path"])
    if op == "test":
        if _get(document, path) != operation.get("value"):
            raise PatchError(f"test failed at {operation['path']!r}")
        return document
    if op == "remove":
        return _remove(document, path)[0]
    if op in {"add", "replace"}:
        if "value" not in operation:
            raise PatchError(f"{op} needs a value: {operation!r}")
        if op == "replace":
            document = _remove(document, path)[0]
        return _add(document, path, copy.deepcopy(operation["value"]))
    if op in {"move", "copy"}:
        source = _parse_pointer(operation.get("from", ""))
        if op == "move":
            document, value = _remove(document, source)
        else:
            value = copy.deepcopy(_get(document, source))
        return _add(document, path, value)
    raise PatchError(f"unknown operation {op!r}")


def _parse_pointer(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise PatchError(f"a JSON pointer must start with '/': {pointer!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in pointer[1:].split("/")]


def _index(container: list[Any], token: str, *, for_insert: bool) -> int:
    if for_insert and token == "-":
        return len(container)
    if not token.isdigit():
        raise PatchError(f"not a list index: {token!r}")
    index = int(token)
    if index > len(container) or (index == len(container) and not for_insert):
        raise PatchError(f"list index out of range: {index}")
    return index


def _get(document: Any, path: list[str]) -> Any:
    for token in path:
        if isinstance(document, dict) and token in document:
            document = document[token]
        elif isinstance(document, list):
            document = document[_index(document, token, for_insert=False)]
        else:
            raise PatchError(f"path not found: /{'/'.join(path)}")
    return document


def _add(document: Any, path: list[str], value: Any) -> Any:
    if not path:
        return value
    parent, token = _get(document, path[:-1]), path[-1]
    if isinstance(parent, dict):
        parent[token] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, token, for_insert=True), value)
    else:
        raise PatchError(f"cannot add into a scalar at /{'/'.join(path)}")
    return document


def _remove(document: Any, path: list[str]) -> tuple[Any, Any]:
    if not path:
        raise PatchError("cannot remove the whole document")
    parent, token = _get(document, path[:-1]), path[-1]
    if isinstance(parent, dict) and token in parent:
        return document, parent.pop(token)
    if isinstance(parent, list):
        return document, parent.pop(_index(parent, token, for_insert=False))
    raise PatchError(f"path not found: /{'/'.join(path)}")
