"""The fixtures the notifier's tests share with others: the real broker and PostgreSQL
of ``tests/kafka`` (for the marked tests; they fail, never skip, when a server is down)
and the in-process command line of ``tests/cli``."""

from tests.cli.conftest import cli
from tests.kafka.conftest import kafka_bootstrap, postgres_dsn, topics

__all__ = ["cli", "kafka_bootstrap", "postgres_dsn", "topics"]
