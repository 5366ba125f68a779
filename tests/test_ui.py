"""``featurewatch ui``: the JSON API and server-sent events, then the page itself in headless Chromium.

Everything runs on the tiny 2-layer Llama with the embedded model's tokenizer
(``tiny_lm_dir``) and a hand-made pack with two detectors: ``demo`` (threshold 0)
and ``always`` (threshold −1000: it fires as soon as a phase has its 4 tokens),
so an alert is certain. The browser is Debian's ``chromium`` driven through
``chromedriver`` (``.ci/install-browser.sh``); screenshots are saved under
``$FEATUREWATCH_ARTIFACTS`` (default ``.test-artifacts/`` in the repository).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from _browser import ELEMENT, Driver, find_chrome

from conftest import make_monitor, make_pack
from featurewatch.sinks import BaseSink

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("FEATUREWATCH_ARTIFACTS", ROOT / ".test-artifacts"))
PROMPT = "Write a short note about the weather in the mountains today"
TOKEN = "s3cret-token-for-the-tests-0123456789"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ui_pack(tmp_path_factory: Any) -> Path:
    root = make_pack(tmp_path_factory.mktemp("ui-pack") / "pack", d_in=16, d_sae=8, hookpoint="layers.1", detectors=[
        {"name": "demo", "description": "a test detector", "kind": "sae", "hookpoint": "layers.1",
         "features": [{"id": 1, "weight": 1.0, "label": "one"}, {"id": 2, "weight": -0.5}], "threshold": 0.0,
         "calibration": {"data": ["hand.jsonl"], "target_fpr": 0.01, "auroc": 0.91, "fpr": 0.012,
                         "date": "2026-12-01"}},
        {"name": "always", "description": "fires on everything", "kind": "sae", "hookpoint": "layers.1",
         "features": [{"id": 1, "weight": 1.0}], "threshold": -1000.0}])
    (root / "features.json").write_text(json.dumps({"layers.1": [
        {"id": 1, "label": "feature one", "max_activation": 2.0, "density": 0.125,
         "top_contexts": ["the «cat» sat on the mat", "a black «cat»", "the «dog» barked"]}]}))
    return root


@pytest.fixture(scope="module")
def ui(tiny_lm_dir: Path, ui_pack: Path) -> Any:
    """A live server over a monitor on the tiny model: ``(server, monitor)``."""
    from featurewatch.models import load_model
    from featurewatch.ui import serve_ui

    loaded = load_model(str(tiny_lm_dir))
    monitor = make_monitor(loaded, pack=ui_pack, model_name="tiny")
    server = serve_ui(monitor, port=0, max_new_tokens=64)
    yield server, monitor
    server.close()
    monitor.detach()


@pytest.fixture(scope="module")
def browser() -> Any:
    found = find_chrome()
    if found is None:
        reason = "chromium and chromedriver are not installed (run .ci/install-browser.sh)"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"{reason}; CI must run the browser tests")
        pytest.skip(reason)
    driver = Driver(*found)
    yield driver
    driver.quit()


class Slow(BaseSink):
    """Makes every forward pass take a little longer, so two generations surely overlap."""

    def on_forward(self, *, model_name: str, seconds: float, tokens: int) -> None:
        time.sleep(0.01)


# --------------------------------------------------------------------------- helpers
def call(server: Any, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None,
         raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(server.url.rstrip("/") + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            text = resp.read().decode()
            status = resp.status
    except urllib.error.HTTPError as exc:
        text, status = exc.read().decode(), exc.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def events(server: Any, run_id: str) -> list[tuple[str, dict[str, Any], float]]:
    """A run's server-sent events, ``(event, data, time received)``, until the stream ends."""
    out = []
    with urllib.request.urlopen(f"{server.url}api/runs/{run_id}/events", timeout=120) as resp:
        kind = None
        for raw in resp:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                out.append((kind or "message", json.loads(line[6:]), time.time()))
    return out


def own_tokens(monitor: Any, session: Any) -> list[str]:
    return [monitor.tokenizer.decode([t]) for t in session.rows[0].token_ids]


# --------------------------------------------------------------------------- API
def test_a_run_streams_its_tokens_with_the_monitors_scores_then_its_alerts(ui: Any) -> None:
    server, monitor = ui
    status, started = call(server, "POST", "/api/runs", {"prompt": PROMPT, "max_new_tokens": 12})
    assert status == 202, started
    got = events(server, started["run_id"])
    kinds = [k for k, _, _ in got]
    assert kinds[-1] == "done" and "alert" in kinds
    tokens = [t for k, d, _ in got if k == "tokens" for t in d["tokens"]]
    assert [t["p"] for t in tokens] == list(range(len(tokens)))  # every position once, in order
    session = server.app.run(started["run_id"]).session
    assert [t["t"] for t in tokens] == own_tokens(monitor, session)
    truth = session.token_scores(0)
    for name in ("demo", "always"):
        assert [t["s"][name] for t in tokens] == pytest.approx(truth[name], abs=1e-4)
    # and those are the detector's formula, bias + Σ wᵢ·aᵢ, over the watched features the monitor read
    spec = monitor.pack.detectors["demo"]
    by_hand = [spec.bias + sum(f.weight * r.features.get(f.id, 0.0) for f in spec.features)
               for r in session.readings(0)]
    assert truth["demo"] == pytest.approx(by_hand, abs=1e-4)
    assert len(tokens) > 1 and any(t["ph"] == "completion" for t in tokens)
    # an alert comes right after the tokens that made it fire, at the position where it fired
    alerts = [(i, d) for i, (k, d, _) in enumerate(got) if k == "alert"]
    assert {(d["detector"], d["phase"]) for _, d in alerts} >= {("always", "prompt"), ("always", "completion")}
    for i, d in alerts:
        sent = max(t["p"] for k, e, _ in got[:i] if k == "tokens" for t in e["tokens"])
        assert d["position"] <= sent
        assert d["evidence"] and d["evidence"][0]["feature"] == 1
        assert d["evidence"][0]["label"] in {"one", "feature one"}  # the spec's label, else the pack's
    done = got[-1][1]
    assert done["outcome"] == "completed" and set(done["scores"]) == {"demo", "always"}
    assert [u["p"] for u in done["unread"]] == [len(tokens)]  # the last token is generated, never read


def test_token_feature_and_detector_answers(ui: Any) -> None:
    server, _ = ui
    _, started = call(server, "POST", "/api/runs", {"prompt": PROMPT, "max_new_tokens": 6})
    got = events(server, started["run_id"])
    content = next(t for k, d, _ in got if k == "tokens" for t in d["tokens"] if not t["x"])
    status, tok = call(server, "GET", f"/api/runs/{started['run_id']}/tokens/{content['p']}")
    assert status == 200 and tok["token"] == content["t"]
    assert tok["scores"]["demo"] == pytest.approx(content["s"]["demo"], abs=1e-4)
    feats = tok["hookpoints"][0]["features"]
    assert feats and feats == sorted(feats, key=lambda f: -f["activation"])
    one = next((f for f in feats if f["feature"] == 1), None)
    if one is not None:
        assert one["label"] == "feature one" and one["contributions"]["demo"] == pytest.approx(one["activation"])
    status, card = call(server, "GET", "/api/features/layers.1/1")
    assert status == 200 and card["top_contexts"][0] == "the «cat» sat on the mat"
    assert {u["detector"]: u["weight"] for u in card["used_by"]} == {"demo": 1.0, "always": 1.0}
    status, det = call(server, "GET", "/api/detectors/demo")
    assert status == 200 and det["thresholds"] == {"prompt": 0.0, "completion": 0.0}
    assert det["calibration"]["auroc"] == 0.91 and [f["id"] for f in det["features"]] == [1, 2]


@pytest.mark.parametrize("method, path, body, status, message", [
    ("POST", "/api/runs", {"prompt": "   "}, 400, "empty prompt"),
    ("POST", "/api/runs", {}, 400, "empty prompt"),
    ("POST", "/api/runs", {"prompt": "hi", "detectors": ["nope"]}, 400, "unknown detector 'nope'; valid: always, demo"),
    ("POST", "/api/runs", {"prompt": "hi", "max_new_tokens": 0}, 400, "max_new_tokens must be an integer in 1..64"),
    ("POST", "/api/runs", {"prompt": "hi", "max_new_tokens": 10_000}, 400, "max_new_tokens"),
    ("POST", "/api/runs", {"prompt": [{"role": "robot", "content": "x"}]}, 400, "message 0"),
    ("POST", "/api/runs", [1, 2], 400, "a JSON object"),
    ("GET", "/api/features/layers.1/99", None, 404,
     "feature 99 is out of range; the SAE at layers.1 has features 0 … 7"),
    ("GET", "/api/features/layers.1/x", None, 404, "not an integer"),
    ("GET", "/api/features/layers.9/1", None, 404, "no SAE at 'layers.9'"),
    ("GET", "/api/detectors/nope", None, 404, "no detector 'nope'; valid: always, demo"),
    ("GET", "/api/runs/nope/events", None, 404, "no run 'nope'"),
    ("GET", "/api/runs/nope/tokens/3", None, 404, "no run 'nope'"),
    ("GET", "/api/nothing", None, 404, "no API"),
    ("POST", "/api/scores", {"text": "{\"id\": 1}\n"}, 400, "line 1: not a featurewatch score line"),
    ("POST", "/api/steer", {"prompt": "hi", "hookpoint": "layers.1", "feature": 1, "value": "x"}, 400, "'value'"),
    ("GET", "/static/../featurewatch/ui/server.py", None, 404, "no page"),
])
def test_bad_input_is_a_4xx_with_a_message(ui: Any, method: str, path: str, body: Any, status: int,
                                           message: str) -> None:
    server, _ = ui
    got, answer = call(server, method, path, body)
    assert got == status, answer
    assert message in answer["error"] and "Traceback" not in answer["error"]


def test_requests_a_page_elsewhere_could_send_are_refused(ui: Any) -> None:
    server, _ = ui
    status, answer = call(server, "POST", "/api/runs", raw=b"prompt=hi", headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in answer["error"]
    status, answer = call(server, "POST", "/api/runs", raw=b"{not json")
    assert status == 400 and "not valid JSON" in answer["error"]
    status, answer = call(server, "GET", "/api/info", headers={"Host": "evil.example:8765"})  # DNS rebinding
    assert status == 403


# --------------------------------------------------------------------------- HTTP, byte by byte (issue 26 §1)
def raw(server: Any, data: bytes, *, timeout: float = 10.0) -> bytes:
    """Send bytes to the server on loopback; read everything until it closes the connection (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The HTTP responses in ``data``: ``(status, headers, body)`` (bodies framed by Content-Length)."""
    out = []
    while data.startswith(b"HTTP/1.1 "):
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        n = int(headers.get("content-length", len(rest)))
        out.append((int(lines[0].split()[1]), headers, rest[:n]))
        data = rest[n:]
    return out


def request(server: Any, method: str, path: str, body: bytes = b"", *, headers: dict[str, str] | None = None,
            length: int | str | None = None) -> bytes:
    hdrs = {"Host": f"127.0.0.1:{server.port}", "Content-Type": "application/json",
            "Content-Length": str(len(body) if length is None else length), **(headers or {})}
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items() if v is not None)
    return head.encode("latin-1") + b"\r\n" + body


def smuggled(server: Any, prompt: str = "smuggled") -> bytes:
    """A whole second request, to be sent as the body of a first one."""
    return request(server, "POST", "/api/runs", json.dumps({"prompt": prompt, "max_new_tokens": 1}).encode())


def runs_with_prompt(server: Any, prompt: str) -> list[Any]:
    return [r for r in list(server.app.runs.values()) if r.prompt == prompt]


@pytest.mark.parametrize("case, headers, status", [
    ("not JSON", {"Content-Type": "text/plain"}, 415),
    ("DNS rebinding", {"Host": "evil.example:8765"}, 403),
    ("another origin", {"Origin": "http://127.0.0.1:1"}, 403),
    ("an opaque origin", {"Origin": "null"}, 403),
    ("a cross-site fetch", {"Sec-Fetch-Site": "same-site"}, 403),
])
def test_a_refused_request_never_leaves_its_body_to_be_read_as_a_second_one(ui: Any, case: str,
                                                                             headers: dict[str, str],
                                                                             status: int) -> None:
    """The issue: answered without reading its body, the body was parsed as a second request (415 then 202)."""
    server, _ = ui
    inner = smuggled(server, f"smuggled {case}")
    got = responses(raw(server, request(server, "POST", "/api/runs", inner, headers=headers)))
    assert [g[0] for g in got] == [status], got  # one answer: the refusal, never a 202 for the body
    answer = json.loads(got[0][2])
    assert answer["status"] == status and answer["error"] and got[0][1]["connection"] == "close"
    time.sleep(0.3)
    assert runs_with_prompt(server, f"smuggled {case}") == []


def test_a_body_over_the_limit_is_refused_before_it_is_read(ui: Any) -> None:
    from featurewatch.ui.server import MAX_BODY

    server, _ = ui
    inner = smuggled(server, "smuggled 413")
    # announced as over the limit, followed by a whole request: 413, connection closed, the request never read
    got = responses(raw(server, request(server, "POST", "/api/runs", inner, length=MAX_BODY + 1)))
    assert [g[0] for g in got] == [413] and "at most" in json.loads(got[0][2])["error"]
    got = responses(raw(server, request(server, "POST", "/api/runs", inner, length="99999999999999999999")))
    assert [g[0] for g in got] == [413]
    time.sleep(0.3)
    assert runs_with_prompt(server, "smuggled 413") == []


@pytest.mark.parametrize("length", ["-1", "abc", "1e3", "0x10", "-0"])
def test_a_content_length_that_is_not_a_byte_count_is_a_400_and_nothing_more_is_read(ui: Any, length: str) -> None:
    """The issue: with Content-Length -1 the server read until the client closed (300 MB: RSS 228 → 830 MB)."""
    server, _ = ui
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request(server, "POST", "/api/runs", b"", length=length))
        sent, answer = 0, b""
        chunk = b"x" * 65536
        t0 = time.monotonic()
        try:  # keep sending: a server that reads on would take it all; this one answers and hangs up
            while sent < 64 << 20 and time.monotonic() - t0 < 10:
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except (TimeoutError, ConnectionResetError):
            pass
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert sent < 64 << 20, "the server kept reading a body it had no length for"


def test_a_chunked_body_is_cut_off_at_the_limit(ui: Any) -> None:
    from featurewatch.ui.server import MAX_BODY

    server, _ = ui
    head = (f"POST /api/runs HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        sent = 0
        try:
            while sent < 8 * MAX_BODY:
                sock.sendall(b"10000\r\n" + b" " * 0x10000 + b"\r\n")
                sent += 0x10000
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 8 * MAX_BODY


@pytest.mark.parametrize("last_id", ["-1", "-1000000000000", "abc", "1.5", "99999999999999999999", "100000",
                                     "\u00b2", "1_0"])
def test_a_last_event_id_the_run_never_sent_is_a_400(ui: Any, last_id: str) -> None:
    """The issue: a negative Last-Event-ID replayed a run's events; −1e12 streamed without end (69 MB in 5 s)."""
    server, _ = ui
    _, started = call(server, "POST", "/api/runs", {"prompt": PROMPT, "max_new_tokens": 2})
    events(server, started["run_id"])  # let it finish
    t0 = time.monotonic()
    data = raw(server, request(server, "GET", f"/api/runs/{started['run_id']}/events", headers={
        "Last-Event-ID": last_id, "Content-Type": None, "Content-Length": None}))
    got = responses(data)
    assert [g[0] for g in got] == [400] and len(data) < 2000 and time.monotonic() - t0 < 5
    assert "Last-Event-ID" in json.loads(got[0][2])["error"]


def test_a_last_event_id_resumes_after_that_event(ui: Any) -> None:
    server, _ = ui
    _, started = call(server, "POST", "/api/runs", {"prompt": PROMPT, "max_new_tokens": 3})
    every = events(server, started["run_id"])
    path = f"/api/runs/{started['run_id']}/events"
    rest = raw(server, request(server, "GET", path, headers={"Last-Event-ID": "0", "Content-Type": None,
                                                             "Content-Length": None}), timeout=5)
    ids = [int(m) for m in re.findall(rb"^id: (\d+)$", rest, re.M)]
    assert ids == list(range(1, len(every)))
    last = str(len(every) - 1)
    got = responses(raw(server, request(server, "GET", path, headers={"Last-Event-ID": last, "Content-Type": None,
                                                                      "Content-Length": None})))
    assert [g[0] for g in got] == [204]  # all delivered: EventSource stops reconnecting


@pytest.mark.parametrize("path, body, message", [
    ("/api/runs", b'{"prompt": "hello \\ud800 there"}', "lone surrogate (\\ud800) in 'prompt'"),
    ("/api/runs", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
    ("/api/runs", b'{"prompt": "hi", "max_new_tokens": NaN}', "NaN is not a number JSON allows"),
    ("/api/runs", b'{"prompt": "hi", "max_new_tokens": 1' + b"0" * 5000 + b"}", "more than 16 digits"),
    ("/api/steer", b'{"prompt": "hi", "hookpoint": "layers.1", "feature": 1, "value": 1e309}', "not a finite double"),
    ("/api/steer", b'{"prompt": "hi", "hookpoint": "layers.1", "feature": 1, "value": 1e308}', "-1000..1000"),
    ("/api/scores", json.dumps({"text": '{"id": "a", "scores": {"demo": NaN}}\n'}).encode(), "line 1: a bad number"),
    ("/api/scores", json.dumps({"text": '{"id": "a", "scores": {"demo": 1e999}}\n'}).encode(), "line 1: a bad number"),
    ("/api/runs", b'\xff{"prompt": "hi"}', "not UTF-8"),
])
def test_input_that_used_to_be_a_500_is_a_400_naming_the_problem(ui: Any, path: str, body: bytes,
                                                                  message: str) -> None:
    server, _ = ui
    got = responses(raw(server, request(server, "POST", path, body)))
    assert [g[0] for g in got] == [400], got
    answer = json.loads(got[0][2])
    assert message in answer["error"] and answer["status"] == 400


@pytest.mark.parametrize("method, path", [("PUT", "/api/runs"), ("DELETE", "/"), ("BREW", "/api/info"),
                                          ("PATCH", "/api/runs/x/cancel"), ("GET", "/api/runs")])
def test_an_unsupported_method_is_a_json_405(ui: Any, method: str, path: str) -> None:
    server, _ = ui
    got = responses(raw(server, request(server, method, path, b"{}")))
    assert [g[0] for g in got] == [405]
    status, headers, body = got[0]
    assert headers["content-type"] == "application/json" and json.loads(body) == {
        "error": json.loads(body)["error"], "status": 405}
    assert f"{method} {path} is not allowed" in json.loads(body)["error"]


def test_host_and_origin_are_checked_on_every_state_changing_request(ui: Any) -> None:
    server, _ = ui
    own = f"http://127.0.0.1:{server.port}"
    for name in ("127.0.0.1", "localhost", "[::1]"):
        assert call(server, "GET", "/api/info", headers={"Host": f"{name}:{server.port}"})[0] == 200
    status, answer = call(server, "GET", "/api/info", headers={"Host": "evil.example"})
    assert status == 403 and "DNS rebinding" in answer["error"]
    body = {"prompt": "from elsewhere", "max_new_tokens": 1}
    for headers in ({"Origin": "http://127.0.0.1:9"}, {"Origin": "http://evil.example"}, {"Origin": "null"},
                    {"Origin": f"{own}.evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Host": "evil.example", "Origin": "http://evil.example"}):
        status, answer = call(server, "POST", "/api/runs", body, headers=headers)
        assert status == 403 and answer["status"] == 403, (headers, answer)
    assert runs_with_prompt(server, "from elsewhere") == []
    # its own page (same Origin, same-origin fetch) and a client without Origin (curl) are served
    status, started = call(server, "POST", "/api/runs", body, headers={"Origin": own, "Sec-Fetch-Site": "same-origin"})
    assert status == 202
    status, _ = call(server, "POST", f"/api/runs/{started['run_id']}/cancel", headers={"Origin": "http://evil.example"})
    assert status == 403
    assert call(server, "POST", f"/api/runs/{started['run_id']}/cancel")[0] == 200


def test_a_token_guards_the_api_and_the_page_keeps_it_in_a_cookie(ui: Any) -> None:
    from featurewatch.errors import ConfigError
    from featurewatch.ui import serve_ui

    _, monitor = ui
    with pytest.raises(ConfigError, match="needs a token"):
        serve_ui(monitor, host="0.0.0.0", port=0)
    for bad in ("short", "has;a;semicolon-in-it", "plus+signs+in+the+token"):
        with pytest.raises(ConfigError, match="at least 16 characters from"):
            serve_ui(monitor, port=0, token=bad)
    server = serve_ui(monitor, port=0, max_new_tokens=8, token=TOKEN, allowed_hosts=["fw.test"])
    try:
        status, answer = call(server, "GET", "/api/info")
        assert status == 401 and "Authorization: Bearer" in answer["error"]
        assert call(server, "GET", "/api/info", headers={"Authorization": "Bearer wrong-token-0123456789"})[0] == 401
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert call(server, "GET", "/api/info", headers=bearer)[0] == 200
        assert call(server, "GET", "/api/info", headers={**bearer, "Host": f"fw.test:{server.port}"})[0] == 200
        assert call(server, "GET", "/api/info", headers={**bearer, "Host": "evil.example"})[0] == 403
        assert call(server, "POST", "/api/runs", {"prompt": "hi"})[0] == 401
        # a page visit with ?token= sets an HttpOnly, SameSite=Strict cookie and drops the token from the address
        got = responses(raw(server, request(server, "GET", f"/?token={TOKEN}", headers={
            "Content-Type": None, "Content-Length": None, "Connection": "close"})))
        assert got[0][0] == 303 and got[0][1]["location"] == "/"
        cookie = got[0][1]["set-cookie"]
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
        jar = {"Cookie": cookie.split(";")[0]}
        assert call(server, "GET", "/api/info", headers=jar)[0] == 200
        assert call(server, "GET", "/?token=wrong-token-0123456789")[0] == 401
        assert call(server, "GET", "/")[0] == 200  # the page itself is not secret; it asks for the token
    finally:
        server.close()


class Counter(BaseSink):
    """Counts forward passes (and slows each a little, so a run is still going when the test acts)."""

    def __init__(self, delay: float = 0.05) -> None:
        self.n = 0
        self.delay = delay

    def on_forward(self, *, model_name: str, seconds: float, tokens: int) -> None:
        self.n += 1
        time.sleep(self.delay)


@pytest.fixture
def counter(ui: Any) -> Any:
    _, monitor = ui
    sink = Counter()
    monitor.sinks.append(sink)
    yield sink
    monitor.sinks.remove(sink)


def wait_for(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_cancel_stops_the_generation_within_a_decode_step(ui: Any, counter: Counter) -> None:
    server, _ = ui
    _, started = call(server, "POST", "/api/runs", {"prompt": PROMPT, "max_new_tokens": 64})
    run = server.app.run(started["run_id"])
    wait_for(lambda: counter.n >= 3)
    before, t0 = counter.n, time.monotonic()
    status, answer = call(server, "POST", f"/api/runs/{run.id}/cancel")
    after, took = counter.n, time.monotonic() - t0
    assert status == 200 and answer == {"run_id": run.id, "done": True, "cancelled": True}
    print(f"cancel: {after - before} forward pass(es) after it was asked for, answered in {took * 1000:.0f} ms "
          f"(a step takes ≥ {counter.delay * 1000:.0f} ms here)")
    assert after - before <= 2  # the step in flight (and at most one that started as the request came in)
    time.sleep(0.3)
    assert counter.n == after  # nothing more runs
    done = run.events[-1]
    assert done[0] == "done" and done[1]["cancelled"] is True
    # counted as given up, not as a completed generation: no end-of-run verdicts
    assert done[1]["outcome"] == "aborted" and run.session.result(0).outcome == "aborted"
    n_new = sum(run.session.rows[0].completion)
    assert n_new < 10
    # its slot is free at once: a new run starts (not a 429)
    status, again = call(server, "POST", "/api/runs", {"prompt": PROMPT, "max_new_tokens": 2})
    assert status == 202
    events(server, again["run_id"])
    status, answer = call(server, "POST", f"/api/runs/{again['run_id']}/cancel")
    assert status == 200 and answer["cancelled"] is False  # it had ended on its own
    assert server.app.run(again["run_id"]).events[-1][1]["outcome"] == "completed"
    assert call(server, "POST", "/api/runs/nope/cancel")[0] == 404


def test_a_busy_server_says_so_with_a_429(ui: Any, counter: Counter) -> None:
    server, _ = ui
    ids = [call(server, "POST", "/api/runs", {"prompt": PROMPT, "max_new_tokens": 64})[1]["run_id"] for _ in range(2)]
    status, answer = call(server, "POST", "/api/runs", {"prompt": PROMPT, "max_new_tokens": 4})
    assert status == 429 and "busy" in answer["error"] and answer["status"] == 429
    for run_id in ids:
        call(server, "POST", f"/api/runs/{run_id}/cancel")
    status, started = call(server, "POST", "/api/runs", {"prompt": PROMPT, "max_new_tokens": 1})
    assert status == 202
    events(server, started["run_id"])


def test_two_concurrent_runs_see_only_their_own_tokens(ui: Any) -> None:
    server, monitor = ui
    slow = Slow()
    monitor.sinks.append(slow)
    try:
        prompts = ["Tell me about cats and their habits please", "Explain how rivers form in the hills"]
        ids = [call(server, "POST", "/api/runs", {"prompt": p, "max_new_tokens": 16})[1]["run_id"] for p in prompts]
        results: dict[str, Any] = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, events(server, i))) for i in ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        monitor.sinks.remove(slow)
    spans = []
    for run_id, prompt in zip(ids, prompts):
        got = results[run_id]
        tokens = [t for k, d, _ in got if k == "tokens" for t in d["tokens"]]
        session = server.app.run(run_id).session
        assert [t["t"] for t in tokens] == own_tokens(monitor, session)
        assert prompt.split()[2] in "".join(t["t"] for t in tokens)
        assert all(a["run_id"] == run_id for k, a, _ in got if k == "alert")
        stamps = [at for k, _, at in got if k == "tokens"]
        spans.append((stamps[0], stamps[-1]))
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], "the two runs did not overlap"


def test_ui_command_needs_allow_remote_and_a_token_for_a_public_host(tiny_lm_dir: Path, ui_pack: Path, capsys: Any,
                                                                      monkeypatch: Any) -> None:
    from featurewatch.cli import main
    from featurewatch.ui.server import UIServer

    monkeypatch.delenv("FEATUREWATCH_UI_TOKEN", raising=False)
    model = ["--model", str(tiny_lm_dir), "--pack", str(ui_pack)]
    assert main(["ui", "--host", "0.0.0.0", *model]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    # --allow-remote without a token: a clear startup error (the issue: no authentication at all)
    assert main(["ui", "--host", "0.0.0.0", "--port", "0", "--allow-remote", *model]) == 2
    err = capsys.readouterr().err
    assert "--allow-remote needs a token" in err and "--token" in err and "FEATUREWATCH_UI_TOKEN" in err
    assert main(["ui", "--host", "0.0.0.0", "--port", "0", "--allow-remote", "--token", "short", *model]) == 2
    assert "at least 16" in capsys.readouterr().err
    monkeypatch.setattr(UIServer, "serve_forever", lambda self, *a, **k: None)  # start, then return at once
    assert main(["ui", "--host", "0.0.0.0", "--port", "0", "--allow-remote", "--token", TOKEN, *model]) == 0
    err = capsys.readouterr().err
    assert "warning: serving on 0.0.0.0, not loopback" in err and "featurewatch ui: serving http://0.0.0.0:" in err
    assert TOKEN not in err  # the secret is not printed
    monkeypatch.setenv("FEATUREWATCH_UI_TOKEN", TOKEN)  # the environment instead of the flag
    assert main(["ui", "--host", "0.0.0.0", "--port", "0", "--allow-remote", *model]) == 0


def test_ui_on_a_busy_port_fails_before_the_model_loads(tiny_lm_dir: Path, ui_pack: Path, capsys: Any,
                                                        monkeypatch: Any) -> None:
    import featurewatch.cli.ui as ui_cli
    from featurewatch.cli import main

    loaded = []
    monkeypatch.setattr(ui_cli, "build_monitor", lambda *a, **k: loaded.append(1))  # a record, not a stand-in
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        assert main(["ui", "--port", str(port), "--model", str(tiny_lm_dir), "--pack", str(ui_pack)]) == 2
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is already in use" in err and "--port" in err
    assert loaded == [] and time.monotonic() - t0 < 5


def test_ui_without_the_extra_names_the_install(tiny_lm_dir: Path, capsys: Any, monkeypatch: Any) -> None:
    from featurewatch.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the `ui` extra were not installed
    monkeypatch.delitem(sys.modules, "featurewatch.ui.server")
    assert main(["ui", "--port", "0", "--model", str(tiny_lm_dir)]) == 2
    assert "pip install 'featurewatch[ui]'" in capsys.readouterr().err


def readme_block(marker: str) -> str:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    return next(b for b in blocks if marker in b)


def start_cli(script: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], Any, list[str]]:
    """Run a shell script that ends in `featurewatch ui`; wait for its "serving" line."""
    proc = subprocess.Popen(["bash", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        found = re.search(r"serving http://[^ ]+:(\d+)/", line)
        if found:
            port = int(found.group(1))
            return proc, type("Served", (), {"url": f"http://127.0.0.1:{port}/", "port": port}), lines
    proc.wait(30)
    raise AssertionError("featurewatch ui did not start:\n" + "".join(lines))


def stop_cli(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    return err


def test_the_readme_remote_commands_run_as_shown(tiny_lm_dir: Path, ui_pack: Path) -> None:
    """The README's remote block, run by bash as written (plus --port 0 and the tests' tiny model), then with
    --token on the command line."""
    exe = str(Path(sys.executable).parent / "featurewatch")
    extra = f" --port 0 --model {tiny_lm_dir} --pack {ui_pack}"
    lines = [line for line in readme_block("--allow-remote").splitlines() if line.strip()]
    assert any(".venv/bin/featurewatch ui" in line for line in lines)
    script = "\n".join(f"exec {line.replace('.venv/bin/featurewatch', exe)}{extra}"
                       if ".venv/bin/featurewatch" in line else line for line in lines)
    env = {k: v for k, v in os.environ.items() if k != "FEATUREWATCH_UI_TOKEN"}
    proc, served, _ = start_cli(script, env)
    try:
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes().decode().split("\0")
        token = next(kv.split("=", 1)[1] for kv in environ if kv.startswith("FEATUREWATCH_UI_TOKEN="))
        assert len(token) >= 16
        bearer = {"Authorization": f"Bearer {token}"}
        assert call(served, "GET", "/api/info")[0] == 401
        assert call(served, "GET", "/api/info", headers=bearer)[0] == 200
        assert call(served, "GET", "/api/info", headers={**bearer, "Host": f"myhost.lan:{served.port}"})[0] == 200
        assert call(served, "GET", "/api/info", headers={**bearer, "Host": "evil.example"})[0] == 403
        status, started = call(served, "POST", "/api/runs", {"prompt": PROMPT, "max_new_tokens": 2}, headers=bearer)
        assert status == 202
        assert call(served, "POST", f"/api/runs/{started['run_id']}/cancel", headers=bearer)[0] == 200
    finally:
        err = stop_cli(proc)
    assert token not in err and "featurewatch: interrupted" in err
    # `--token "$FEATUREWATCH_UI_TOKEN"` on the command line does the same
    # (a shell variable, not exported: the server gets the token from the flag alone)
    proc, served, _ = start_cli(f'FEATUREWATCH_UI_TOKEN={TOKEN}\nexec {exe} ui --host 0.0.0.0 --allow-remote '
                                f'--allowed-host myhost.lan --token "$FEATUREWATCH_UI_TOKEN"{extra}', env)
    try:
        assert "FEATUREWATCH_UI_TOKEN" not in Path(f"/proc/{proc.pid}/environ").read_text()
        assert call(served, "GET", "/api/info")[0] == 401
        assert call(served, "GET", "/api/info", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    finally:
        stop_cli(proc)


def test_score_token_scores_feed_the_offline_page(ui: Any, tiny_lm_dir: Path, ui_pack: Path, tmp_path: Path) -> None:
    from featurewatch.cli import main

    records = tmp_path / "in.jsonl"
    records.write_text("\n".join(json.dumps({"id": f"r{i}", "messages": [
        {"role": "user", "content": f"Write a note number {i} about the sea and the wind"},
        {"role": "assistant", "content": "The sea was calm and the wind was low all day."}]}) for i in range(3)) + "\n")
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--input", str(records), "--output", str(out), "--token-scores", "--model", str(tiny_lm_dir),
                 "--pack", str(ui_pack)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["tokens"] and {"p", "t", "ph", "x", "s"} <= set(r["tokens"][0]) for r in rows)
    assert any(t["ph"] == "completion" for t in rows[0]["tokens"])
    server, _ = ui
    status, answer = call(server, "POST", "/api/scores", {"text": out.read_text()})
    assert status == 200 and [r["id"] for r in answer["rows"]] == ["r0", "r1", "r2"]
    assert answer["rows"][0]["tokens"] == rows[0]["tokens"]


# --------------------------------------------------------------------------- the page in a real browser
def severe(driver: Driver) -> list[str]:
    return [e["message"] for e in driver.console() if e.get("level") == "SEVERE"]


def open_page(driver: Driver, url: str) -> None:
    driver.get(url)
    driver.wait("return document.body.dataset.ready === '1'", timeout=30)


def rgb(css: str) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in re.findall(r"\d+", css)[:3])
    return r, g, b


def generate_in_page(driver: Driver, prompt: str, max_new_tokens: int = 16) -> str:
    driver.type("#prompt", prompt)
    driver.type("#max-new-tokens", str(max_new_tokens))
    driver.click("#generate")
    return driver.wait("return document.body.dataset.runId", timeout=30)


def test_the_pages_load_without_console_errors(ui: Any, browser: Driver) -> None:
    server, _ = ui
    browser.console()  # drop anything earlier
    for path in ("", "feature/layers.1/1", "detector/demo", "scores"):
        open_page(browser, server.url + path)
        assert severe(browser) == [], path
    open_page(browser, server.url + "detector/demo")
    assert browser.js("return document.querySelectorAll('#thresholds tr').length") == 2
    assert "0.91" in browser.js("return document.getElementById('calibration').textContent")


def test_a_generation_streams_one_shaded_element_per_token_and_its_alert(ui: Any, browser: Driver) -> None:
    server, monitor = ui
    open_page(browser, server.url)
    browser.js("document.getElementById('shade-detector').value = 'demo';")
    run_id = generate_in_page(browser, PROMPT, 24)
    browser.wait("return document.body.dataset.runState === 'done'", timeout=60)
    session = server.app.run(run_id).session
    truth = session.token_scores(0)["demo"]
    cells = browser.js("""return [...document.querySelectorAll('#tokens .tok')].map(e => ({
        pos: +e.dataset.pos, text: e.textContent, score: e.dataset.score === undefined ? null : +e.dataset.score,
        excluded: e.classList.contains('excluded'), unread: e.classList.contains('unread'),
        bg: getComputedStyle(e).backgroundColor}))""")
    read = [c for c in cells if not c["unread"]]
    assert [c["pos"] for c in cells] == list(range(len(cells)))
    assert [c["text"] for c in read] == own_tokens(monitor, session)
    assert len(cells) == len(read) + 1  # the last token: generated, never read
    for c in read:
        if c["excluded"]:
            assert c["score"] is None
            continue
        assert c["score"] == pytest.approx(truth[c["pos"]], abs=1e-4)
        r, _, b = rgb(c["bg"])
        if c["score"] > 0.05:  # threshold 0: above is red, below is blue
            assert r > b, c
        elif c["score"] < -0.05:
            assert b > r, c
    # the alert is on the timeline, at its token, within a second of the monitor firing it
    alert = browser.wait("""const a = [...document.querySelectorAll('#alerts .alert')].find(
        e => e.dataset.detector === 'always' && e.textContent.includes('completion'));
        return a && {pos: +a.dataset.position, fired: +a.dataset.firedAt, shown: +a.dataset.shownAt,
                     text: a.textContent}""")
    fired = next(a for a in session.rows[0].alerts if a.detector == "always" and a.phase == "completion")
    assert alert["fired"] == pytest.approx(fired.fired_at) and alert["pos"] == fired.span[1] - 1
    latency = alert["shown"] - alert["fired"]
    print(f"alert shown {latency * 1000:.0f} ms after the monitor fired it")
    assert 0 <= latency < 1.0
    assert "#1 " in alert["text"]  # the evidence feature, linked to its card
    assert browser.js("return document.querySelectorAll('#track .marker').length") >= 2
    assert browser.js(f"return document.querySelector('#tokens .tok[data-pos=\"{alert['pos']}\"]')"
                      ".classList.contains('alerted')")
    # the token inspector: click a content token, see its features and their shares
    pos = next(c["pos"] for c in read if not c["excluded"])
    browser.click(f'#tokens .tok[data-pos="{pos}"]')
    rows = browser.wait("return document.querySelectorAll('#inspector tr[data-feature]').length")
    assert rows >= 1 and "share of detector score" in browser.js("return document.getElementById('inspector')"
                                                                 ".textContent")
    shot = browser.screenshot(ARTIFACTS / "ui-live.png")
    assert shot.stat().st_size > 10_000


def test_the_feature_card_shows_top_contexts_and_the_steer_control_changes_the_reply(ui: Any,
                                                                                      browser: Driver) -> None:
    server, _ = ui
    open_page(browser, server.url + "feature/layers.1/1")
    contexts = browser.js("return [...document.querySelectorAll('#contexts li')].map(e => "
                          "[e.textContent, e.querySelector('mark') && e.querySelector('mark').textContent])")
    assert contexts == [["the cat sat on the mat", "cat"], ["a black cat", "cat"], ["the dog barked", "dog"]]
    browser.type("#steer-prompt", PROMPT)
    browser.type("#steer-strength", "4")
    browser.click("#steer")
    texts = browser.wait("const s = document.getElementById('steered'), u = document.getElementById('unsteered');"
                         "return s && u && [u.textContent, s.textContent]", timeout=60)
    assert texts[0].split("\n", 1)[1] != texts[1].split("\n", 1)[1]
    browser.screenshot(ARTIFACTS / "ui-feature.png")


def test_bad_input_shows_a_message_on_the_page(ui: Any, browser: Driver) -> None:
    server, _ = ui
    open_page(browser, server.url)
    browser.type("#prompt", "   ")
    browser.click("#generate")
    message = browser.wait("const e = document.getElementById('error'); return !e.hidden && e.textContent")
    assert message == "empty prompt: type some text"
    open_page(browser, server.url + "feature/layers.1/99")
    message = browser.wait("const e = document.getElementById('error'); return !e.hidden && e.textContent")
    assert "out of range" in message


def test_two_tabs_generating_at_once_see_only_their_own_run(ui: Any, browser: Driver) -> None:
    server, monitor = ui
    slow = Slow()
    monitor.sinks.append(slow)
    first = browser.window
    second = browser.new_window()
    try:
        runs = {}
        for handle, prompt in ((first, "Tell me about cats and their habits please"),
                               (second, "Explain how rivers form in the hills")):
            browser.switch(handle)
            open_page(browser, server.url)
            runs[handle] = generate_in_page(browser, prompt, 16)
        for handle in (first, second):
            browser.switch(handle)
            browser.wait("return document.body.dataset.runState === 'done'", timeout=60)
            texts = browser.js("return [...document.querySelectorAll('#tokens .tok:not(.unread)')]"
                               ".map(e => e.textContent)")
            assert texts == own_tokens(monitor, server.app.run(runs[handle]).session)
    finally:
        monitor.sinks.remove(slow)
        browser.switch(second)
        browser.cmd("DELETE", "/window")
        browser.switch(first)


def test_the_offline_page_shades_a_dropped_score_file(ui: Any, browser: Driver, tmp_path: Path) -> None:
    server, _ = ui
    row = {"id": "only", "scores": {"demo": 0.5, "always": 0.5}, "phase_scores": {}, "alerts": [],
           "tokens": [{"p": 0, "t": "hot", "ph": "prompt", "x": False, "s": {"demo": 0.9}},
                      {"p": 1, "t": " cold", "ph": "prompt", "x": False, "s": {"demo": -0.9}}]}
    path = tmp_path / "scores.jsonl"
    path.write_text(json.dumps(row) + "\n")
    open_page(browser, server.url + "scores")
    browser.cmd("POST", f"/element/{browser.find('#score-file')[ELEMENT]}/value",
                {"text": str(path)})
    browser.wait("return document.querySelectorAll('#score-rows .tok').length === 2")
    browser.js("const s = document.getElementById('score-sort'); s.value = 'demo';"
               "s.dispatchEvent(new Event('change'));")  # shade by demo, the detector these tokens carry
    colours = browser.wait("const t = [...document.querySelectorAll('#score-rows .tok')];"
                           "return t.length === 2 && t.map(e => getComputedStyle(e).backgroundColor)")
    hot, cold = rgb(colours[0]), rgb(colours[1])
    assert hot[0] > hot[2] and cold[2] > cold[0]


# --------------------------------------------------------------------------- the page's rules, in the browser
class OtherOrigin:
    """Pages on another local origin (another port of 127.0.0.1), served by the same real stack."""

    def __init__(self, pages: dict[str, str]) -> None:
        import uvicorn
        from starlette.applications import Starlette
        from starlette.responses import HTMLResponse
        from starlette.routing import Route

        from featurewatch.ui.server import bind_socket

        def page(html: str) -> Any:
            async def endpoint(request: Any) -> HTMLResponse:
                return HTMLResponse(html)
            return endpoint

        self.socket = bind_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}/"
        app = Starlette(routes=[Route(f"/{name}", page(html)) for name, html in pages.items()])
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()


def test_pages_on_another_origin_cannot_start_a_run(ui: Any, browser: Driver, monkeypatch: Any) -> None:
    """The issue: a page on another local origin started a generation with a plain form or a no-cors fetch
    (the server log showed 415 then 202: the refused request's body was read as a second request)."""
    server, _ = ui
    target = f"{server.url}api/runs"
    inner_body = json.dumps({"prompt": "smuggled from a page", "max_new_tokens": 1})
    inner = (f"POST /api/runs HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
             f"Content-Length: {len(inner_body)}\r\n\r\n{inner_body}")
    form = (f'<form id="f" method="POST" action="{target}" enctype="text/plain">'
            '<input name=\'{"prompt": "form attack", "max_new_tokens": 1, "x": "\' value=\'"}\'></form>'
            '<script>document.getElementById("f").submit()</script>')
    smuggling_form = (f'<form id="f" method="POST" action="{target}" enctype="text/plain">'
                      f'<textarea name="x">{json.dumps(inner)[1:-1]}</textarea></form>'
                      '<script>const t = document.querySelector("textarea");'
                      't.value = JSON.parse(\'"\' + t.value + \'"\'); document.getElementById("f").submit()</script>')
    fetches = f"""<script>
        const inner = {json.dumps(inner)};
        Promise.allSettled([
          fetch({json.dumps(target)}, {{method: "POST", mode: "no-cors", body: "\\r\\n" + inner}}),
          fetch({json.dumps(target)}, {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}},
                body: JSON.stringify({{prompt: "no-cors attack", max_new_tokens: 1}})}}),
          fetch({json.dumps(target)}, {{method: "POST", headers: {{"Content-Type": "application/json"}},
                body: JSON.stringify({{prompt: "cors attack", max_new_tokens: 1}})}}),
        ]).then((r) => {{ document.title = "sent " + r.map((x) => x.status).join(","); }});
        </script>"""
    refused: list[tuple[str, str, int]] = []
    guard = server.asgi
    real = guard.refusal

    def recording(scope: Any) -> Any:  # the real check, with a record of what it refused
        answer = real(scope)
        if answer is not None:
            refused.append((scope["method"], scope["path"], answer.status_code))
        return answer

    monkeypatch.setattr(guard, "refusal", recording)
    other = OtherOrigin({"form": form, "smuggle": smuggling_form, "fetch": fetches})
    before = len(server.app.runs)
    try:
        for name in ("form", "smuggle"):
            browser.get(other.url + name)
            text = browser.wait("return location.href.startsWith(arguments[0]) && document.body.innerText",
                                server.url, timeout=30)
            assert "another origin" in text and "403" in text  # the form landed on the refusal
        browser.get(other.url + "fetch")
        title = browser.wait("return document.title.startsWith('sent') && document.title", timeout=30)
        assert title.endswith(",rejected"), title  # the CORS one fails its preflight (OPTIONS: 405, no CORS headers)
        time.sleep(0.5)
    finally:
        other.close()
    assert len(server.app.runs) == before
    for prompt in ("form attack", "smuggled from a page", "no-cors attack", "cors attack"):
        assert runs_with_prompt(server, prompt) == []
    assert refused.count(("POST", "/api/runs", 403)) >= 4, refused  # two forms, two no-cors fetches


def test_generate_again_cancels_the_running_generation(ui: Any, browser: Driver, counter: Counter) -> None:
    server, monitor = ui
    open_page(browser, server.url)
    first = generate_in_page(browser, PROMPT, 64)
    browser.wait("return document.querySelectorAll('#tokens .tok.completion').length >= 2", timeout=30)
    assert browser.js("return !document.getElementById('stop').hidden")
    second = generate_in_page(browser, "Explain how rivers form in the hills", 4)
    second = browser.wait("return document.body.dataset.runId !== arguments[0] && document.body.dataset.runId",
                          first, timeout=30)
    browser.wait("return document.body.dataset.runState === 'done'", timeout=60)
    old = server.app.run(first)
    assert old.done and old.cancelled and sum(old.session.rows[0].completion) < 32
    texts = browser.js("return [...document.querySelectorAll('#tokens .tok:not(.unread)')].map(e => e.textContent)")
    assert texts == own_tokens(monitor, server.app.run(second).session)
    assert browser.js("return document.getElementById('stop').hidden")


def test_the_stop_button_ends_the_run(ui: Any, browser: Driver, counter: Counter) -> None:
    server, _ = ui
    open_page(browser, server.url)
    run_id = generate_in_page(browser, PROMPT, 64)
    browser.wait("return document.querySelectorAll('#tokens .tok.completion').length >= 2", timeout=30)
    browser.click("#stop")
    browser.wait("return document.body.dataset.runState === 'stopped'", timeout=30)
    assert server.app.run(run_id).cancelled
    assert browser.js("return document.getElementById('status').textContent").startswith("stopped:")


def test_a_busy_server_says_so_and_the_page_recovers(ui: Any, browser: Driver, counter: Counter) -> None:
    server, _ = ui
    open_page(browser, server.url)
    busy = [call(server, "POST", "/api/runs", {"prompt": PROMPT, "max_new_tokens": 64})[1]["run_id"]
            for _ in range(2)]
    browser.type("#prompt", PROMPT)
    browser.type("#max-new-tokens", "4")
    browser.click("#generate")
    message = browser.wait("const e = document.getElementById('error'); return !e.hidden && e.textContent")
    assert "busy" in message and browser.js("return document.body.dataset.runState") == "busy"
    assert not browser.js("return document.getElementById('generate').disabled")
    for run_id in busy:
        call(server, "POST", f"/api/runs/{run_id}/cancel")
    browser.click("#generate")
    browser.wait("return document.body.dataset.runState === 'done'", timeout=60)
    assert browser.js("return document.getElementById('error').hidden")


@pytest.mark.parametrize("path", ["feature/%E0%A4%A/1", "detector/%ZZ", "feature/%"])
def test_a_malformed_percent_in_the_address_shows_a_message(ui: Any, browser: Driver, path: str) -> None:
    server, _ = ui
    open_page(browser, server.url + path)  # the page reaches "ready" instead of stopping blank
    message = browser.wait("const e = document.getElementById('error'); return !e.hidden && e.textContent")
    assert "not valid" in message and "%-escape" in message
    assert browser.js("return !document.getElementById('view-live').hidden")
    browser.get(server.url + "%")  # not a page at all: the server's 404 says so
    assert "no page /%" in browser.js("return document.body.innerText")


def test_the_page_behind_a_token_asks_for_it_then_works_from_its_cookie(ui: Any, browser: Driver) -> None:
    from featurewatch.ui import serve_ui

    _, monitor = ui
    server = serve_ui(monitor, port=0, max_new_tokens=8, token=TOKEN)
    try:
        open_page(browser, server.url)  # no token yet: the page says what to do
        message = browser.wait("const e = document.getElementById('error'); return !e.hidden && e.textContent")
        assert "needs its token" in message and "?token=" in message
        open_page(browser, f"{server.url}?token={TOKEN}")  # the cookie, then the address without the token
        assert browser.js("return location.href") == server.url
        assert browser.js("return document.getElementById('error').hidden")
        run_id = generate_in_page(browser, PROMPT, 4)  # fetch and EventSource carry the cookie
        browser.wait("return document.body.dataset.runState === 'done'", timeout=60)
        assert server.app.run(run_id).done
        assert "featurewatch_token" not in browser.js("return document.cookie")  # HttpOnly
    finally:
        browser.cmd("DELETE", "/cookie")
        server.close()
