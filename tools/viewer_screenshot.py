"""Screenshot of ``fourdgen view`` in headless Chromium: what a person sees in the browser.

    python tools/viewer_screenshot.py outputs/quickstart/checkpoints/last.ckpt docs/viewer.png --frame 3

Starts the viewer on a free port, loads its page, closes viser's notice about software WebGL
(headless Chromium draws with SwiftShader), waits until the scene has stopped changing and
writes the PNG. Needs a Chromium binary (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import time

import imageio.v3 as iio
import numpy as np

from fourdgen.view import load_source
from fourdgen.viewer import ViewerApp
from fourdgen.viewer.browser import HeadlessChromium

CLOSE_NOTICES = "document.querySelectorAll('.mantine-Notification-root button').forEach(b => b.click())"


def screenshot(path: str, out: str, frame: float, width: int, height: int, timeout: float) -> np.ndarray:
    with ViewerApp(load_source(path), port=0, frame=frame, verbose=False) as app:
        app.wait_shown(60)
        with HeadlessChromium(width, height) as browser:
            browser.goto(app.url)
            last: list = []

            def steady(image: np.ndarray) -> bool:
                browser.evaluate(CLOSE_NOTICES)
                same = bool(last) and float(np.abs(image.astype(np.int16) - last[-1]).mean()) < 0.5
                last[:] = [image]
                return same and float(image.std()) > 20

            time.sleep(2.0)  # the page's first paint is not the scene yet
            image = browser.wait_for_image(steady, timeout=timeout, interval=1.0)
    iio.imwrite(out, image)
    return image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="what fourdgen view shows: a checkpoint, a PLY folder or a scene folder")
    p.add_argument("out", help="PNG to write")
    p.add_argument("--frame", type=float, default=0)
    p.add_argument("--width", type=int, default=1200)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--timeout", type=float, default=90)
    a = p.parse_args()
    screenshot(a.path, a.out, a.frame, a.width, a.height, a.timeout)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
