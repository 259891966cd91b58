"""Container HEALTHCHECK: GET a path on the local server, exit 0 when it answers well.

Standard library only, so it runs in the slim images without curl.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", nargs="?", default="/healthz")
    parser.add_argument("--port-env", default="VEIL_CORE_PORT", help="env var holding the port")
    parser.add_argument("--port", type=int, default=8001, help="port when the env var is unset")
    parser.add_argument("--any-response", action="store_true", help="treat any status < 500 as up")
    parser.add_argument("--timeout", type=float, default=4.0)
    args = parser.parse_args(argv)
    port = int(os.environ.get(args.port_env) or args.port)
    url = f"http://127.0.0.1:{port}{args.path}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    healthy = status < 500 if args.any_response else 200 <= status < 300
    if not healthy:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
