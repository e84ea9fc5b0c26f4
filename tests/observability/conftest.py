"""The command-line fixtures: ``cli`` runs ``terranoha`` in-process, ``kafka`` gives a
topic prefix of the test's own on the real broker."""

from tests.cli.conftest import cli
from tests.cli.test_kafka import kafka

__all__ = ["cli", "kafka"]
