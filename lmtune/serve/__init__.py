"""``lmtune serve``: an HTTP server for a run's model (OpenAI-compatible endpoints, task endpoints, a page)."""

from lmtune.serve.options import ServeOptions

__all__ = ["ServeOptions"]
