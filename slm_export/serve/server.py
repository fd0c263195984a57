"""uvicorn's server with a drain on exit: the first SIGTERM / Ctrl-C stops the scheduler
taking requests and lets the running ones end (in a thread, so the event loop keeps
streaming their last tokens) while uvicorn stops accepting connections."""

from __future__ import annotations

import signal
import sys
import threading

import uvicorn


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, scheduler, grace_s: float):
        super().__init__(config)
        self.scheduler, self.grace_s = scheduler, grace_s

    def handle_exit(self, sig, frame) -> None:
        """As uvicorn's (a second Ctrl-C forces the exit), but the signal is not raised again
        once the server has stopped: a drained shutdown is a normal end, exit code 0."""
        if not self.scheduler.draining:
            threading.Thread(target=self.scheduler.drain, args=(self.grace_s,), daemon=True).start()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        for server in self.servers:  # the port chosen (--port 0 picks a free one)
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                print(f"slm-serve: listening on http://{host}:{port}", file=sys.stderr, flush=True)
