"""``featurewatch ui``: serve the local page (live token heatmap, alert timeline, feature and detector cards)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._common import PORT, POSITIVE, CLIError, add_model_args, build_monitor, load_pack_checked


def register(sub: Any) -> None:
    p = sub.add_parser("ui", help="serve a local page: live token heatmap, alerts, feature and detector cards",
                       description="Serve a local, offline page over a live monitor: a prompt box whose reply "
                                   "streams token by token, shaded by a detector's per-token score, with alerts "
                                   "on a timeline; a token inspector; feature and detector cards; offline score "
                                   "files. Every asset ships with featurewatch; nothing is fetched from the "
                                   "internet. The JSON API: docs/architecture.md.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default 127.0.0.1; another address needs --allow-remote)")
    p.add_argument("--port", type=PORT, default=8765, help="port to serve on (0 = any free port)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host: anyone who can reach it can run the model")
    p.add_argument("--open", action="store_true", help="open the page in a browser")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=256, help="the most tokens a page may ask for (>= 1)")
    add_model_args(p)
    p.set_defaults(func=cmd_ui)


def cmd_ui(args: argparse.Namespace) -> int:
    from ..ui.server import LOOPBACK, UIApp, UIServer

    if args.host not in LOOPBACK:
        if not args.allow_remote:
            raise CLIError(f"--host {args.host} is not a loopback address: anyone who reaches it can run the model "
                           "and read its alerts; add --allow-remote to serve it anyway")
        print(f"featurewatch: warning: serving on {args.host}, not loopback: anyone who can reach it can run the "
              "model (no authentication)", file=sys.stderr)
    pack = load_pack_checked(args)
    monitor = build_monitor(args, pack)
    try:
        try:
            server = UIServer(UIApp(monitor, max_new_tokens=args.max_new_tokens), args.host, args.port)
        except OSError as exc:
            raise CLIError(f"cannot serve on {args.host}:{args.port} ({exc.strerror or exc}); "
                           "choose another --port (0 = any free port)") from None
        print(f"featurewatch ui: serving {server.url} (Ctrl-C stops)", file=sys.stderr, flush=True)
        if args.open:
            import webbrowser

            webbrowser.open(server.url)
        try:
            server.serve_forever()
        finally:
            server.server_close()
            server.app.close()
    finally:
        monitor.detach()
    return 0
