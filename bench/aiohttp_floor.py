"""``python -m bench.aiohttp_floor --port N --upstream URL``: the least an aiohttp proxy can do.

Not a product: a reference for the overhead scenario. It reads the request body, sends it
upstream on one client session, reads the answer and returns it — no admission, no spool, no
logs, no metrics. Whatever the gatekeeper costs beyond this is the gatekeeper's own doing;
what this costs over HAProxy is the price of CPython and aiohttp.
"""

import argparse
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

__all__ = ["main"]

_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host"})


def _app(upstream: str) -> web.Application:
    app = web.Application()
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[session_key] = aiohttp.ClientSession(auto_decompress=False)
        yield
        await app[session_key].close()

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with app[session_key].request(
            request.method, upstream + request.path_qs, data=body, headers=headers
        ) as answer:
            payload = await answer.read()
            out = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP}
            return web.Response(status=answer.status, body=payload, headers=out)

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aiohttp_floor", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args(argv)
    web.run_app(_app(args.upstream), host="127.0.0.1", port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
