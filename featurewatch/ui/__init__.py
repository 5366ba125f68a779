"""``featurewatch ui``: a local, offline page over a live :class:`~featurewatch.monitor.Monitor`.

The server (:mod:`featurewatch.ui.server`) is Starlette on uvicorn (the ``ui`` extra:
``pip install 'featurewatch[ui]'``); a live generation streams to the page as
server-sent events (``sse-starlette``). The page is plain HTML, CSS and JavaScript
shipped in ``featurewatch/ui/static`` (package data, read with
:mod:`importlib.resources`): nothing is fetched from the internet and there is no
build step. The JSON API and who may call it are documented in
docs/architecture.md ("The page's JSON API").
"""

from __future__ import annotations

from .server import UIApp, UIServer, serve_ui

__all__ = ["UIApp", "UIServer", "serve_ui"]
