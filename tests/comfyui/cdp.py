"""A minimal Chrome DevTools Protocol client over aiohttp (which ComfyUI itself requires):
start headless Chromium, evaluate JavaScript in a page, take screenshots. No other package.

``find_chromium()`` returns None when no Chromium is installed; callers skip then.
"""

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


def find_chromium():
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit if os.path.isfile(explicit) else None
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """Headless Chromium with a fresh profile; ``page()`` gives a CDP session on its tab."""

    def __init__(self, binary, width=1600, height=1000, log_path=None):
        self.profile = tempfile.mkdtemp(prefix="lora_lab_chromium_")
        self.log = open(log_path or os.path.join(self.profile, "chromium.log"), "wb")
        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
             "--remote-debugging-address=127.0.0.1", f"--window-size={width},{height}",
             "about:blank"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + 30
        while not (os.path.exists(port_file) and open(port_file).read().count("\n") >= 1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("Chromium did not start (see its log in the test output)")
            time.sleep(0.1)
        self.port = int(open(port_file).read().split()[0])

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """One CDP session on the browser's first tab (use as ``async with Page(browser)``)."""

    def __init__(self, browser):
        self.browser = browser
        self.ids = itertools.count(1)
        self.console = []  # (level, text) of console messages and page exceptions

    async def __aenter__(self):
        import aiohttp

        self.http = aiohttp.ClientSession()
        async with self.http.get(f"http://127.0.0.1:{self.browser.port}/json/list") as r:
            targets = await r.json(content_type=None)
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        self.ws = await self.http.ws_connect(url, max_msg_size=0)
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        return self

    async def __aexit__(self, *exc):
        await self.ws.close()
        await self.http.close()

    async def send(self, method, timeout=60, **params):
        mid = next(self.ids)
        await self.ws.send_str(json.dumps({"id": mid, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), max(0.1, deadline - time.monotonic()))
            if msg.type != 1:  # aiohttp.WSMsgType.TEXT
                raise RuntimeError(f"DevTools connection closed: {msg!r}")
            data = json.loads(msg.data)
            if data.get("id") == mid:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data.get("result", {})
            self._event(data)

    def _event(self, data):
        method, params = data.get("method"), data.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self.console.append((params["type"], text))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.console.append(("exception", details.get("exception", {}).get(
                "description", details.get("text", ""))))

    async def evaluate(self, expression, timeout=60):
        """The JSON value of a JavaScript expression (awaited if it is a promise)."""
        result = await self.send("Runtime.evaluate", timeout=timeout, expression=expression,
                                 awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            d = result["exceptionDetails"]
            raise RuntimeError("JavaScript error: " + d.get("exception", {}).get(
                "description", d.get("text", "")))
        return result["result"].get("value")

    async def wait_for(self, expression, timeout=60, interval=0.25):
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout} s waiting for: {expression}")
            await asyncio.sleep(interval)

    async def navigate(self, url):
        await self.send("Page.navigate", url=url)

    async def screenshot(self, path):
        data = await self.send("Page.captureScreenshot", format="png")
        with open(path, "wb") as f:
            f.write(base64.b64decode(data["data"]))
        return path
