"""Headless Chromium through the DevTools protocol: load the viewer's page, take screenshots.

What a person sees, checked without one: the tests load ``fourdgen view``'s page, and
``tools/viewer_screenshot.py`` takes the README's picture. WebGL runs on SwiftShader (software) so
no GPU is needed. The DevTools websocket is spoken with ``websockets`` (a viser dependency).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from websockets.sync.client import connect

BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Root (CI, containers) needs --no-sandbox; WebGL falls back to SwiftShader only when allowed.
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
)


def find_chromium() -> str | None:
    """The path of a Chromium/Chrome binary on PATH, or None."""
    return next((p for p in map(shutil.which, BINARIES) if p), None)


class HeadlessChromium:
    """One headless browser with one page. ``with HeadlessChromium() as b: b.goto(url); b.screenshot()``."""

    def __init__(self, width: int = 960, height: int = 640, binary: str | None = None, timeout: float = 30.0):
        binary = binary or find_chromium()
        if binary is None:
            raise FileNotFoundError(f"no Chromium found on PATH (looked for {', '.join(BINARIES)})")
        self.width, self.height, self.timeout = width, height, timeout
        self._profile = tempfile.TemporaryDirectory(prefix="fourdgen-chromium-")
        self._proc = subprocess.Popen(
            [
                binary,
                *FLAGS,
                f"--window-size={width},{height}",
                "--remote-debugging-port=0",
                f"--user-data-dir={self._profile.name}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._ws = None
        try:
            self._port = self._devtools_port()
        except BaseException:
            self.close()
            raise
        self._id = 0

    def _devtools_port(self) -> int:
        """Chromium writes the port it picked to DevToolsActivePort in its profile."""
        file, end = Path(self._profile.name) / "DevToolsActivePort", time.monotonic() + self.timeout
        while time.monotonic() < end:
            if self._proc.poll() is not None:
                raise RuntimeError(f"Chromium exited at start (code {self._proc.returncode})")
            if file.is_file() and file.read_text().strip():
                return int(file.read_text().split()[0])
            time.sleep(0.05)
        raise TimeoutError("Chromium did not open its DevTools port")

    def send(self, method: str, **params) -> dict:
        """One DevTools command; its result (events in between are dropped)."""
        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        end = time.monotonic() + self.timeout
        while True:
            msg = json.loads(self._ws.recv(timeout=max(0.1, end - time.monotonic())))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"DevTools {method}: {msg['error']}")
                return msg.get("result", {})

    def goto(self, url: str) -> None:
        """Open ``url`` in a new tab and drive that one. (Navigating the first tab there swaps its
        renderer process, which detaches the DevTools session.)"""
        if self._ws is not None:
            self._ws.close()
        base = f"http://127.0.0.1:{self._port}/json"
        req = urllib.request.Request(f"{base}/new?{url}", method="PUT")
        page = json.loads(urllib.request.urlopen(req, timeout=10).read())
        self._ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=self.height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def evaluate(self, expression: str):
        """A JavaScript expression's value in the page."""
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def click(self, x: float, y: float) -> None:
        """A left click at page pixel ``(x, y)``, as a mouse makes it: it moves there, presses and
        releases (the page gets pointermove/over, pointerdown, pointerup and click)."""
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind, buttons in (("mousePressed", 1), ("mouseReleased", 0)):  # buttons: held after it
            self.send(
                "Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", buttons=buttons, clickCount=1
            )

    def screenshot(self) -> np.ndarray:
        """The page now, ``[H, W, 3]`` uint8."""
        png = base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])
        return iio.imread(png)[..., :3]

    def wait_for_image(self, predicate, timeout: float = 30.0, interval: float = 0.5) -> np.ndarray:
        """Screenshots until ``predicate(image)`` holds; the last one (check it: it may not hold)."""
        end = time.monotonic() + timeout
        while True:
            image = self.screenshot()
            if predicate(image) or time.monotonic() > end:
                return image
            time.sleep(interval)

    def close(self) -> None:
        if getattr(self, "_ws", None) is not None:
            self._ws.close()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._remove_profile()

    def _remove_profile(self, timeout: float = 10.0) -> None:
        """Chromium's helper processes can still write to the profile for a moment after the browser
        process has exited (``rmtree``: "Directory not empty"): retry until the folder is gone."""
        end = time.monotonic() + timeout
        while True:
            try:
                self._profile.cleanup()
                return
            except OSError:
                if time.monotonic() > end:
                    shutil.rmtree(self._profile.name, ignore_errors=True)  # a leftover temp folder at worst
                    return
                time.sleep(0.05)

    def __enter__(self) -> HeadlessChromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
