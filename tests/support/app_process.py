"""`python -m tests.support.app_process`: the real App with the test service, in its own
process, configured from the environment like `python -m server serve` (for cross-process
tests). Prints `port=<n>` once serving; stops on SIGTERM."""

from __future__ import annotations

import asyncio
import signal

from server import logs
from server.app import App
from server.config import Config
from tests.support.testing_service import registration


async def main() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    config = Config.from_environ()
    logs.configure(config.observability.log_level, config.observability.log_format)
    async with App(config, extra_services=[registration()]) as app:
        print(f"port={app.port}", flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
