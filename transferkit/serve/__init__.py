"""``transferkit serve``: a run behind an HTTP API and a web page.

    settings = ServeSettings(run="runs/demo")
    serve(settings, host="127.0.0.1", port=8000)      # blocks until SIGTERM / Ctrl-C

- ``service``: the run, its engine (built as predict builds it) and what the answers are
  made of: uploads decoded as predict decodes files, rows from predict's own row builder.
- ``batcher``: the one thread that runs the engine, on batches gathered from the requests
  that arrive together.
- ``app``: the FastAPI application (/predict, /explain, /health, /metadata, the page at /,
  every error as ``{"error": "..."}``).
- ``server``: uvicorn on a socket bound here, one process or several workers, a graceful
  stop on SIGTERM / SIGINT.
- ``page.html``: the self-contained page (no external scripts, styles or fonts).

The layer sits above evaluation (Grad-CAM) and inference, below the CLI.
"""
