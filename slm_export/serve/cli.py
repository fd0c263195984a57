"""``slm-serve`` (``python -m slm_export.serve``): an export or run folder behind an
OpenAI-compatible HTTP API, on any backend, with continuous batching.

Start-up loads the backend and warms it (compiles, first prefills at each batch size it will
run) before the port opens, so ``/health`` answers ready from the first request it sees.
SIGTERM / Ctrl-C: stop taking requests, let the running ones finish (``--shutdown-grace``
seconds, then cut them with finish_reason "length"), exit 0.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from slm_export.cli.common import (
    ArgumentParser,
    add_runtime_args,
    entry_point,
    port,
    positive_float,
    positive_int,
)
from slm_export.errors import SlmError


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="slm-serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True,
                   help="an export folder, a run folder (best.pt + export/) or a checkpoint")
    add_runtime_args(p, default_backend="ort")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=port, default=8000, help="port (default 8000; 0: a free one)")
    p.add_argument("--max-batch", type=positive_int, default=16,
                   help="rows generated together at most (default 16)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests waiting to join the batch at most; more get 429 (default 64)")
    p.add_argument("--max-tokens", type=positive_int, default=1024,
                   help="the most max_tokens a request may ask for (default 1024)")
    p.add_argument("--request-timeout", type=positive_float, default=300.0,
                   help="seconds a request may run before its rows are cut (default 300)")
    p.add_argument("--max-body", type=positive_int, default=1 << 20,
                   help="request body size limit in bytes (default 1 MiB)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: no key)")
    p.add_argument("--model-name", default=None,
                   help="the name /v1/models lists and requests use (default: the model folder's)")
    p.add_argument("--shutdown-grace", type=positive_float, default=10.0,
                   help="seconds running requests get to finish on SIGTERM (default 10)")
    return p


def load(args):
    """The backend on the requested device (``--device auto`` falls back to the CPU with a
    warning where the GPU cannot run it, as generate.py does)."""
    from slm_export.artifacts.loaders import CudaProviderError, WrongDeviceError
    from slm_export.devices import resolve_device
    from slm_export.runtime import load_backend

    try:
        return load_backend(args.backend, args.model, resolve_device(args.device), args.variant)
    except (CudaProviderError, WrongDeviceError) as e:
        if args.device != "auto":
            raise
        print(f"warning: {e}; serving on the CPU", file=sys.stderr)
        return load_backend(args.backend, args.model, "cpu", args.variant)


def model_name(args) -> str:
    if args.model_name:
        return args.model_name
    path = args.model.resolve()
    return (path.parent.name if path.name in ("export", "best.pt") else path.name) or "slm"


@entry_point
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn

        from slm_export.serve.app import Settings, create_app
        from slm_export.serve.server import DrainingServer
    except ImportError as e:
        raise SlmError(f"slm-serve needs the serve extra ({e.name} is missing): "
                       "pip install 'slm-export[serve]'") from None
    from slm_export.serve.protocol import Limits
    from slm_export.serve.scheduler import Scheduler, warm_up

    backend = load(args)
    print(f"slm-serve: {args.backend} {args.variant} on {backend.device}; warming up "
          f"(batch sizes up to {args.max_batch}) ...", file=sys.stderr, flush=True)
    warm_s = warm_up(backend, args.max_batch)
    scheduler = Scheduler(backend, max_batch=args.max_batch, max_queue=args.max_queue)
    info = {"model": model_name(args), "backend": args.backend, "variant": args.variant,
            "device": str(backend.device), "created": int(time.time()),
            "context": backend.config.block_size, "warm_up_s": round(warm_s, 2)}
    limits = Limits(max_tokens=args.max_tokens, max_rows=args.max_batch,
                    vocab_size=backend.config.vocab_size, model=info["model"])
    app = create_app(scheduler, Settings(limits, info, args.api_key, args.max_body, args.request_timeout))
    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=args.shutdown_grace + 5),
                            scheduler, args.shutdown_grace)
    scheduler.start()
    try:
        server.run()
    finally:
        if not scheduler.draining:
            scheduler.drain(0)
    return 0
