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
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from _browser import ELEMENT, Driver, find_chrome

from conftest import make_pack
from featurewatch.sinks import BaseSink

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("FEATUREWATCH_ARTIFACTS", ROOT / ".test-artifacts"))
PROMPT = "Write a short note about the weather in the mountains today"


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
    from featurewatch.monitor import Monitor
    from featurewatch.ui import serve_ui

    loaded = load_model(str(tiny_lm_dir))
    monitor = Monitor(loaded.model, loaded.tokenizer, pack=ui_pack, model_name="tiny")
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
    ("POST", "/api/scores", {"text": "{\"id\": 1}\n"}, 400, "line 1 is not a featurewatch score line"),
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


def test_ui_command_needs_allow_remote_for_a_public_host(tiny_lm_dir: Path, ui_pack: Path, capsys: Any,
                                                         monkeypatch: Any) -> None:
    from featurewatch.cli import main
    from featurewatch.ui.server import UIServer

    assert main(["ui", "--host", "0.0.0.0", "--model", str(tiny_lm_dir), "--pack", str(ui_pack)]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    monkeypatch.setattr(UIServer, "serve_forever", lambda self, *a, **k: None)  # start, then return at once
    assert main(["ui", "--host", "0.0.0.0", "--port", "0", "--allow-remote", "--model", str(tiny_lm_dir),
                 "--pack", str(ui_pack)]) == 0
    err = capsys.readouterr().err
    assert "warning: serving on 0.0.0.0, not loopback" in err and "featurewatch ui: serving http://0.0.0.0:" in err


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
