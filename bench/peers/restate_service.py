"""The Restate side of the peer benchmark: Terranoha's 5-step no-op workload as a Restate
Workflow (``Bench5``) and, for comparison, as a plain durable Service (``Bench5Service``).

Each run takes five ``ctx.run_typed`` steps; each step is an async no-op returning
``{"step": name}`` (async, so the SDK does not hand it to a thread pool: the cost measured
is Restate's, not the tool's). The run returns the five step results.

Runs in the peer environment (``.local/bench-peers/venv``), served by Hypercorn, which
speaks HTTP/2 over cleartext with prior knowledge, as restate-server connects:

    .local/bench-peers/venv/bin/python bench/peers/restate_service.py --port 39080

``bench/peers/restate_bench.py`` starts and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import restate
from hypercorn.asyncio import serve
from hypercorn.config import Config
from restate.server import install_shutdown_hook

STEPS = tuple(f"s{i}" for i in range(5))

workflow = restate.Workflow("Bench5")
service = restate.Service("Bench5Service")


async def noop_step(name: str) -> dict[str, Any]:
    return {"step": name}


async def five_steps(ctx: restate.Context) -> dict[str, Any]:
    results = [await ctx.run_typed(name, noop_step, restate.RunOptions(), name) for name in STEPS]
    return {"steps": results}


@workflow.main()
async def run(ctx: restate.WorkflowContext) -> dict[str, Any]:
    return await five_steps(ctx)


@service.handler("run")
async def run_service(ctx: restate.Context) -> dict[str, Any]:
    return await five_steps(ctx)


app = restate.app(services=[workflow, service])


async def main(host: str, port: int) -> None:
    config = Config()
    config.bind = [f"{host}:{port}"]
    # restate-server multiplexes invocations as HTTP/2 streams over few connections:
    # do not let Hypercorn's default of 100 streams per connection be the limit.
    config.h2_max_concurrent_streams = 2**31 - 1
    config.keep_alive_max_requests = 2**31 - 1
    config.keep_alive_timeout = 3600
    config.graceful_timeout = 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # The SDK claims SIGTERM on the loop (to tell open invocations to suspend) and
    # dispatches it to hooks: register ours there, or it would replace ours.
    install_shutdown_hook(loop, stop.set, signal.SIGTERM)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await serve(app, config, mode="asgi", shutdown_trigger=stop.wait)  # type: ignore[arg-type]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(main(args.host, args.port))
