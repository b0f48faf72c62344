"""Container health check without curl: exit 0 when every URL given answers 2xx within the timeout.

Used for the unauthenticated health endpoints only (MLflow ``/health``, Ray ``/api/gcs_healthz`` and the node
agent's ``/api/local_raylet_healthz``), so it needs no credentials.
"""

import sys
import urllib.request

TIMEOUT_S = 5


def main(urls: list[str]) -> int:
    if not urls:
        print("usage: healthcheck.py URL...", file=sys.stderr)
        return 2
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                if not 200 <= response.status < 300:
                    print(f"{url}: HTTP {response.status}", file=sys.stderr)
                    return 1
        except OSError as exc:
            print(f"{url}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
