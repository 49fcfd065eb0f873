"""Headless Chromium for the tests that check pages as a browser shows them (the report, the
DVC plots): `render` loads a page and returns its images, console errors and requests."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe).

    Chromium reads NUL-terminated JSON commands on fd 3 and writes replies and events on fd 4;
    no port, no websocket library, no extra package.
    """

    def __init__(self, profile: Path) -> None:
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()

        def move_fds() -> None:  # in the child: put the pipe ends on fds 3 and 4
            a, b = os.dup(cmd_r), os.dup(res_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--host-resolver-rules=MAP * ~NOTFOUND",  # belt and braces: nothing resolves
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        self._log = (profile.parent / "chromium.log").open("wb")
        self.proc = subprocess.Popen(
            [str(CHROMIUM), *flags],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            preexec_fn=move_fds,
            close_fds=False,  # fds 3 and 4 must survive exec; every other fd is CLOEXEC
        )
        os.close(cmd_r)
        os.close(res_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, params: dict[str, Any] | None = None, session: str = "") -> Any:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        ident = self._id
        reply = self.wait(lambda m: m.get("id") == ident)
        if "error" in reply:
            raise RuntimeError(f"{method} failed: {reply['error']}")
        return reply["result"]

    def wait(self, matches: Any, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                message = json.loads(raw)
                if matches(message):
                    return message
                self.events.append(message)
            ready, _, _ = select.select(
                [self._res_r], [], [], max(0.0, deadline - time.monotonic())
            )
            if not ready:
                raise TimeoutError(f"no answer from Chromium within {timeout} s")
            chunk = os.read(self._res_r, 1 << 20)
            if not chunk:
                raise EOFError("Chromium closed the DevTools pipe (crashed?)")
            self._buf += chunk

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.proc.wait(timeout=10)
        except (OSError, RuntimeError, TimeoutError, EOFError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._cmd_w)
            os.close(self._res_r)
            self._log.close()


def render(page: Path, profile: Path) -> dict[str, Any]:
    """Load `page` in headless Chromium; return its images, console errors and requests.

    - console errors: `Runtime.consoleAPICalled` of type error/assert, uncaught exceptions
      (`Runtime.exceptionThrown`) and browser log entries of level error (`Log.entryAdded`:
      failed loads, CSP violations);
    - broken images: after the load event, each <img> is decoded with `img.decode()`; those
      that reject or have naturalWidth 0 are broken;
    - requests: every URL the page asked for other than the page itself and data: URIs
      (`Network.requestWillBeSent`), i.e. anything that would need the network or another file.
    """
    browser = Chromium(profile)
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Runtime", "Log", "Page", "Network"):
            browser.call(f"{domain}.enable", session=session)
        url = page.resolve().as_uri()
        browser.call("Page.navigate", {"url": url}, session=session)
        browser.wait(lambda m: m.get("method") == "Page.loadEventFired")
        check = """Promise.all([...document.images].map(img => img.decode().then(
            () => img.naturalWidth > 0 ? null : img.alt, () => img.alt)))
          .then(r => ({n_images: r.length, broken: r.filter(x => x !== null)}))"""
        result = browser.call(
            "Runtime.evaluate",
            {"expression": check, "awaitPromise": True, "returnByValue": True},
            session=session,
        )["result"]["value"]
    finally:
        browser.close()
    errors, requests = [], []
    for event in browser.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            errors.append(" ".join(str(a.get("value")) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            errors.append(params["exceptionDetails"].get("text", "exception"))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            errors.append(params["entry"]["text"])
        elif method == "Network.requestWillBeSent":
            requested = params["request"]["url"]
            if requested != url and not requested.startswith("data:"):
                requests.append(requested)
    return {**result, "errors": errors, "requests": requests}


def require_chromium() -> None:
    if CHROMIUM.exists():
        return
    reason = f"{CHROMIUM} is absent; install it with `apt-get install -y chromium`"
    if os.environ.get("MISALIGN_REQUIRE_CHROMIUM") == "1":
        pytest.fail(f"MISALIGN_REQUIRE_CHROMIUM=1 but {reason}")
    pytest.skip(reason)
