"""Open every page of the built site in headless Chromium, screenshot it, and fail on a broken one.

    python3 scripts/docs_browser.py [SITE_DIR] [SHOTS_DIR]     # defaults: site/ and site-shots/

The site is served from 127.0.0.1 by this script; the browser loads each page with everything it
references (styles, scripts, images, fonts bundled with the theme). A page is broken when the page
or anything it loads answers an HTTP error, when the browser fails, or when its screenshot is
missing or blank. Needs a ``chromium`` (Debian: ``apt-get install chromium``) or ``CHROMIUM=...``.
Standard library only.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zlib
from pathlib import Path

WIDTH, HEIGHT = 1280, 1800
#: A screenshot with at most this many distinct bytes (PNG row filters and one colour) is blank.
_BLANK_BYTES = 8


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the site and records every request's path and status."""

    seen: list[tuple[str, int]]

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:  # noqa: ARG002
        self.seen.append((self.path, int(code) if str(code).isdigit() else 0))

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        """Quiet: the statuses are reported per page."""


def _blank(png: Path) -> bool:
    """Whether the screenshot is one colour (decoded with zlib: 8-bit RGB(A), no filter tricks)."""
    data = png.read_bytes()
    chunks, at = [], 8
    while at < len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        kind = data[at + 4 : at + 8]
        if kind == b"IDAT":
            chunks.append(data[at + 8 : at + 8 + length])
        at += 12 + length
    raw = zlib.decompress(b"".join(chunks))
    return len(set(raw[: 1 << 22])) <= _BLANK_BYTES


def main(argv: list[str]) -> int:
    """Check every page; print one line per page; exit 1 when any is broken."""
    site = Path(argv[0] if argv else "site").resolve()
    shots = Path(argv[1] if len(argv) > 1 else "site-shots").resolve()
    browser = (
        os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )
    if browser is None:
        print("docs_browser: no chromium. Install it (apt-get install chromium) or set CHROMIUM.")
        return 1
    pages = sorted(p.relative_to(site) for p in site.rglob("index.html"))
    if not pages:
        print(f"docs_browser: no page under {site}. Build the site first (bash scripts/docs.sh).")
        return 1
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    handler = type("Handler", (_Handler,), {"seen": []})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(site))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    broken = []
    try:
        with tempfile.TemporaryDirectory(prefix="omnifix-chromium-") as profile:
            for page in pages:
                url_path = "/" + page.parent.as_posix().removeprefix(".") + "/"
                url_path = url_path.replace("//", "/")
                name = page.parent.as_posix().replace("/", "-").strip(".-") or "index"
                shot = shots / f"{name}.png"
                handler.seen.clear()
                command = [
                    browser,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--hide-scrollbars",
                    f"--user-data-dir={profile}",
                    f"--window-size={WIDTH},{HEIGHT}",
                    "--virtual-time-budget=4000",
                    f"--screenshot={shot}",
                    f"http://127.0.0.1:{server.server_port}{url_path}",
                ]
                done = subprocess.run(  # noqa: S603 - the browser the caller chose
                    command, capture_output=True, text=True, check=False, timeout=120
                )
                errors = [f"{path} {code}" for path, code in handler.seen if code >= 400]  # noqa: PLR2004
                if done.returncode != 0:
                    errors.append(f"chromium exited {done.returncode}: {done.stderr[-500:]}")
                if not shot.is_file():
                    errors.append("no screenshot")
                elif _blank(shot):
                    errors.append("blank screenshot")
                status = "ok" if not errors else "BROKEN: " + "; ".join(errors)
                print(f"  {url_path:40} {len(handler.seen):3} requests  {status}")
                if errors:
                    broken.append(url_path)
    finally:
        server.shutdown()
    if broken:
        print(f"docs_browser: {len(broken)} broken page(s): {', '.join(broken)}")
        return 1
    print(
        f"docs_browser: {len(pages)} pages opened in {Path(browser).name}, screenshots in {shots}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
