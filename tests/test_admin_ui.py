"""The admin web UI in real headless Chromium (Debian's `chromium`, driven by Playwright) against a real
daemon in front of WsgiDAV: login, browsing, a whole undo cycle, hostile recorded data, authorization of
every route, CSRF and live replay progress. Screenshots of each page land in tests/artifacts/ui/."""
from __future__ import annotations

import http.client
import json
import re
import shutil
import struct
import threading
import types
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import TOKEN, Stack
from undo_proxy.admin import AdminApi, make_admin_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts" / "ui"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PAGES = ["/", "/timeline", "/snapshots", "/cycle", "/inconsistencies"]


# --- helpers ---------------------------------------------------------------------------------------
def proxy(stack: Stack, method: str, path: str, data: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(stack.url + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def raw(stack: Stack, method: str, path: str, headers: dict[str, str] | None = None,
        body: bytes | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request to the admin listener, redirects not followed."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.admin_port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def cookie(headers: http.client.HTTPMessage, name: str) -> str:
    for value in headers.get_all("Set-Cookie") or []:
        if value.startswith(name + "="):
            return value
    raise AssertionError(f"no {name} cookie in {headers.get_all('Set-Cookie')}")


def hidden_csrf(html: bytes) -> str:
    match = re.search(rb'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF field in the form"
    return match.group(1).decode()


def login(stack: Stack) -> tuple[str, str]:
    """Log in through the form without a browser; returns (session cookie header, the session's CSRF token)."""
    status, headers, html = raw(stack, "GET", "/login")
    assert status == 200
    nonce = cookie(headers, "undo_login").split(";")[0]
    form = f"csrf={hidden_csrf(html)}&token={TOKEN}".encode()
    status, headers, _ = raw(stack, "POST", "/login", body=form, headers={
        "Cookie": nonce, "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 303, status
    session = cookie(headers, "undo_session").split(";")[0]
    status, _, html = raw(stack, "GET", "/snapshots", headers={"Cookie": session})
    assert status == 200
    return session, hidden_csrf(html)


def png(width: int = 4, height: int = 3) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\0" + b"\xff\x40\x20" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


# --- browser fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium: apt-get install chromium (see .ci/install-deps.sh)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Ui:
    """A browser tab on the admin UI that records dialogs (alert() = an XSS ran) and console errors."""

    def __init__(self, page: Any, stack: Stack, name: str) -> None:
        self.page, self.stack, self.name = page, stack, name
        self.dialogs: list[str] = []
        self.console_errors: list[str] = []
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        page.set_default_timeout(30_000)

    def go(self, path: str) -> Any:
        return self.page.goto(self.stack.admin + path)

    def shot(self, label: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{self.name}-{label}.png"), full_page=True)

    def login(self, token: str = TOKEN) -> None:
        self.go("/login")
        self.page.fill("#token", token)
        self.page.click("button[type=submit]")

    def flash(self) -> str:
        return " ".join(self.page.locator(".flash").all_inner_texts())


@pytest.fixture
def ui(browser: Any, request: pytest.FixtureRequest, proxy_stack: Any) -> Iterator[Ui]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    u = Ui(page, proxy_stack(), request.node.name.removeprefix("test_"))
    yield u
    context.close()
    assert not u.dialogs, f"a dialog opened: {u.dialogs}"
    assert not [e for e in u.console_errors if "Content Security Policy" in e], u.console_errors


# --- tests -----------------------------------------------------------------------------------------
def test_login_browse_and_open_verbs(ui: Ui) -> None:
    stack, page = ui.stack, ui.page
    assert proxy(stack, "MKCOL", "/notes")[0] == 201
    assert proxy(stack, "PUT", "/notes/a.txt", b"first line\nsecond line\n", {"Content-Type": "text/plain"})[0] == 201
    assert proxy(stack, "PUT", "/pixel.png", png(), {"Content-Type": "image/png"})[0] == 201
    assert proxy(stack, "PUT", "/blob.bin", bytes(range(256)), {"Content-Type": "application/octet-stream"})[0] == 201
    assert proxy(stack, "GET", "/notes/a.txt")[0] == 200

    ui.go("/timeline")
    assert page.url.endswith("/login"), "no session must mean the login page"
    ui.shot("login")
    ui.login("not-the-token")
    assert "not the admin token" in ui.flash()
    ui.login()
    page.wait_for_url(stack.admin + "/")
    assert page.text_content(".mode").strip().startswith("live")
    assert "No failed" in page.inner_text("main")
    assert page.locator("svg.spark").count() >= 1, "verbs per minute by protocol"
    ui.shot("dashboard")

    resp = ui.go("/timeline")
    csp = resp.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert resp.headers["x-frame-options"] == "DENY"
    rows = page.locator("tr.verb")
    assert rows.count() == 5
    assert page.locator("svg circle.dot").count() == 5, "the picture of time draws every verb on the page"
    ui.shot("timeline")

    page.fill("input[name=verb]", "webdav.put")
    page.click("form.filters button")
    assert rows.count() == 3
    page.fill("input[name=target]", "/notes/*")
    page.click("form.filters button")
    assert rows.count() == 1
    page.fill("input[name=since]", "2999-01-01T00:00Z")
    page.click("form.filters button")
    assert rows.count() == 0
    page.fill("input[name=since]", "2000-01-01T00:00:00")
    page.click("form.filters button")
    assert rows.count() == 1
    page.click("tr.verb td.summary a")
    assert re.search(r"/timeline/\d+$", page.url)
    assert "PUT /notes/a.txt" in page.inner_text("main")
    assert "first line\nsecond line" in page.inner_text("pre.body")
    ui.shot("verb-text")

    put_png = stack.timeline(target="/pixel.png")[0]["seq"]
    ui.go(f"/timeline/{put_png}")
    img = page.locator("img.body")
    assert img.count() == 1
    page.wait_for_function("document.querySelector('img.body').naturalWidth === 4")
    body = page.request.get(f"{stack.admin}/timeline/{put_png}/body/request")
    assert body.headers["content-type"] == "image/png" and body.body() == png()
    assert body.headers["content-disposition"].startswith("inline")
    ui.shot("verb-image")

    put_bin = stack.timeline(target="/blob.bin")[0]["seq"]
    ui.go(f"/timeline/{put_bin}")
    assert page.locator("section.part").nth(0).locator("pre.body, img.body").count() == 0, "binary: download only"
    with page.expect_download() as download:
        page.click("text=Download the request body")
    assert Path(download.value.path()).read_bytes() == bytes(range(256))

    # paging: one verb per page, older then newer
    ui.go("/timeline?limit=2")
    first = page.locator("tr.verb td.num a").all_inner_texts()
    page.click("text=older →")
    second = page.locator("tr.verb td.num a").all_inner_texts()
    assert len(second) == 2 and set(first).isdisjoint(second)
    page.click("text=← newer")
    assert page.locator("tr.verb td.num a").all_inner_texts() == first

    page.click("button:has-text('Log out')")
    page.wait_for_url(stack.admin + "/login")
    ui.go("/")
    assert page.url.endswith("/login")


def test_whole_undo_cycle_from_the_ui(ui: Ui) -> None:
    stack, page = ui.stack, ui.page
    assert proxy(stack, "MKCOL", "/notes")[0] == 201
    assert proxy(stack, "PUT", "/notes/a.txt", b"keep me", {"Content-Type": "text/plain"})[0] == 201
    ui.login()
    page.wait_for_url(stack.admin + "/")

    ui.go("/snapshots")
    page.fill("input[name=label]", "before the bad client")
    page.click("button:has-text('Take a snapshot')")
    assert "Snapshot taken" in ui.flash()
    assert "before the bad client" in page.inner_text("table.list")
    assert "retention keeps the newest" in page.inner_text("main")
    ui.shot("snapshots")
    snap = stack.api("GET", "/api/snapshots")[1][-1]["id"]

    # the bad client deletes the file; someone then reads it and gets 404
    assert proxy(stack, "DELETE", "/notes/a.txt")[0] == 204
    assert proxy(stack, "GET", "/notes/a.txt")[0] == 404
    assert not (stack.volume / "notes/a.txt").exists()
    bad = stack.timeline(verb="webdav.delete")[0]["seq"]

    ui.go("/cycle")
    page.check(f"#snap-{snap}")
    ui.shot("cycle-pick")
    page.click("button:has-text('Rewind…')")
    assert "Confirm: rewind" in page.inner_text("h1") and snap in page.inner_text("main")
    ui.shot("confirm-rewind")
    page.click("button:has-text('Yes, rewind')")
    assert "Rewound to" in ui.flash()
    assert page.text_content(".mode").strip().startswith("rewound")
    assert proxy(stack, "PUT", "/notes/b.txt", b"x")[0] == 503, "live traffic is held during the cycle"

    page.fill("#note", "blocked the bad client")
    page.click("button:has-text('Record the note')")
    assert "blocked the bad client" in page.inner_text("ul.notes")
    page.check(f"#skip-{bad}")
    ui.shot("cycle-rewound")
    page.click("button:has-text('Replay')")
    page.wait_for_selector("h2:has-text('Review')")
    articles = page.locator("article.review")
    assert articles.count() == 1, "the read that saw 404 sees the file again"
    text = articles.inner_text()
    assert "output-changed" in text and "Original" in text and "Replayed" in text
    assert "404" in articles.locator(".part").nth(0).inner_text()
    assert "200" in articles.locator(".part").nth(1).inner_text()
    assert "keep me" in articles.locator(".part").nth(1).inner_text()
    ui.shot("cycle-review")

    page.click("a:has-text('Commit…')")
    ui.shot("confirm-commit")
    page.click("button:has-text('Yes, commit')")
    assert "Committed" in ui.flash()
    assert page.text_content(".mode").strip().startswith("live")
    assert (stack.volume / "notes/a.txt").read_bytes() == b"keep me"
    assert proxy(stack, "GET", "/notes/a.txt") == (200, b"keep me")
    cycle = stack.api("GET", "/api/cycles")[1][-1]
    assert cycle["state"] == "committed" and cycle["skipped"] == [bad]
    assert cycle["notes"][0]["note"] == "blocked the bad client"

    ui.go("/timeline")
    assert page.locator("svg rect.span").count() >= 1, "the cycle's span is drawn"
    assert page.locator("svg path.snap-mark").count() >= 1, "snapshots are marked"
    ui.shot("timeline-after-cycle")

    ui.go("/inconsistencies")
    assert "pending" in page.inner_text("table.list")
    page.click("button:has-text('Acknowledge')")
    assert "acknowledged" in page.inner_text("table.list")
    ui.shot("inconsistencies")


def test_recorded_xss_is_shown_as_text(ui: Ui) -> None:
    stack, page = ui.stack, ui.page
    path = "/x%3Cscript%3Ealert(1)%3C%2Fscript%3E.html"
    hostile = {"Content-Type": "text/html", "User-Agent": "<script>alert(3)</script>"}
    assert proxy(stack, "PUT", path, b"<img src=x onerror=alert(2)>", hostile)[0] == 201
    assert proxy(stack, "PUT", "/evil.svg", b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(4)"/>',
                 {"Content-Type": "image/svg+xml"})[0] == 201
    ui.login()
    page.wait_for_url(stack.admin + "/")
    for where in ("/", "/timeline", "/timeline?target=*script*"):
        ui.go(where)
    assert "<script>alert(1)</script>" in page.inner_text("table.list")
    assert page.locator("script").count() == 1 and page.locator("script").get_attribute("src") == "/static/ui.js"
    html = page.content()
    assert "<script>alert" not in html and "<img src=x" not in html
    ui.shot("timeline")

    page.click("tr.verb td.summary a")
    assert "<img src=x onerror=alert(2)>" in page.inner_text("pre.body")
    assert "<script>alert(3)</script>" in page.inner_text("table.headers")
    assert page.locator("img[src=x]").count() == 0
    ui.shot("verb")

    svg = stack.timeline(target="/evil.svg")[0]["seq"]
    ui.go(f"/timeline/{svg}")
    request_part = page.locator("section.part").nth(0)
    assert request_part.locator("img.body").count() == 0, "SVG can carry script: never an image"
    assert 'onload="alert(4)"' in request_part.locator("pre.body").inner_text(), "its source shows as text"
    body = page.request.get(f"{stack.admin}/timeline/{svg}/body/request")
    assert body.headers["content-type"] == "application/octet-stream"
    assert body.headers["content-disposition"].startswith("attachment")
    assert body.headers["content-security-policy"] == "default-src 'none'; sandbox"
    page.wait_for_timeout(300)  # give any injected handler the chance to fire; the fixture checks dialogs


def _route_paths() -> list[tuple[str, str]]:
    """(method, path) for every route of the admin app, placeholders filled in."""
    stub = types.SimpleNamespace(timeline=None, listeners=[], blobs=None)
    app = make_admin_app(AdminApi(stub, TOKEN))  # type: ignore[arg-type]
    fill = {"seq": "1", "id": "1", "part": "request", "tail": "nothing-here", "filename": "ui.css"}
    out = set()
    for resource in app.router.resources():
        path = re.sub(r"\{(\w+)(:[^}]*)?\}", lambda m: fill[m.group(1)], resource.canonical)
        for route in resource:
            methods = ["GET", "POST", "DELETE"] if route.method == "*" else [route.method]
            out.update((m, path) for m in methods)
    return sorted(out)


def test_every_route_needs_the_token_or_a_session(proxy_stack: Any) -> None:
    stack = proxy_stack()
    routes = _route_paths()
    assert ("GET", "/api/status") in routes and ("GET", "/cycle") in routes and ("POST", "/cycle/commit") in routes
    checked = 0
    for method, path in routes:
        if path in ("/login", "/static") or path.startswith("/static/"):
            continue  # the login form itself and the shipped CSS/JS are public
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Cookie": "undo_session=forged"},
                        {"Authorization": f"Bearer {TOKEN}x"}):
            status, resp_headers, body = raw(stack, method, path, headers=headers)
            if path.startswith("/api") or path == "/metrics":
                assert status == 401, f"{method} {path} {headers} answered {status}"
                assert method == "HEAD" or "error" in json.loads(body)
            else:
                assert status in (302, 303), f"{method} {path} {headers} answered {status}"
                assert resp_headers["Location"] == "/login"
                assert b"undo" not in body.lower()
            checked += 1
    assert checked > 60
    for path in ("/loginx", "/login/", "/static", "/staticx", "/metricsx", "/x/../api/status"):
        status, resp_headers, _ = raw(stack, "GET", path)
        assert (status, resp_headers.get("Location")) in ((303, "/login"), (401, None)), f"{path}: {status}"
    # the token itself still works on the API and metrics
    assert stack.api("GET", "/api/status")[0] == 200
    status, _, body = raw(stack, "GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and b"undo_proxy_" in body


def test_csrf_and_session_cookies(proxy_stack: Any) -> None:
    stack = proxy_stack()
    status, headers, _ = raw(stack, "GET", "/login")
    login_cookie = cookie(headers, "undo_login")
    assert "HttpOnly" in login_cookie and "SameSite=Strict" in login_cookie
    # a login POST without the form's nonce cookie is refused, even with the right token
    status, headers, _ = raw(stack, "POST", "/login", body=f"csrf=x&token={TOKEN}".encode(),
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 401 and not any(c.startswith("undo_session=") for c in headers.get_all("Set-Cookie") or [])

    session, csrf = login(stack)
    form = {"Cookie": session, "Content-Type": "application/x-www-form-urlencoded"}
    for body in (b"label=nope", b"label=nope&csrf=wrong"):
        status, _, text = raw(stack, "POST", "/snapshots", headers=form, body=body)
        assert status == 403 and b"CSRF" in text
    assert stack.api("GET", "/api/snapshots")[1] == [], "a refused form changed nothing"
    status, headers, _ = raw(stack, "POST", "/snapshots", headers=form, body=f"label=ok&csrf={csrf}".encode())
    assert status == 303 and [s["label"] for s in stack.api("GET", "/api/snapshots")[1]] == ["ok"]

    # the session authorizes the API too; changing calls need the CSRF token in a header
    assert raw(stack, "GET", "/api/status", headers={"Cookie": session})[0] == 200
    api = {"Cookie": session, "Content-Type": "application/json"}
    assert raw(stack, "POST", "/api/snapshots", headers=api, body=b"{}")[0] == 401
    assert raw(stack, "POST", "/api/snapshots", headers={**api, "X-CSRF-Token": csrf}, body=b"{}")[0] == 201

    # logging out ends the session
    assert raw(stack, "POST", "/logout", headers=form, body=f"csrf={csrf}".encode())[0] == 303
    assert raw(stack, "GET", "/", headers={"Cookie": session})[0] == 303
    assert raw(stack, "GET", "/api/status", headers={"Cookie": session})[0] == 401


def test_live_replay_progress_over_server_sent_events(proxy_stack: Any) -> None:
    stack = proxy_stack()
    assert stack.api("POST", "/api/snapshots", {"label": "base"})[0] == 201
    for i in range(20):
        assert proxy(stack, "PUT", f"/f{i}.txt", b"x" * i)[0] == 201
    assert stack.api("POST", "/api/rewind", {"to": "@0"})[0] == 200
    session, _ = login(stack)

    events: list[tuple[str, dict[str, Any]]] = []
    connected = threading.Event()

    def listen() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", stack.admin_port, timeout=30)
        conn.request("GET", "/events", headers={"Cookie": session})
        resp = conn.getresponse()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        kind = ""
        while True:
            line = resp.readline().decode().strip()
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
                connected.set()
                if kind == "mode" and events[-1][1]["mode"] == "review":
                    break
        conn.close()
    reader = threading.Thread(target=listen, daemon=True)
    reader.start()
    assert connected.wait(10)
    assert stack.api("POST", "/api/replay", {"skip": []})[0] == 200
    reader.join(30)
    assert not reader.is_alive()
    progress = [e for kind, e in events if kind == "progress"]
    assert progress and progress[-1]["replayed"] == progress[-1]["total"] == 20
    assert next(e["mode"] for kind, e in events if kind == "mode") == "rewound"
    assert stack.api("POST", "/api/cancel")[0] == 200
