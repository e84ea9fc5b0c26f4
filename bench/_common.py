"""What the benchmarks share: where the local infrastructure is, and percentiles."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = {"TERRANOHA_KAFKA": "127.0.0.1:29092",
            "TERRANOHA_POSTGRES": "postgresql://terranoha:terranoha@127.0.0.1:25432/terranoha"}


def infra_settings() -> tuple[str, str]:
    """(Kafka bootstrap, PostgreSQL DSN): the environment, else ``.local/infra.env``
    (written by ``deploy/local/infra.sh up``), else the local defaults."""
    values = dict(DEFAULTS)
    env_file = ROOT / ".local" / "infra.env"
    if env_file.exists():
        for line in env_file.read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            values[key.strip()] = value.strip()
    for key in DEFAULTS:
        values[key] = os.environ.get(key, values[key])
    return values["TERRANOHA_KAFKA"], values["TERRANOHA_POSTGRES"]


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile; NaN for no values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")
