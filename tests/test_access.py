"""Access (issue 7): the admin API, /metrics and the UI refuse every request without the token (every route of
the admin app, every method), wrong tokens of every shape are refused, the timeline and blob store are
private (0600/0700 even under umask 000), and snapshot ids, labels and paths from the API cannot reach
outside the snapshot store."""
from __future__ import annotations

import hmac
import http.client
import os
import re
import socket
import stat
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.backends import free_port, wsgidav_processes
from tests.daemon import TOKEN, Stack, write_config
from tests.rawnet import count, statuses

PUBLIC = ("/login", "/static")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One daemon for the module, started under umask 000 (the files must be private anyway)."""
    work = tmp_path_factory.mktemp("access")
    with wsgidav_processes(work) as dav_start:
        for d in ("dav", "snaps"):
            (work / d).mkdir()
        st = Stack(workdir=work, config=work / "undo-proxy.toml", volume=work / "dav", store=work / "snaps",
                   http_port=free_port(), admin_port=free_port(), dav=dav_start(work / "dav"), log=work / "serve.log")
        write_config(st, "copy", None, "")
        old = os.umask(0)
        try:
            st.start()
        finally:
            os.umask(old)
        try:
            yield st
        finally:
            st.kill()


def admin_routes() -> list[tuple[str, str]]:
    """(method, concrete path) for every route of the admin app, built the way the daemon builds it."""
    from undo_proxy.admin import AdminApi, make_admin_app

    app = make_admin_app(AdminApi(SimpleNamespace(timeline=None, listeners=[]), TOKEN))
    values = {"seq": "1", "id": "20260101T000000Z", "tail": "anything/at/all", "part": "request"}
    out = set()
    for route in app.router.routes():
        canonical = route.resource.canonical
        path = re.sub(r"\{([^}:]+)(:[^}]*)?\}", lambda m: values.get(m.group(1), "1"), canonical)
        if path.startswith(PUBLIC):
            continue
        if "/{" in canonical and "id" in canonical and canonical.startswith("/api/cycles"):
            path = path.replace("20260101T000000Z", "1")
        methods = ["GET", "POST", "PUT", "DELETE", "PATCH"] if route.method == "*" else [route.method]
        out.update((m, path) for m in methods)
    return sorted(out)


_conns: dict[int, http.client.HTTPConnection] = {}


def call(stack: Stack, method: str, path: str, headers: dict[str, str] | None = None,
         body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on a kept-alive connection, redirects not followed."""
    for attempt in range(2):
        conn = _conns.get(stack.admin_port) or http.client.HTTPConnection("127.0.0.1", stack.admin_port, timeout=30)
        _conns[stack.admin_port] = conn
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
        except (ConnectionError, http.client.HTTPException):
            conn.close()
            _conns.pop(stack.admin_port, None)
            if attempt:
                raise
            continue
        if resp.will_close:
            conn.close()
            _conns.pop(stack.admin_port, None)
        return resp.status, dict(resp.headers), data
    raise AssertionError("unreachable")


def near_misses(token: str) -> list[str]:
    flip = lambda s, i: s[:i] + chr(ord(s[i]) ^ 1) + s[i + 1:]  # noqa: E731
    return ["", "x", "wrong-token", token[:-1], token + "x", token[1:], "x" + token, flip(token, 0),
            flip(token, len(token) // 2), flip(token, len(token) - 1), token.upper(), token * 2,
            token[:8], token + "\t" + token, "t\u00e9st-admin-token", token[:-1] + "\u00e9"]


def test_every_admin_route_refuses_requests_without_the_right_token(stack):
    routes = admin_routes()
    before = stack.api("GET", "/api/snapshots")[1]
    api = [r for r in routes if r[1].startswith("/api") or r[1] == "/metrics"]
    ui = [r for r in routes if r not in api]
    assert len(api) >= 16 and ("DELETE", "/api/snapshots/20260101T000000Z") in api and ("GET", "/metrics") in api
    assert ("POST", "/cycle/rewind") in ui and ("GET", "/") in ui
    credentials = [{}] + [{"Authorization": f"Bearer {t}"} for t in near_misses(TOKEN)] + [
        {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Token {TOKEN}"},
        {"X-Admin-Token": TOKEN}, {"Cookie": f"undo_proxy_session={TOKEN}; token={TOKEN}"},
    ]
    tried = 0
    for method, path in api:
        for headers in credentials:
            body = b"{}" if method in ("POST", "PUT", "PATCH") else None
            status, _, answer = call(stack, method, path, {**headers, "Content-Type": "application/json"}, body)
            assert status == 401, (method, path, headers, status, answer[:200])
            assert method == "HEAD" or b'"error"' in answer
            tried += 1
        # the token in the query string is no token either
        status, _, _ = call(stack, method, f"{path}?token={urllib.parse.quote(TOKEN)}")
        assert status == 401, (method, path)
    for method, path in ui:
        for headers in credentials[:6]:
            status, hdrs, _ = call(stack, method, path, headers, b"csrf=x" if method == "POST" else None)
            assert status in (401, 303) and (status == 401 or hdrs.get("Location", "").endswith("/login")), \
                (method, path, headers, status)
            tried += 1
    # nothing happened: no snapshot, no cycle
    assert stack.api("GET", "/api/snapshots") == (200, before)
    assert stack.api("GET", "/api/status")[1]["mode"] == "live"
    assert stack.api("GET", "/api/cycles") == (200, [])
    # and the right token works (with the same request shapes)
    for method, path in [("GET", "/api/status"), ("GET", "/metrics"), ("GET", "/api/timeline")]:
        assert call(stack, method, path, {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    count("access", tried)


def test_bytes_that_are_not_text_in_the_authorization_header_are_refused_not_a_crash(stack):
    for raw in (b"Bearer \xff\xfe", b"Bearer " + TOKEN.encode() + b"\xff", b"\xff\xff\xff", b"Bearer \xc3"):
        with socket.create_connection(("127.0.0.1", stack.admin_port), timeout=10) as sock:
            sock.sendall(b"GET /api/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: " + raw
                         + b"\r\n\r\n")
            answer = b""
            while piece := sock.recv(65536):
                answer += piece
        assert statuses(answer)[:1] in ([401], [400]), (raw, answer[:300])
    assert stack.api("GET", "/api/status")[0] == 200
    count("access", 4)


def test_tokens_are_compared_in_constant_time(monkeypatch):
    """token_ok goes through hmac.compare_digest (whatever the inputs); timing is not measured."""
    from undo_proxy import admin

    calls = []
    real = hmac.compare_digest

    def spy(a, b):  # noqa: ANN001, ANN202
        calls.append((a, b))
        return real(a, b)
    monkeypatch.setattr(admin.hmac, "compare_digest", spy)
    for given in near_misses(TOKEN) + [TOKEN]:
        assert admin.token_ok(given, TOKEN) is (given == TOKEN)
    assert len(calls) == len(near_misses(TOKEN)) + 1
    assert admin.token_ok(None, TOKEN) is False and admin.token_ok(TOKEN, "") is False
    count("access", len(calls) + 2)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_timeline_and_blob_store_are_private_even_under_umask_000(stack):
    for i in range(5):
        conn = http.client.HTTPConnection("127.0.0.1", stack.http_port, timeout=10)
        conn.request("PUT", f"/private-{i}.txt", body=os.urandom(300_000 if i == 0 else 100))  # one spills to disk
        assert conn.getresponse().status == 201
        conn.close()
    stack.cli("snapshot", "take")
    state = stack.workdir / "state"
    modes = _modes(state)
    assert modes["."] == 0o700
    assert modes["timeline.db"] == 0o600
    blobs = [k for k in modes if k.startswith("blobs/")]
    assert len([k for k in blobs if (state / k).is_file()]) >= 5
    bad = {k: oct(m) for k, m in modes.items()
           if (state / k).is_dir() and m != 0o700 or (state / k).is_file() and m != 0o600}
    assert not bad, f"not private: {bad}"
    count("access", len(modes))


def test_snapshot_ids_labels_and_paths_cannot_escape_the_store(stack, tmp_path):
    victim_dir = stack.store.parent / "20260101T000000Z"     # a would-be id right next to the store
    victim_dir.mkdir()
    (victim_dir / "keep").write_text("keep")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("keep")
    outside_before = {p: p.read_bytes() for p in (victim_dir / "keep", victim / "keep")}
    status, snap = stack.api("POST", "/api/snapshots", {"label": "../../../../etc/passwd"})
    assert status == 201 and Path(snap["path"]).parent == stack.store, snap
    status, snap2 = stack.api("POST", "/api/snapshots", {"label": str(victim)})
    assert status == 201 and Path(snap2["path"]).parent == stack.store, snap2
    for label in ("a\x00b", "x" * 300, "line\nbreak"):
        assert stack.api("POST", "/api/snapshots", {"label": label})[0] == 400, label
    hostile_ids = ["..", "../20260101T000000Z", "..%2F20260101T000000Z", "%2E%2E%2F20260101T000000Z",
                   f"..%2F..%2F{urllib.parse.quote(str(victim), safe='')}", "%2Fetc%2Fpasswd", "20260101T000000Z%00", "20260101T000000Z%0A", "%00",
                   f"{snap['id']}%2F..%2F..%2F20260101T000000Z", f"{snap['id']}%00", "20260101T000000Z",
                   ".%2E", "%252E%252E%252F20260101T000000Z", f"{snap['id']}%0A", "*", "%2A"]
    # (str(victim) itself is snap2's label: a label names that snapshot, in the store, and is tried below)
    tried = 0
    for sid in hostile_ids:
        status, answer = stack.api("DELETE", f"/api/snapshots/{sid}")
        assert status in (400, 404), (sid, status, answer)
        tried += 1
    # (str(victim) itself is snap2's label, and a label names that snapshot: not a path at all)
    for to in ("../20260101T000000Z", str(victim / "keep"), "/etc", "20260101T000000Z\x00", "..", "@../1", "@-1",
               f"{snap['id']}/../../x"):
        status, answer = stack.api("POST", "/api/rewind", {"to": to})
        assert status in (400, 404, 409), (to, status, answer)
        tried += 1
    res = stack.cli("snapshot", "delete", "../20260101T000000Z", check=False)
    assert res.returncode in (1, 2), res
    # the UI's delete form goes through the same check (and needs a session first)
    assert call(stack, "POST", "/snapshots/..%2F20260101T000000Z/delete", {}, b"csrf=x")[0] in (303, 401, 404)
    # nothing outside the store was touched, both snapshots are still there, the mode is live
    assert {p: p.read_bytes() for p in outside_before} == outside_before
    assert victim_dir.is_dir() and victim.is_dir()
    assert {snap["id"], snap2["id"]} <= {s["id"] for s in stack.api("GET", "/api/snapshots")[1]}
    assert (stack.store / snap["id"]).is_dir() and (stack.store / snap2["id"]).is_dir()
    assert stack.api("GET", "/api/status")[1]["mode"] == "live"
    # a real id is deleted, inside the store only
    assert stack.api("DELETE", f"/api/snapshots/{snap['id']}")[0] == 200
    assert not (stack.store / snap["id"]).exists() and victim_dir.is_dir()
    # a label that looks like a path names its snapshot, in the store, and nothing else
    assert stack.api("DELETE", f"/api/snapshots/{urllib.parse.quote(str(victim), safe='')}")[0] == 200
    assert not (stack.store / snap2["id"]).exists()
    assert victim.is_dir() and (victim / "keep").read_bytes() == b"keep"
    count("access", tried + 7)


def test_malformed_ids_in_api_paths_are_400_or_404(stack):
    paths = ["/api/verbs/..%2F..%2Fetc", "/api/cycles/..%2F1", "/api/verbs/1%00", "/api/timeline?limit=-1",
             "/api/timeline?after=1e9", "/api/verbs/-1", "/api/cycles/99999999999999999999999"]
    for path in paths:
        status, answer = stack.api("GET", path)
        assert status in (400, 404), (path, status, answer)
    assert stack.api("GET", "/api/status")[0] == 200
    count("access", len(paths))
