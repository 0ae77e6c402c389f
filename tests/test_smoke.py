"""The whole path once: a PUT through the proxy is recorded, committed and visible in the timeline."""
import urllib.request


def test_put_is_recorded(proxy_stack):
    stack = proxy_stack()
    req = urllib.request.Request(stack.url + "/hello.txt", data=b"hi", method="PUT")
    with urllib.request.urlopen(req) as resp:
        assert resp.status == 201
    assert (stack.volume / "hello.txt").read_bytes() == b"hi"
    verbs = stack.timeline()
    assert [(v["verb"], v["status"], v["targets"]) for v in verbs] == [("webdav.put", "committed", ["/hello.txt"])]
