"""``python -m tests.faults.engine_main``: the Kafka backend in one process, like
``terranoha serve --kafka``, with the knobs the fault scenarios need and the CLI lacks: the
transaction commit timeout, and a clock whose offset follows a file (clock jumps)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import signal
import sys
from pathlib import Path

from engine.kafka import serve as serve_module
from engine.kafka.processor import KafkaEngine
from engine.kafka.router import TriggerRouter
from engine.kafka.topics import Topics
from engine.runtime.clock import OffsetClock
from engine.worker import load_worker_modules


async def _follow_offset(clock: OffsetClock, path: Path, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(OSError, ValueError):
            clock.offset_ms = int(path.read_text().strip() or 0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


async def main(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # serve() builds these two without a commit timeout argument.
    serve_module.KafkaEngine = functools.partial(  # type: ignore[misc]
        KafkaEngine, commit_timeout_s=args.commit_timeout
    )
    serve_module.TriggerRouter = functools.partial(  # type: ignore[misc]
        TriggerRouter, commit_timeout_s=args.commit_timeout
    )
    clock = OffsetClock()
    follower = None
    if args.clock_file:
        follower = loop.create_task(_follow_offset(clock, Path(args.clock_file), stop))
    registry = load_worker_modules(["tests.embedded.durable_tools"] if args.worker else [])
    options = serve_module.ServeOptions(
        bootstrap=args.kafka,
        topics=Topics(prefix=args.prefix, partitions=args.partitions),
        app=args.prefix,
        postgres=args.postgres,
        registry=registry,
        concurrency=8,
        state_dir=Path(args.state_dir) if args.state_dir else None,
    )

    async def ready(running: serve_module.Running) -> None:
        print("serving", flush=True)

    await serve_module.serve(options, stop, clock=clock, ready=ready)
    if follower is not None:
        await follower
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--kafka", required=True)
    parser.add_argument("--postgres", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--commit-timeout", type=float, default=15.0)
    parser.add_argument("--clock-file", default="")
    parser.add_argument("--no-worker", dest="worker", action="store_false")
    parser.add_argument("--state-dir", default="", help="the engine's local state store")
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    sys.exit(asyncio.run(main(parser.parse_args())))
