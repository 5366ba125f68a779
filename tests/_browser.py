"""A minimal WebDriver client (W3C protocol over urllib) for Debian's headless Chromium + chromedriver.

No selenium: the handful of commands the UI tests need — open a page, find
elements, click, type, run a script, read the browser's console log, take a
screenshot — are plain HTTP calls to ``chromedriver``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


def find_chrome() -> tuple[str, str] | None:
    """``(chromium, chromedriver)`` paths, or None when either is missing."""
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (chrome, driver) if chrome and driver else None


class WebDriverError(RuntimeError):
    pass


class Driver:
    """One chromedriver process and one headless browser session."""

    def __init__(self, chrome: str, driver: str, *, width: int = 1280, height: int = 900) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                self._call("GET", "/status")
                break
            except (urllib.error.URLError, ConnectionError, WebDriverError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.proc.kill()
                    raise WebDriverError("chromedriver did not start") from None
                time.sleep(0.1)
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update"]
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": {"binary": chrome, "args": args},
            "goog:loggingPrefs": {"browser": "ALL"}}}}
        try:
            self.session = self._call("POST", "/session", caps)["sessionId"]
        except BaseException:
            self.proc.kill()
            raise

    # ------------------------------------------------------------------ protocol
    def _call(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read() or b"null").get("value")
        except urllib.error.HTTPError as exc:
            try:
                value = json.loads(exc.read()).get("value", {})
            except ValueError:
                value = {}
            raise WebDriverError(f"{method} {path}: {value.get('error')}: {value.get('message', '')[:500]}") from None

    def cmd(self, method: str, path: str, body: Any = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    # ------------------------------------------------------------------ commands
    def get(self, url: str) -> None:
        self.cmd("POST", "/url", {"url": url})

    def js(self, script: str, *args: Any) -> Any:
        """Run a function body (``return ...``) in the page; elements come back as WebDriver references."""
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css: str) -> dict[str, str]:
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})

    def click(self, css: str) -> None:
        self.cmd("POST", f"/element/{self.find(css)[ELEMENT]}/click", {})

    def type(self, css: str, text: str) -> None:
        el = self.find(css)[ELEMENT]
        self.cmd("POST", f"/element/{el}/clear", {})
        self.cmd("POST", f"/element/{el}/value", {"text": text})

    def wait(self, script: str, *args: Any, timeout: float = 60.0, interval: float = 0.05) -> Any:
        """Poll ``script`` (a function body) until it returns something truthy; return that."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout}s for: {script}")
            time.sleep(interval)

    def console(self) -> list[dict[str, Any]]:
        """Browser console entries since the last call (chromedriver's log endpoint)."""
        return self.cmd("POST", "/se/log", {"type": "browser"}) or []

    def new_window(self) -> str:
        handle = self.cmd("POST", "/window/new", {"type": "tab"})["handle"]
        return handle

    def switch(self, handle: str) -> None:
        self.cmd("POST", "/window", {"handle": handle})

    @property
    def window(self) -> str:
        return self.cmd("GET", "/window")

    def screenshot(self, path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(base64.b64decode(self.cmd("GET", "/screenshot")))
        return p

    def quit(self) -> None:
        with contextlib.suppress(Exception):  # the browser may be gone already
            self.cmd("DELETE", "")
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
