"""``slm-serve``: an OpenAI-compatible HTTP server over any backend, with continuous batching.

- ``scheduler.py``: the thread that owns the backend and the one loop, rows joining and
  leaving its batch at every step;
- ``protocol.py``: OpenAI's completions request, checked, and its error body;
- ``app.py``: the Starlette routes (completions, models, health, metrics, info, playground);
- ``metrics.py``: Prometheus metrics; ``server.py``: uvicorn with a drain on SIGTERM;
- ``cli.py``: the command line; ``static/``: the playground page.
Needs the ``serve`` extra (starlette, uvicorn, prometheus-client).
"""
