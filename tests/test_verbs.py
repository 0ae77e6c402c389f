"""The http and webdav verb packs: parsing into intents, outputs, checks and name translation."""
import hashlib

import pytest

from verbs.base import RecordedVerb, load_pack, normalize_path, paths_overlap, targets_conflict
from verbs.http import HttpPack, HttpRequestHead
from verbs.webdav import WebdavPack, normalized_multistatus


def head(method: str, path: str, *headers: tuple[str, str]) -> HttpRequestHead:
    return HttpRequestHead(method=method, raw_path=path, version="1.1", headers=list(headers), client="127.0.0.1")


def recorded(mutates: bool, output: dict, summary: str = "GET /a -> 200") -> RecordedVerb:
    return RecordedVerb(seq=1, verb="webdav.get", protocol="http", frontend="web", targets=["/a"], mutates=mutates,
                        status="committed", origin="live", cycle=None, original_seq=None, summary=summary,
                        request={}, output=output)


def out(pack: HttpPack, status: int, body: bytes = b"", headers=()) -> dict:
    return pack.output(status, "", list(headers), hashlib.sha256(body).hexdigest(), len(body), True, "GET", body=body)


@pytest.mark.parametrize("raw,logical", [
    ("/a/./b/../c//d/", "/a/c/d"), ("/", "/"), ("", "/"), ("/x?y=1", "/x"), ("/../../etc/passwd", "/etc/passwd"),
])
def test_normalize_path(raw, logical):
    assert normalize_path(raw) == logical


def test_percent_encoded_paths_name_the_same_resource():
    pack = WebdavPack()
    assert pack.parse(head("PUT", "/a%20b.txt")).targets == ["/a b.txt"]
    assert pack.parse(head("PUT", "/a b.txt?x=1")).targets == ["/a b.txt"]


def test_http_pack_reads_and_writes():
    pack = HttpPack()
    for method in ("GET", "HEAD", "OPTIONS"):
        intent = pack.parse(head(method, "/x"))
        assert not intent.mutates and intent.verb == f"http.{method.lower()}"
    for method in ("PUT", "POST", "DELETE", "PATCH", "PROPFIND"):
        assert pack.parse(head(method, "/x")).mutates, method


def test_webdav_pack_names_and_targets():
    pack = WebdavPack()
    move = pack.parse(head("MOVE", "/a.txt", ("Destination", "http://host:8080/dir/b%20c.txt")))
    assert move.verb == "webdav.move" and move.mutates and move.targets == ["/a.txt", "/dir/b c.txt"]
    assert move.summary == "MOVE /a.txt → /dir/b c.txt"  # where it went, as the README's example shows
    assert pack.parse(head("MOVE", "/a.txt", ("Destination", "/a.txt"))).summary == "MOVE /a.txt"
    assert pack.parse(head("COPY", "/a", ("Destination", "/b/"))).targets == ["/a", "/b"]
    assert not pack.parse(head("PROPFIND", "/dir/")).mutates
    for method in ("PROPPATCH", "MKCOL", "LOCK", "UNLOCK", "DELETE", "PUT"):
        assert pack.parse(head(method, "/x")).mutates, method
    assert pack.parse(head("PUT", "/n/a.txt")).summary == "PUT /n/a.txt"


def test_overlap_is_by_path_segment():
    assert paths_overlap("/d", "/d/x") and paths_overlap("/d/x", "/d") and paths_overlap("/", "/anything")
    assert not paths_overlap("/d", "/dx") and not paths_overlap("/a/b", "/a/c")
    assert targets_conflict(["/a", "/b"], ["/c", "/b/1"]) and not targets_conflict(["/a"], ["/b"])


def test_read_check_compares_status_and_body_not_volatile_headers():
    pack = WebdavPack()
    before = out(pack, 200, b"alpha", [("Date", "Mon"), ("ETag", "1")])
    same = out(pack, 200, b"alpha", [("Date", "Tue"), ("ETag", "2"), ("Server", "x")])
    assert pack.check(recorded(False, before), same) is None
    changed = pack.check(recorded(False, before), out(pack, 200, b"beta"))
    assert changed.kind == "output-changed" and "body" in changed.detail
    gone = pack.check(recorded(False, out(pack, 404, b"nope")), before)
    assert gone.kind == "output-changed" and "404" in gone.detail and "200" in gone.detail


def test_write_check_compares_status_class():
    pack = WebdavPack()
    assert pack.check(recorded(True, out(pack, 201)), out(pack, 204)) is None
    assert pack.check(recorded(True, out(pack, 201)), out(pack, 409)).kind == "now-fails"
    assert pack.check(recorded(True, out(pack, 404)), out(pack, 204)).kind == "now-succeeds"
    assert pack.check(recorded(True, out(pack, 404)), out(pack, 500)).kind == "output-changed"
    assert pack.check(recorded(True, out(pack, 404)), out(pack, 409)) is None


MULTISTATUS = b"""<?xml version="1.0"?><d:multistatus xmlns:d="DAV:">
<d:response><d:href>/dir/%s</d:href><d:propstat><d:prop><d:getcontentlength>5</d:getcontentlength>
<d:getlastmodified>%s</d:getlastmodified><d:getetag>"%s"</d:getetag></d:prop></d:propstat></d:response>
</d:multistatus>"""


def test_propfind_check_ignores_dates_and_etags():
    pack = WebdavPack()
    a = out(pack, 207, MULTISTATUS % (b"a", b"Mon, 01 Jan", b"e1"))
    b = out(pack, 207, MULTISTATUS % (b"a", b"Tue, 02 Jan", b"e2"))
    c = out(pack, 207, MULTISTATUS % (b"b", b"Mon, 01 Jan", b"e1"))
    assert a["body"]["digest"] != b["body"]["digest"]
    assert pack.check(recorded(False, a), b) is None
    assert pack.check(recorded(False, a), c).kind == "output-changed"
    assert normalized_multistatus(b"not xml") is None


def test_lock_token_and_location_are_translated_on_replay():
    pack = WebdavPack()
    names: dict[str, str] = {}
    original = out(pack, 201, headers=[("Location", "/items/1"), ("Lock-Token", "<opaquelocktoken:old>")])
    replayed = out(pack, 201, headers=[("Location", "/items/7"), ("Lock-Token", "<opaquelocktoken:new>")])
    assert original["location"] == "/items/1" and original["lock_token"] == "opaquelocktoken:old"
    pack.learn_names(original, replayed, names)
    request = {"method": "UNLOCK", "path": "/items/1", "headers": [["Lock-Token", "<opaquelocktoken:old>"],
                                                                    ["X-Other", "/items/1"]]}
    rewritten = pack.translate(request, names)
    assert rewritten["path"] == "/items/7"
    assert rewritten["headers"] == [["Lock-Token", "<opaquelocktoken:new>"], ["X-Other", "/items/1"]]
    assert request["path"] == "/items/1"  # the recorded request itself is left alone
    assert pack.translate({"path": "/items/10/x", "headers": []}, names)["path"] == "/items/10/x"
    assert pack.translate({"path": "/items/1/x?y", "headers": []}, names)["path"] == "/items/7/x?y"
    chained = {"/items/1": "/items/2", "/items/2": "/items/3"}   # ids handed out again, shifted by one
    assert pack.translate({"path": "/items/1", "headers": []}, chained)["path"] == "/items/2"
    assert pack.translate({"path": "/items/2", "headers": []}, chained)["path"] == "/items/3"


def test_load_pack():
    assert isinstance(load_pack("webdav"), WebdavPack)
    assert isinstance(load_pack("verbs.http:HttpPack"), HttpPack)
    for bad in ("nosuch", "verbs.http:Nope", "no.such.module:X"):
        with pytest.raises(ValueError):
            load_pack(bad)
