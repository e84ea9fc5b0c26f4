"""Deployed workflow specs, by (workflow, version)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from engine.core.spec import WorkflowSpec


class SpecRegistry:
    """Holds every deployed version; a run keeps the version it started with.

    ``loader`` (optional) is asked again when a lookup misses, so specs deployed by
    another process after start are found.
    """

    def __init__(
        self,
        specs: Iterable[WorkflowSpec] = (),
        loader: Callable[[], Iterable[WorkflowSpec]] | None = None,
    ) -> None:
        self._by_key: dict[tuple[str, int], WorkflowSpec] = {}
        self._latest: dict[str, int] = {}
        self._loader = loader
        for spec in specs:
            self.add(spec)

    def add(self, spec: WorkflowSpec) -> None:
        self._by_key[spec.key] = spec
        if spec.version > self._latest.get(spec.workflow, 0):
            self._latest[spec.workflow] = spec.version

    def get(self, workflow: str, version: int) -> WorkflowSpec | None:
        """The spec at ``version``; version 0 means the latest deployed."""
        spec = self._lookup(workflow, version)
        if spec is None and self._loader is not None:
            for loaded in self._loader():
                self.add(loaded)
            spec = self._lookup(workflow, version)
        return spec

    def _lookup(self, workflow: str, version: int) -> WorkflowSpec | None:
        if version == 0:
            version = self._latest.get(workflow, 0)
        return self._by_key.get((workflow, version))

    def all(self) -> list[WorkflowSpec]:
        return list(self._by_key.values())
