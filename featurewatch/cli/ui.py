"""``featurewatch ui``: serve the local page (live token heatmap, alert timeline, feature and detector cards)."""

from __future__ import annotations

import argparse
import os
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
                   help="allow a non-loopback --host; it needs a token (--token or $FEATUREWATCH_UI_TOKEN)")
    p.add_argument("--token", default=None,
                   help="a secret every API request must carry (Authorization: Bearer, or open the page once as "
                        "/?token=...); at least 16 characters; default: $FEATUREWATCH_UI_TOKEN (safer: not shown "
                        "by ps)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="another name clients reach this server by (repeatable); requests with any other Host "
                        "header are refused (DNS rebinding). Loopback names and --host are always allowed")
    p.add_argument("--open", action="store_true", help="open the page in a browser")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=256, help="the most tokens a page may ask for (>= 1)")
    add_model_args(p)
    p.set_defaults(func=cmd_ui)


def cmd_ui(args: argparse.Namespace) -> int:
    try:
        from ..ui.server import LOOPBACK, TOKEN_ENV, UIApp, UIServer, allowed_host_names, bind_socket, check_token
    except ModuleNotFoundError as exc:
        raise CLIError(str(exc)) from None

    token = check_token(args.token if args.token is not None else (os.environ.get(TOKEN_ENV) or None))
    allowed = allowed_host_names(args.host, args.allowed_host)
    if args.host not in LOOPBACK:
        if not args.allow_remote:
            raise CLIError(f"--host {args.host} is not a loopback address: anyone who reaches it can run the model "
                           "and read its alerts; add --allow-remote (with a token) to serve it anyway")
        if token is None:
            raise CLIError(f"--allow-remote needs a token: pass --token TOKEN or set {TOKEN_ENV} (at least 16 "
                           "characters, e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")
        print(f"featurewatch: warning: serving on {args.host}, not loopback: whoever has the token can run the "
              f"model; Host names answered: {', '.join(sorted(allowed))} (more with --allowed-host)", file=sys.stderr)
    sock = bind_socket(args.host, args.port)  # a busy port fails now, before the model loads
    try:
        pack = load_pack_checked(args)
        monitor = build_monitor(args, pack)
        try:
            server = UIServer(UIApp(monitor, max_new_tokens=args.max_new_tokens), args.host, sock=sock, token=token,
                              allowed_hosts=args.allowed_host)
            print(f"featurewatch ui: serving {server.url} (Ctrl-C stops)", file=sys.stderr, flush=True)
            if token is not None:
                print("featurewatch ui: open the page once as <address>/?token=<the token>; API clients send "
                      "Authorization: Bearer <the token>", file=sys.stderr, flush=True)
            if args.open:
                import webbrowser

                webbrowser.open(server.url + (f"?token={token}" if token else ""))
            try:
                server.serve_forever()
            finally:
                server.app.close()
        finally:
            monitor.detach()
    finally:
        sock.close()
    return 0
