"""``python -m bench.gk_uvloop serve ...``: the unchanged gatekeeper, on uvloop's event loop.

uvloop is not a dependency of the gatekeeper; the benchmark measures what it would bring.
"""

import asyncio
import sys

import uvloop

from gatekeeper.cli import main

if __name__ == "__main__":
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    sys.exit(main(sys.argv[1:]))
