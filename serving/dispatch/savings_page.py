"""The savings page: `GET /promptier/savings` (one static HTML file, no build step) and the JSON it
reads, `GET /promptier/savings.json` (`serving.dispatch.savings` over the dispatcher's decision log).

The HTML holds no data, so it is served to any caller the Host check lets through (a browser cannot
send an API key when it navigates); the JSON is the data, and asks for an inbound API key
(`authorization: Bearer KEY`) when the dispatcher has them: the page takes it from a form, or from
the address's fragment (`#key=...`, which the browser never sends), and keeps it for the tab only
(sessionStorage). The page's script and style are allowed by their hashes and nothing else
(Content-Security-Policy), it cannot be framed, and no answer allows another origin to read it.

Reading the log runs on a worker thread, at most one at a time, and its result is reused while the
log files and prices are unchanged, and for MIN_REFRESH_S in any case, so that pages left open cost
the dispatcher at most one reading per MIN_REFRESH_S (the page itself asks every 30 s).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving.dispatch.savings import log_files, read_window, summarize

PAGE_PATH = "/promptier/savings"
DATA_PATH = "/promptier/savings.json"
MIN_REFRESH_S = 5.0


def _page() -> tuple[bytes, str]:
    """The page and its Content-Security-Policy (the hashes of its inline script and style)."""
    html = resources.files("serving.dispatch").joinpath("savings.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
                        for b in blocks)

    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
              "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
              "frame-ancestors 'none'")
    return html.encode(), policy


class SavingsReport:
    """The latest report, recomputed when the log or the prices change."""

    def __init__(self, log_path: Path, backups: int, max_bytes: int, tiers: list[str],
                 prices: Callable[[], dict[str, tuple[float, float]]]) -> None:
        self.log_path, self.backups, self.max_bytes = log_path, backups, max_bytes
        self.tiers, self.prices = tiers, prices
        self._lock = asyncio.Lock()
        self._key: tuple | None = None
        self._at = 0.0
        self._report: dict | None = None

    def _signature(self) -> tuple:
        files = []
        for name in log_files(self.log_path, self.backups):
            try:
                status = os.stat(name)
            except FileNotFoundError:
                continue
            files.append((status.st_ino, status.st_size, status.st_mtime_ns))
        return tuple(files), tuple(sorted(self.prices().items()))

    async def get(self) -> dict:
        async with self._lock:  # one reading at a time; callers meanwhile get its result
            key = self._signature()
            fresh = time.monotonic() - self._at < MIN_REFRESH_S
            if self._report is None or (key != self._key and not fresh):
                prices = dict(self.prices())
                self._report = await asyncio.to_thread(self._compute, prices)
                self._key, self._at = key, time.monotonic()
            return self._report

    def _compute(self, prices: dict[str, tuple[float, float]]) -> dict:
        report = summarize(read_window(self.log_path, self.backups, self.max_bytes), self.tiers, prices)
        report["window"]["max_bytes"] = self.max_bytes
        return report


def savings_routes(report: SavingsReport, inbound_keys: set[str] | None) -> list[Route]:
    """The page's two endpoints, for the dispatcher's Starlette app."""
    page, policy = _page()
    page_headers = {"content-security-policy": policy, "x-frame-options": "DENY", "cache-control": "no-store",
                    "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}

    async def savings_page(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=page_headers)

    async def savings_data(request: Request) -> Response:
        if inbound_keys is not None:
            supplied = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if supplied not in inbound_keys:
                return JSONResponse({"error": {"message": "invalid or missing API key", "type": "authentication_error",
                                               "code": "invalid_api_key"}}, status_code=401)
        return JSONResponse(await report.get(), headers={"cache-control": "no-store",
                                                         "x-content-type-options": "nosniff"})

    return [Route(PAGE_PATH, savings_page, methods=["GET"]), Route(DATA_PATH, savings_data, methods=["GET"])]
