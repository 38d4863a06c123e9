"""The image's HEALTHCHECK: exit 0 when GET /health on the server in this container answers 200."""

import os
import sys
import urllib.error
import urllib.request

port = os.environ.get("TZD_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except (urllib.error.URLError, OSError) as e:
    print(f"health: {e}", file=sys.stderr)
    sys.exit(1)
