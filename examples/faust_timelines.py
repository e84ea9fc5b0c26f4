"""The run timelines topic in a faust-streaming agent (``pip install 'terranoha[examples]'``).

Keeps each run's last status in a table and prints the runs that end Failed. Values are
decoded with the engine's codec, registered as a faust codec; keys are run ids (UTF-8).

faust reads with ``read_committed`` only when ``processing_guarantee="exactly_once"``;
the timelines topic is written in transactions, so that setting matters here.

    faust -A examples.faust_timelines worker -l info

Settings: ``TERRANOHA_KAFKA`` (default 127.0.0.1:29092), ``TERRANOHA_TOPIC_PREFIX``
(default terranoha).
"""

from __future__ import annotations

import os
from typing import Any

import faust
from faust.serializers import codecs

from engine.codec import decode
from engine.core.projection_records import RunTimeline


class TerranohaCodec(codecs.Codec):
    """Read-only: Terranoha records in, objects out."""

    def _loads(self, s: bytes) -> Any:
        return decode(s)

    def _dumps(self, obj: Any) -> bytes:
        raise NotImplementedError("this example only reads Terranoha records")


codecs.register("terranoha", TerranohaCodec())

PREFIX = os.environ.get("TERRANOHA_TOPIC_PREFIX", "terranoha")
app = faust.App("terranoha-timelines-example",
                broker=f"kafka://{os.environ.get('TERRANOHA_KAFKA', '127.0.0.1:29092')}",
                processing_guarantee="exactly_once", store="memory://")
timelines = app.topic(f"{PREFIX}.run-timelines", key_serializer="raw",
                      value_serializer="terranoha")
last_status = app.Table("last-status", default=str)


@app.agent(timelines)
async def watch(stream: Any) -> None:
    async for key, record in stream.items():
        if not isinstance(record, RunTimeline):
            continue
        run_id = key.decode() if isinstance(key, bytes) else str(key)
        if last_status[run_id] == record.status:
            continue
        last_status[run_id] = record.status
        if record.status == "Failed":
            error = record.error if isinstance(record.error, dict) else {}
            print(f"{run_id} ({record.workflow}) failed: {error.get('code')}")
