"""The job's phase and the conditions that mirror it: which conditions each phase sets.

Running, Restarting and Suspended exclude each other: entering one sets it True and every
other of the three that the job ever had False, so the conditions alone tell the phase.
Pending has no condition of its own; it says why on Running (False). Succeeded and Failed end
the job: the three turn False and the terminal one is added, to stay. Transition times follow
the Kubernetes conventions (``api.set_condition``).
"""

from __future__ import annotations

from datetime import datetime

from ..api import ConditionType, JobStatus, Phase, Reason, set_condition

_EXCLUSIVE = {
    Phase.RUNNING: ConditionType.RUNNING,
    Phase.RESTARTING: ConditionType.RESTARTING,
    Phase.SUSPENDED: ConditionType.SUSPENDED,
}
_TERMINAL = {Phase.SUCCEEDED: ConditionType.SUCCEEDED, Phase.FAILED: ConditionType.FAILED}


def set_phase(
    status: JobStatus, phase: Phase, *, reason: Reason, message: str, now: datetime
) -> JobStatus:
    """``status`` in ``phase``, its conditions saying ``reason`` and ``message``."""
    wanted = _EXCLUSIVE.get(phase)
    had = {c.type for c in status.conditions}
    changes = [(t, t == wanted) for t in _EXCLUSIVE.values() if t == wanted or t in had]
    if phase == Phase.PENDING:  # not running yet, and the condition says why
        changes.append((ConditionType.RUNNING, False))
    if phase in _TERMINAL:
        changes.append((_TERMINAL[phase], True))
    conditions = list(status.conditions)
    for type_, true in changes:
        conditions = set_condition(
            conditions, type_=type_, reason=reason, message=message, now=now, true=true
        )
    return status.model_copy(update={"phase": phase, "conditions": conditions})
