"""The official ``centrifuge`` npm SDK (centrifuge-js 5.x) against a real ``tidegate serve``.

* Under Node (tests/js/node_client.mjs, ``ws`` as the WebSocket): JSON and protobuf clients
  subscribe to ``news``; the test publishes through the server HTTP API and checks that the
  SDK delivered exactly the published data.
* In headless Chromium (Debian's /usr/bin/chromium driven by playwright-core from
  tests/js/browser_driver.mjs): tests/js/browser.html, served from a loopback http.server on
  another port, loads the SDK's browser bundle and connects cross-origin; publications land
  in ``window.received``. A gateway whose ``allowed_origins`` excludes the page refuses the
  page's WebSocket: the SDK reports transport errors and the page gets nothing, while a
  Node client (no Origin header) on the same gateway does get the publication.

Nothing here skips: Node packages are installed with ``npm ci`` when missing, and a missing
node/npm/chromium fails with the command that installs it (``bash scripts/system-deps.sh``,
which ``make test`` runs first).
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import cent
import pytest

from conftest import ROOT, free_port
from tidegate.gateway.auth import encode_hs256

JS = ROOT / "tests" / "js"
CHROMIUM = Path("/usr/bin/chromium")
CONFIG = ROOT / "config" / "example.toml"
SECRET = "dev-only-secret-change-me"
API_KEY = "dev-only-api-key-change-me"
JS_PACKAGES = ("centrifuge", "playwright-core", "ws")
INSTALL_HINT = "run `bash scripts/system-deps.sh` (as root; `make test` does it first)"

pytestmark = pytest.mark.timeout(150)

Event = dict[str, Any]


# --- installation ----------------------------------------------------------------------


def _installed_matches_lock() -> bool:
    """Every package of package-lock.json is in node_modules at the locked version."""
    lock = json.loads((JS / "package-lock.json").read_text())
    for key, meta in lock.get("packages", {}).items():
        if not key or meta.get("optional") or meta.get("dev"):
            continue
        pkg = JS / key / "package.json"
        if not pkg.is_file() or json.loads(pkg.read_text()).get("version") != meta.get("version"):
            return False
    return True


@pytest.fixture(scope="session")
def js_env() -> dict[str, str]:
    """node, npm and chromium present; tests/js/node_modules as package-lock.json says."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: {INSTALL_HINT}", pytrace=False)
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} not found: {INSTALL_HINT}", pytrace=False)
    env = {**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1", "NO_UPDATE_NOTIFIER": "1"}
    # one installer at a time when several runs share this tree
    with open(Path(tempfile.gettempdir()) / "tidegate-js-npm-ci.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _installed_matches_lock():
            res = subprocess.run(
                ["npm", "ci", "--no-audit", "--no-fund"], cwd=JS, env=env,
                capture_output=True, text=True, timeout=600,
            )
            if res.returncode != 0 or not _installed_matches_lock():
                pytest.fail(f"`npm ci` in {JS} failed ({res.returncode}):\n"
                            f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}", pytrace=False)
    return env


# --- processes that print JSON lines -----------------------------------------------------


class JsonLines:
    """A subprocess whose stdout is JSON lines, read by a thread into a queue."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.cmd = cmd
        self.events: list[Event] = []
        self._q: queue.Queue[Event | None] = queue.Queue()
        self._stderr = open(log, "w")
        self._log = log
        self.proc = subprocess.Popen(cmd, cwd=JS, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                ev = {"event": "noise", "text": line}
            self._q.put(ev if isinstance(ev, dict) else {"event": "noise", "text": line})
        self._q.put(None)

    def describe(self) -> str:
        self._stderr.flush()
        lines = "\n".join(json.dumps(e) for e in self.events)
        return f"{' '.join(self.cmd[:2])}: events so far:\n{lines}\nstderr:\n{self._log.read_text()[-4000:]}"

    def expect(self, pred: Callable[[Event], bool], what: str, timeout: float = 30.0) -> Event:
        """The next event (past or future) matching ``pred``; fails after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events:
                if pred(ev) and not ev.get("_taken"):
                    ev["_taken"] = True
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {timeout}s; {self.describe()}")
            try:
                ev = self._q.get(timeout=left)
            except queue.Empty:
                continue
            if ev is None:
                self._q.put(None)  # keep reporting EOF
                if self.proc.poll() is None:
                    self.proc.wait(5)
                raise AssertionError(f"process exited ({self.proc.returncode}) before {what}; "
                                     f"{self.describe()}")
            self.events.append(ev)

    def event(self, name: str, timeout: float = 30.0, **match: Any) -> Event:
        return self.expect(
            lambda e: e.get("event") == name and all(e.get(k) == v for k, v in match.items()),
            f"{name!r} event" + (f" with {match}" if match else ""), timeout)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"process still running after {timeout}s; {self.describe()}") from exc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        self._stderr.close()


@pytest.fixture
def spawn(js_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., JsonLines]]:
    started: list[JsonLines] = []

    def start(script: str, *args: str) -> JsonLines:
        p = JsonLines(["node", str(JS / script), *args], js_env,
                      tmp_path / f"{Path(script).stem}-{len(started)}.stderr")
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


# --- servers ------------------------------------------------------------------------------


class Gateway:
    def __init__(self, srv: Any) -> None:
        self.srv = srv
        self.ws_url = f"ws://127.0.0.1:{srv.port}/connection/websocket"
        self.api = cent.Client(f"http://127.0.0.1:{srv.port}/api", API_KEY, timeout=10)

    def publish(self, channel: str, data: Any) -> Any:
        return self.api.publish(cent.PublishRequest(channel=channel, data=data))


@pytest.fixture
def gateway(serve: Any) -> Iterator[Callable[..., Gateway]]:
    """Starts ``tidegate serve --app gateway`` with a config; closes the API clients first
    (an idle keep-alive API connection would hold up the server's graceful stop)."""
    started: list[Gateway] = []

    def start(config: Path = CONFIG) -> Gateway:
        srv = serve("--config", str(config), "--tcp-port", str(free_port()), "--workers", "2",
                    app="gateway")
        started.append(Gateway(srv))
        return started[-1]

    yield start
    for gw in started:
        gw.api.close()


def token(sub: str) -> str:
    return encode_hs256({"sub": sub, "exp": int(time.time()) + 3600}, SECRET)


@pytest.fixture
def page_server() -> Iterator[str]:
    """tests/js over HTTP on loopback (its own port: the page's Origin differs from the WS)."""
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(JS)))
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    t.join(10)


PUBLICATIONS = [
    {"text": "first", "n": 1},
    {"text": "héllo wörld ✓", "nested": {"list": [1, 2.5, None, True], "empty": {}}},
    ["a bare", "list", 3],
]


# --- Node ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "protobuf"])
def test_node_sdk_receives_api_publications(gateway: Any, spawn: Any, fmt: str) -> None:
    gw = gateway()
    client = spawn("node_client.mjs", "--url", gw.ws_url, "--token", token(f"node-{fmt}"),
                   "--channel", "news", "--count", str(len(PUBLICATIONS)),
                   "--timeout", "60", "--format", fmt)
    client.event("connected")
    client.event("subscribed", channel="news")

    offsets = [gw.publish("news", data).offset for data in PUBLICATIONS]

    pubs = [client.event("publication") for _ in PUBLICATIONS]
    client.event("done")
    assert client.wait() == 0, client.describe()
    assert [p["data"] for p in pubs] == PUBLICATIONS
    assert {p["channel"] for p in pubs} == {"news"}
    # protobuf delivers raw bytes (Uint8Array), JSON delivers parsed values
    assert {p["binary"] for p in pubs} == {fmt == "protobuf"}
    assert [p["offset"] for p in pubs] == offsets
    kinds = [e["event"] for e in client.events]
    assert kinds.count("publication") == len(PUBLICATIONS), client.describe()
    assert not {"error", "sub_error"} & set(kinds), client.describe()


# --- headless Chromium --------------------------------------------------------------------


def open_page(spawn: Any, tmp_path: Path, page_url: str, gw: Gateway, sub: str,
              fmt: str = "json") -> JsonLines:
    query = urlencode({"url": gw.ws_url, "token": token(sub), "channel": "news", "format": fmt})
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    browser = spawn("browser_driver.mjs", "--page", f"{page_url}/browser.html?{query}",
                    "--user-data-dir", profile, "--chromium", str(CHROMIUM), "--timeout", "90")
    loaded = browser.event("loaded", timeout=60)
    assert loaded["origin"] == page_url
    return browser


def finish_page(browser: JsonLines) -> Event:
    browser.send("finish")
    final = browser.event("final")
    assert browser.wait() == 0, browser.describe()
    assert final["timeout"] is False
    assert not [e for e in browser.events if e["event"] in ("pageerror", "load_failed")], \
        browser.describe()
    return final


@pytest.mark.parametrize("fmt", ["json", "protobuf"])
def test_chromium_page_receives_api_publications(gateway: Any, spawn: Any, page_server: str,
                                                 tmp_path: Path, fmt: str) -> None:
    gw = gateway()
    browser = open_page(spawn, tmp_path, page_server, gw, f"browser-{fmt}", fmt)
    assert browser.event("connected")["transport"] == "websocket"
    browser.event("subscribed", channel="news")

    for data in PUBLICATIONS:
        gw.publish("news", data)
    pubs = [browser.event("publication") for _ in PUBLICATIONS]
    final = finish_page(browser)

    assert [p["data"] for p in pubs] == PUBLICATIONS
    assert {p["binary"] for p in pubs} == {fmt == "protobuf"}
    assert final["received"] == PUBLICATIONS
    assert final["state"] == "connected"


def test_chromium_page_from_disallowed_origin_is_refused(gateway: Any, spawn: Any,
                                                         page_server: str, tmp_path: Path) -> None:
    text = CONFIG.read_text()
    narrowed = "\n".join('allowed_origins = ["https://example.com"]'
                         if line.startswith("allowed_origins") else line
                         for line in text.splitlines())
    assert narrowed != text
    config = tmp_path / "narrow-origins.toml"
    config.write_text(narrowed + "\n")
    gw = gateway(config)

    # control: a Node client sends no Origin header, so the same gateway lets it in
    control = spawn("node_client.mjs", "--url", gw.ws_url, "--token", token("control"),
                    "--channel", "news", "--count", "1", "--timeout", "60")
    control.event("subscribed", channel="news")

    browser = open_page(spawn, tmp_path, page_server, gw, "browser-refused")
    # the handshake is answered 403 (Chromium logs it); the SDK reports a transport error
    # and keeps retrying (still "connecting": refusals are not terminal for it)
    browser.expect(lambda e: e["event"] == "console" and "403" in e.get("text", ""),
                   "Chromium's report of the 403 handshake response")
    browser.event("error", type="transport")
    browser.event("error", type="transport")

    gw.publish("news", {"text": "not for the refused page"})
    assert control.event("publication")["data"] == {"text": "not for the refused page"}
    assert control.wait() == 0, control.describe()

    final = finish_page(browser)
    assert final["received"] == []
    assert final["state"] == "connecting"
    seen = {e["event"] for e in browser.events}
    assert not seen & {"connected", "subscribed", "publication"}, browser.describe()
