"""Fixtures of the flow-control tests."""

from tests.cli.conftest import cli

__all__ = ["cli"]
