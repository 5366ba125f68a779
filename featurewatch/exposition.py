"""Serving metrics: the ``/metrics`` HTTP server and WSGI/ASGI apps.

Kept apart from :mod:`featurewatch.metrics` (which records) because serving is
a deployment choice: an app that already has a web server mounts
:func:`metrics_wsgi_app` or :func:`metrics_asgi_app`; a script calls
:func:`serve_metrics`. Under several worker processes
(``PROMETHEUS_MULTIPROC_DIR`` set) the served registry adds up all workers;
the variable is read when serving starts, never at import.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from typing import Any, Callable

from prometheus_client import REGISTRY, CollectorRegistry, make_asgi_app, make_wsgi_app, start_http_server

from .errors import ConfigError, PortInUse

logger = logging.getLogger(__name__)


def exposition_registry(registry: CollectorRegistry | None = None) -> CollectorRegistry:
    """The registry to serve: ``registry``, else a multiprocess collector when
    ``PROMETHEUS_MULTIPROC_DIR`` is set (read now, not at import), else the default."""
    if registry is not None:
        return registry
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return merged
    return REGISTRY


class MetricsServer:
    """A running ``/metrics`` HTTP server in a daemon thread; :meth:`close` stops it (idempotent)."""

    def __init__(self, httpd: Any, thread: threading.Thread, addr: str) -> None:
        self._httpd: Any = httpd
        self._thread = thread
        self.addr = addr
        self.port: int = httpd.server_port

    @property
    def url(self) -> str:
        """The scrape URL, e.g. ``http://127.0.0.1:9464/metrics``."""
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_metrics(port: int, *, addr: str = "127.0.0.1",
                  registry: CollectorRegistry | None = None) -> MetricsServer:
    """Serve the metrics over HTTP on ``addr:port`` (port 0 picks a free one) until ``close()``.

    Loopback by default: metrics name the detectors a deployment runs, so
    exposing them beyond the host is a choice (``addr="0.0.0.0"``). The server
    answers with the OpenMetrics format (exemplars included) when the scraper
    asks for it, and the classic text format otherwise.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"metrics port must be an integer in 0..65535 (0 = a free port), got {port!r}")
    try:
        httpd, thread = start_http_server(port, addr=addr, registry=exposition_registry(registry))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"metrics port {port} on {addr} is already in use by another process; "
                            f"choose another port (e.g. --metrics-port {port + 1 if port < 65535 else 9464}) "
                            f"or 0 to pick a free one") from exc
        raise ConfigError(f"cannot serve metrics on {addr}:{port}: {exc}") from exc
    server = MetricsServer(httpd, thread, addr)
    logger.info("serving metrics at %s", server.url)
    return server


def metrics_wsgi_app(registry: CollectorRegistry | None = None) -> Callable[..., Any]:
    """A WSGI app that serves the metrics; mount it at ``/metrics`` (e.g. with werkzeug's DispatcherMiddleware)."""
    return make_wsgi_app(exposition_registry(registry))


def metrics_asgi_app(registry: CollectorRegistry | None = None) -> Callable[..., Any]:
    """An ASGI app that serves the metrics; mount it at ``/metrics`` (e.g. ``app.mount("/metrics", ...)``)."""
    return make_asgi_app(exposition_registry(registry))
