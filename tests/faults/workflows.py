"""Workflows of the fault scenarios besides ``DURABLE``; all run on the durable tools."""

from __future__ import annotations

from engine.core.spec import WorkflowSpec, load_spec


def _sleeper(name: str, sleep: str) -> WorkflowSpec:
    return load_spec(
        {
            "workflow": name,
            "version": 1,
            "input": {"n": "integer"},
            "steps": [{"id": "wait", "sleep": sleep}, {"id": "notify", "task": "test.notify"}],
        }
    )


NAP = _sleeper("nap", "3s")
"""A short timer, then a write."""
HOUR = _sleeper("hour", "1h")
"""A timer only a clock jump makes due within a test."""


def _gate(name: str, expires: str) -> WorkflowSpec:
    return load_spec(
        {
            "workflow": name,
            "version": 1,
            "input": {"n": "integer"},
            "steps": [
                {"id": "gate", "approval": {"approvers": ["finance"], "expires_after": expires}},
                {"id": "notify", "task": "test.notify"},
            ],
        }
    )


GATE = _gate("gate", "10m")
"""One approval from the finance role (not the requester), then a write."""
GATE_FAST = _gate("gate-fast", "2s")
"""The same approval, expiring after 2 s (fails the run)."""
