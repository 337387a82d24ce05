"""The savings page: `GET /promptier/savings` (one static HTML file, no build step) and the JSON it
reads, `GET /promptier/savings.json` (`serving.dispatch.savings` over the dispatcher's decision log).

The HTML holds no data, so it is served to any caller the Host check lets through (a browser cannot
send an API key when it navigates); the JSON is the data, and asks for a key (`authorization: Bearer
KEY`) when the dispatcher has keys: an operator key (`savings_page.operator_keys_env`) sees every
tenant's figures, a tenant's own key only that tenant's, so one team never sees another's spend. The
page takes the key from a form, or from the address's fragment (`#key=...`, which the browser never
sends), and keeps it for the tab only (sessionStorage). The page's script and style are allowed by
their hashes and nothing else (Content-Security-Policy), it cannot be framed, and no answer allows
another origin to read it.

Reading the log runs on a worker thread, at most one at a time; one reading makes every view's report
(every tenant's, then each tenant's from its own rows: twice the summing, and no row kept once it is
done), reused while the log files and prices are unchanged, and for MIN_REFRESH_S in any case, so that
pages left open cost the dispatcher at most one reading per MIN_REFRESH_S (the page itself asks every
30 s).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving.dispatch.savings import LogWindow, by_tenant, log_files, read_window, summarize
from serving.dispatch.tenants import Tenants, bearer_key, key_digest

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


@dataclass(frozen=True)
class View:
    """Whose figures a caller may see: one tenant's, or every tenant's (`tenant` None)."""

    tenant: str | None


EVERY_TENANT = View(None)


class SavingsAccess:
    """Which view each key gets: an operator key every tenant's, a tenant's key its own tenant's.

    A dispatcher without any key (every request is the default tenant's) shows its page to anyone the
    Host check lets through, unless operator keys are configured, which then are the only way in.
    """

    def __init__(self, tenants: Tenants, operator_keys: set[str] | None) -> None:
        self.tenants = tenants
        self._operators = {key_digest(key) for key in operator_keys or ()}

    @property
    def has_operators(self) -> bool:
        """Whether operator keys are configured: then every-tenant figures need one, wherever they are shown."""
        return bool(self._operators)

    def view(self, authorization: str) -> View | None:
        """The view of a request's `Authorization` header; None: refused."""
        if key_digest(bearer_key(authorization)) in self._operators:
            return EVERY_TENANT
        if self.tenants.open:
            return None if self._operators else EVERY_TENANT
        tenant = self.tenants.authenticate(authorization)
        return View(tenant.name) if tenant is not None else None


class SavingsReport:
    """The latest report of each view, recomputed when the log or the prices change."""

    def __init__(self, log_path: Path, backups: int, max_bytes: int, tiers: list[str],
                 prices: Callable[[], dict[str, tuple[float, float]]], top_tiers: dict[str, str] | None = None
                 ) -> None:
        self.log_path, self.backups, self.max_bytes = log_path, backups, max_bytes
        self.tiers, self.prices = tiers, prices
        self.top_tiers = top_tiers or {}  # the most capable tier of each tenant restricted below the last
        self._lock = asyncio.Lock()
        self._key: tuple | None = None
        self._at = 0.0
        # Each view's report, whether the window left older rows out, and the prices they were priced at.
        self._cache: tuple[dict[View, dict], bool, dict[str, tuple[float, float]]] | None = None

    def _signature(self) -> tuple:
        files = []
        for name in log_files(self.log_path, self.backups):
            try:
                status = os.stat(name)
            except FileNotFoundError:
                continue
            files.append((status.st_ino, status.st_size, status.st_mtime_ns))
        return tuple(files), tuple(sorted(self.prices().items()))

    async def get(self, view: View = EVERY_TENANT) -> dict:
        async with self._lock:  # one reading at a time; callers meanwhile get its result
            key = self._signature()
            fresh = time.monotonic() - self._at < MIN_REFRESH_S
            if self._cache is None or (key != self._key and not fresh):
                self._cache = await asyncio.to_thread(self._compute, dict(self.prices()))
                self._key, self._at = key, time.monotonic()
            reports, truncated, prices = self._cache
            report = reports.get(view)
            if report is None:  # a tenant without rows in the window: nothing, against its own top tier
                report = self._report(LogWindow([], [], 0, truncated, 0), prices, view.tenant)
            return report

    def _compute(self, prices: dict[str, tuple[float, float]]
                 ) -> tuple[dict[View, dict], bool, dict[str, tuple[float, float]]]:
        window = read_window(self.log_path, self.backups, self.max_bytes)
        reports = {EVERY_TENANT: self._report(window, prices, None)}
        for tenant, own in by_tenant(window).items():
            reports[View(tenant)] = self._report(own, prices, tenant)
        return reports, window.truncated, prices

    def _report(self, window: LogWindow, prices: dict[str, tuple[float, float]], tenant: str | None) -> dict:
        report = summarize(window, self.tiers, prices, self.top_tiers, tenant)
        report["window"]["max_bytes"] = self.max_bytes
        report["tenant"] = tenant
        return report


def savings_routes(report: SavingsReport, access: SavingsAccess) -> list[Route]:
    """The page's two endpoints, for the dispatcher's Starlette app."""
    page, policy = _page()
    page_headers = {"content-security-policy": policy, "x-frame-options": "DENY", "cache-control": "no-store",
                    "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}

    async def savings_page(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=page_headers)

    async def savings_data(request: Request) -> Response:
        view = access.view(request.headers.get("authorization", ""))
        if view is None:
            return JSONResponse({"error": {"message": "invalid or missing API key", "type": "authentication_error",
                                           "code": "invalid_api_key"}}, status_code=401)
        return JSONResponse(await report.get(view), headers={"cache-control": "no-store",
                                                             "x-content-type-options": "nosniff"})

    return [Route(PAGE_PATH, savings_page, methods=["GET"]), Route(DATA_PATH, savings_data, methods=["GET"])]
