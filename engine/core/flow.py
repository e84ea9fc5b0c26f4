"""Flow control as the run core sees it: which limit key a task must take a slot on.

The run core is given the limits document in force (``FlowLimits``) beside the spec and
the time. A task on worker queue Q waits for a slot on ``tool:Q`` when the document
binds that key; with no document, or none binding it, the task is dispatched at once,
exactly as without flow control. The admission processor decides the grant; the run
core only asks (``SlotRequested``), dispatches on ``GrantSlot`` and gives the slot back
(``SlotReleased``) when the task ends, fails, times out or its run is cancelled.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.core import admission_records as ad
from engine.core.commands import GrantSlot, RefuseSlot
from engine.core.limits import KeyLimits, LimitsDocument, resolve

LEASE_MARGIN_MS = 30_000
"""A slot's lease outlives the task's timeout by this much: the release that the timeout
causes arrives first, and the lease only ends what a crash left behind."""


@dataclass(frozen=True, slots=True)
class FlowLimits:
    """The limits document of ``version``, as the run core reads it."""

    document: LimitsDocument
    version: int

    def slot_for(self, queue: str) -> tuple[str, KeyLimits] | None:
        """The key a task on ``queue`` takes a slot on, and its limits; None if none."""
        key = f"tool:{queue}"
        limits = resolve(self.document, key)
        return (key, limits) if limits.binding else None


def answer(event: ad.AdmissionEvent) -> GrantSlot | RefuseSlot | None:
    """The command that tells the run that asked (``reply_to``) what became of its
    request: the admission processor writes it to the run inputs with the event."""
    if not isinstance(event, ad.Granted | ad.Refused) or not event.reply_to:
        return None
    common = {
        "run_id": event.reply_to,
        "command_id": f"{event.key}/{event.request_id}",
        "task_id": event.request_id,
        "key": event.key,
    }
    if isinstance(event, ad.Granted):
        return GrantSlot(**common, tenant=event.tenant)
    return RefuseSlot(**common, code=event.code, message=event.message)
