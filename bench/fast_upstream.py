#!/usr/bin/env python3
"""A minimal HTTP upstream that answers at once (for bench/replay.py): writes (PUT, POST, MKCOL, ...) get
201 with an empty body, DELETE 204, reads 200 with a fixed small body. Usage: fast_upstream.py PORT"""
from __future__ import annotations

import sys

from aiohttp import web

BODY = b"ok\n"


async def handle(request: web.BaseRequest) -> web.Response:
    if request.body_exists:
        await request.read()
    if request.method in ("GET", "HEAD", "OPTIONS", "PROPFIND"):
        return web.Response(body=BODY, content_type="text/plain")
    if request.method == "DELETE":
        return web.Response(status=204)
    return web.Response(status=201)


def main() -> None:
    try:  # the stand-in for a fast service must not be the bottleneck it measures
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    web.run_app(_app(), host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


def _app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


if __name__ == "__main__":
    main()
