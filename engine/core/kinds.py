"""The closed vocabularies of the core: step kinds, task phases, approval reasons,
timer kinds, error classes and how a signal wait resumes.

Each is a ``StrEnum`` whose values are the strings the records have always carried
(``TaskDispatched.phase``, ``ApprovalRequested.reason``, ``TimerArmed.kind``...). The
record fields stay ``str``: a member *is* its value, so a live event and the same event
decoded from an old log encode to the same bytes and compare equal, and recorded logs
replay unchanged. ``decide`` dispatches on these members through registries, one
function per member, instead of comparing strings.
"""

from __future__ import annotations

from enum import StrEnum


class StepKind(StrEnum):
    """What a step does; given by which one of its fields is set (``StepSpec.kind``)."""

    TASK = "task"
    PREPARE_COMMIT = "prepare_commit"
    APPROVAL = "approval"
    WAIT_EVENT = "wait_event"
    CHOICE = "choice"
    SLEEP = "sleep"


class Phase(StrEnum):
    """Which call of a step a task is: a plain task, or the two calls of prepare/commit."""

    TASK = "task"
    PREPARE = "prepare"
    COMMIT = "commit"


class ApprovalReason(StrEnum):
    """Why people are asked to decide; it says what a grant leads to.

    An escalation of an approval keeps the reason it escalates, as
    ``escalation:<reason>`` (see ``escalated``): granting it does what granting the
    original would have done. A bare ``escalation`` comes from a business error.
    """

    CRITICAL = "critical"
    """Before a task's write runs (a task step with an approval)."""
    PREPARE_COMMIT = "prepare_commit"
    """A change set from the prepare call, before the commit call."""
    REVIEW = "review"
    """A task's result routed to reviewers (``review_if``)."""
    APPROVAL = "approval"
    """An approval step."""
    ESCALATION = "escalation"
    """A business error escalated to a group."""


ESCALATION_PREFIX = f"{ApprovalReason.ESCALATION}:"


def escalated(reason: str) -> str:
    """The reason of an escalation of an approval requested for ``reason``."""
    if reason.startswith(ApprovalReason.ESCALATION):
        return reason
    return f"{ESCALATION_PREFIX}{reason}"


def is_escalation(reason: str) -> bool:
    return reason.startswith(ApprovalReason.ESCALATION)


def granted_reason(reason: str) -> str:
    """The reason whose grant rule applies: an escalated approval's original reason."""
    return reason.removeprefix(ESCALATION_PREFIX)


class TimerKind(StrEnum):
    """What an armed timer does when it fires."""

    RUN_SLA = "run_sla"
    APPROVAL_SLA = "approval_sla"
    RETRY = "retry"
    TASK_TIMEOUT = "task_timeout"
    APPROVAL_REMINDER = "approval_reminder"
    APPROVAL_EXPIRY = "approval_expiry"
    SIGNAL_TIMEOUT = "signal_timeout"
    SLEEP = "sleep"


class ErrorClass(StrEnum):
    """How a failure is handled: permanent fails the step, business goes to the step's
    ``on_business_error``, transient is retried by the step's retry policy."""

    PERMANENT = "permanent"
    BUSINESS = "business"
    TRANSIENT = "transient"


class Resume(StrEnum):
    """What the arrival of an awaited signal does: complete a wait_event step, or run the
    step again (a business error asked for more input)."""

    COMPLETE = "complete"
    RETRY = "retry"


class HandlerAction(StrEnum):
    """What a handler (``on_business_error``, ``on_expire``, ``on_reject``,
    ``on_timeout``, ``on_exhausted``) does."""

    GOTO = "goto"
    WAIT_EVENT = "wait_event"
    ESCALATE = "escalate"
    FAIL = "fail"
