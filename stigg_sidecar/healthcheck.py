"""`python -m stigg_sidecar.healthcheck`: the container's HEALTHCHECK, from the sidecar's own settings.

Asks the liveness path (HEALTH_ENDPOINT_URL) on HTTP_PORT at the address the HTTP server listens on
(HTTP_BIND_ADDRESS, else BIND_ADDRESS; a wildcard means loopback), so moving the port or the path needs no change to the
image. Exit 0 when it answers 200; otherwise 1 with one line on stderr.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from stigg_sidecar.settings import SPECS

_SPECS = {spec.env: spec for spec in SPECS}
_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def liveness_url(environ: Mapping[str, str]) -> str:
    def setting(name: str) -> Any:
        spec = _SPECS[name]
        try:
            return spec.parse(environ.get(name) or spec.default or "")
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None

    address = str(setting("HTTP_BIND_ADDRESS")) or str(setting("BIND_ADDRESS"))
    host = _WILDCARDS.get(address, address)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{setting('HTTP_PORT')}/{setting('HEALTH_ENDPOINT_URL')}"


def main(environ: Mapping[str, str] | None = None, timeout: float = 2.0) -> int:
    try:
        url = liveness_url(os.environ if environ is None else environ)
    except ValueError as e:
        print(f"stigg-sidecar healthcheck: bad setting: {e}", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, OSError) as e:
        print(f"stigg-sidecar healthcheck: {url}: {getattr(e, 'reason', e)}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"stigg-sidecar healthcheck: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
