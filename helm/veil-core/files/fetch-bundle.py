"""Init container: download the core bundle over HTTP(S) into BUNDLE_DEST.

Env: BUNDLE_BASE_URL, BUNDLE_FILES (comma list), BUNDLE_SHA256 (JSON {file: hex}),
BUNDLE_DEST, optional BUNDLE_AUTHORIZATION (sent as the Authorization header).
Standard library only; it runs in the core image.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.request

CHUNK = 1 << 20
ATTEMPTS = 4


def fetch(url: str, dest: str, expected: str | None, headers: dict[str, str]) -> None:
    part = dest + ".part"
    for attempt in range(1, ATTEMPTS + 1):
        digest = hashlib.sha256()
        try:
            request = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(request, timeout=60) as response, open(part, "wb") as out:
                while chunk := response.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == ATTEMPTS:  # 4xx will not get better
                raise SystemExit(f"fetch-bundle: {url}: HTTP {exc.code}") from exc
            print(f"fetch-bundle: {url}: HTTP {exc.code}; retry {attempt}", file=sys.stderr)
            time.sleep(2**attempt)
            continue
        except (urllib.error.URLError, OSError) as exc:
            if attempt == ATTEMPTS:
                raise SystemExit(f"fetch-bundle: {url}: {exc}") from exc
            print(f"fetch-bundle: {url}: {exc}; retry {attempt}", file=sys.stderr)
            time.sleep(2**attempt)
            continue
        got = digest.hexdigest()
        if expected and got != expected.lower():
            os.unlink(part)
            raise SystemExit(f"fetch-bundle: {url}: sha256 {got} does not match {expected}")
        os.replace(part, dest)
        print(f"fetch-bundle: {os.path.basename(dest)} sha256={got}")
        return


def main() -> None:
    base = os.environ["BUNDLE_BASE_URL"].rstrip("/")
    files = [f for f in os.environ.get("BUNDLE_FILES", "").split(",") if f]
    sums = json.loads(os.environ.get("BUNDLE_SHA256") or "{}")
    dest = os.environ.get("BUNDLE_DEST", "/bundle")
    headers = {}
    if os.environ.get("BUNDLE_AUTHORIZATION"):
        headers["Authorization"] = os.environ["BUNDLE_AUTHORIZATION"]
    if not base or not files:
        raise SystemExit("fetch-bundle: BUNDLE_BASE_URL and BUNDLE_FILES must be set")
    os.makedirs(dest, exist_ok=True)
    for name in files:
        if "/" in name or name in (".", ".."):
            raise SystemExit(f"fetch-bundle: bad file name {name!r}")
        fetch(f"{base}/{name}", os.path.join(dest, name), sums.get(name), headers)


if __name__ == "__main__":
    main()
