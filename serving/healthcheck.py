"""`python -m serving.healthcheck`: exit 0 when the local service answers /ready, else 1 (Docker HEALTHCHECK)."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from serving.errors import SettingsError
from serving.settings import load_settings


def main() -> int:
    try:
        settings = load_settings()
    except SettingsError as error:
        print(f"healthcheck: {error}", file=sys.stderr)
        return 1
    port = settings.port
    # a wildcard bind answers on loopback; a specific address is probed where the service listens
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    host = f"[{host}]" if ":" in host else host
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/ready", timeout=5) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as error:
        print(f"healthcheck: service on port {port} not ready: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
