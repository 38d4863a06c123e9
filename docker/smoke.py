"""Smoke test of a running TZD server through its published port (docker/test.sh runs it; stdlib only).

    python docker/smoke.py http://127.0.0.1:8000 [--api-key KEY] [--model NAME] [--path DIR]
                           [--max-tokens-limit N] [--dashboard GRAFANA_JSON]

Checks /health, POST /generate as JSON and as an SSE stream, the API key (when given), the
max_tokens limit (when given), /metrics, and that every metric a Grafana dashboard queries is one the
server exports (when given). Prints `ok - ...` or `FAIL - ...` per check; the exit
status is the number of failures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import sys
import time
import urllib.parse

TIMEOUT = 120


class Server:
    def __init__(self, base: str, api_key: str | None) -> None:
        url = urllib.parse.urlsplit(base)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.api_key = api_key

    def request(self, method: str, path: str, body: dict | None = None, auth: bool = True,
                stream: bool = False) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
        headers = {"Accept": "text/event-stream" if stream else "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if auth and self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()


def parse_sse(raw: bytes) -> list[tuple[str, dict]]:
    """SSE frames as (event, data) pairs; frames are separated by a blank line."""
    events = []
    for frame in re.split(r"\r?\n\r?\n", raw.decode("utf-8")):
        name, data = "message", []
        for line in frame.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
        if data:
            events.append((name, json.loads("\n".join(data))))
    return events


_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("", "_sum", "_count", "_created"), "info": ("_info",), "gauge": ("",), "untyped": ("",)}


def exported_samples(exposition: str) -> set[str]:
    """Every sample name the exposition can carry, from its # TYPE lines (labelled families may have no samples
    yet)."""
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M):
        names.add(name)  # prometheus_client writes a counter's TYPE line with its _total name
        names.update(name + suffix for suffix in _SUFFIXES.get(kind, ("",)))
    return names


def dashboard_metrics(path: str) -> set[str]:
    """The metric names in a Grafana dashboard's PromQL expressions."""
    with open(path, encoding="utf-8") as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", []) if t.get("expr")]
    return {m for e in exprs for m in re.findall(r"\b((?:tzd|process)_[a-z0-9_]+)\b", e)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base_url")
    ap.add_argument("--api-key")
    ap.add_argument("--model", help="the model name /health must report")
    ap.add_argument("--path", help="the checkpoint directory tzd_model_info must report")
    ap.add_argument("--max-tokens-limit", type=int, help="the server's configured max_tokens limit")
    ap.add_argument("--dashboard", help="a Grafana dashboard JSON whose queries must name exported metrics")
    args = ap.parse_args()
    srv = Server(args.base_url, args.api_key)
    failures = 0

    def check(ok: bool, what: str, detail: object = "") -> bool:
        nonlocal failures
        print(f"{'ok' if ok else 'FAIL'} - {what}" + ("" if ok or detail == "" else f": {detail}"))
        failures += not ok
        return ok

    status, _, body = srv.request("GET", "/health")
    health = json.loads(body) if status == 200 else {}
    check(status == 200 and health.get("status") == "ok", "GET /health is 200 and ok", (status, body[:200]))
    if args.model:
        check(health.get("model") == args.model, f"/health names the model {args.model!r}", health)

    prompt = "ROMEO: But soft, what light"
    if args.api_key:
        status, _, body = srv.request("POST", "/generate", {"prompt": prompt, "max_tokens": 4}, auth=False)
        check(status == 401, "POST /generate without the API key is 401", (status, body[:200]))

    n = 16
    status, headers, body = srv.request("POST", "/generate", {"prompt": prompt, "max_tokens": n, "seed": 1})
    if check(status == 200 and headers.get("content-type", "").startswith("application/json"),
             "POST /generate (JSON) is 200", (status, body[:300])):
        out = json.loads(body)
        tokens = out.get("tokens", [])
        check(isinstance(out.get("text"), str) and 0 < len(tokens) <= n
              and out.get("usage", {}).get("completion_tokens") == len(tokens)
              and out.get("finish_reason") in ("length", "stop"),
              f"the JSON answer has text, 1..{n} tokens and matching usage", out)

    n = 8
    status, headers, body = srv.request("POST", "/generate", {"prompt": prompt, "max_tokens": n, "stream": True},
                                        stream=True)
    if check(status == 200 and headers.get("content-type", "").startswith("text/event-stream"),
             "POST /generate (stream) is 200 text/event-stream", (status, headers.get("content-type"))):
        events = parse_sse(body)
        names = [e for e, _ in events]
        steps = [d for e, d in events if e == "step"]
        done = events[-1][1] if events and events[-1][0] == "done" else None
        check(len(steps) >= 1 and done is not None and names.count("done") == 1,
              "the stream is step events then one done event", names)
        if done is not None:
            check(isinstance(done.get("text"), str) and done.get("steps") == steps[-1].get("step", -2) + 1
                  and done.get("usage", {}).get("completion_tokens") == len(done.get("tokens", [])),
                  "the done event has the text, usage, and the step count of the last step event",
                  {"done": done, "last_step": steps[-1] if steps else None})

    if args.max_tokens_limit:
        status, _, body = srv.request("POST", "/generate", {"prompt": prompt, "max_tokens": args.max_tokens_limit + 1})
        check(400 <= status < 500, f"max_tokens above the configured limit ({args.max_tokens_limit}) is refused "
              "with a 4xx", (status, body[:200]))

    # a stream is counted when its response has ended on the server, which can be a moment after the client
    # read its last event: read /metrics until both generations are in (or 5 s pass), then check
    deadline = time.monotonic() + 5
    while True:
        status, headers, body = srv.request("GET", "/metrics", auth=False)
        text = body.decode("utf-8", "replace")
        counted = re.search(r'^tzd_requests_total\{[^}]*endpoint="generate"[^}]*status="200"[^}]*\} (\S+)$', text, re.M)
        if status != 200 or (counted and float(counted.group(1)) >= 2) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if check(status == 200 and headers.get("content-type", "").startswith("text/plain"), "GET /metrics is 200",
             (status, headers.get("content-type"))):
        m = re.search(r'^tzd_requests_total\{[^}]*endpoint="generate"[^}]*status="200"[^}]*\} (\S+)$', text, re.M)
        check(m is not None and float(m.group(1)) >= 2, "tzd_requests_total counts the two 200 generations",
              m.group(0) if m else "no tzd_requests_total{endpoint=generate,status=200}")
        m = re.search(r"^tzd_generated_tokens_total (\S+)$", text, re.M)
        check(m is not None and float(m.group(1)) > 0, "tzd_generated_tokens_total > 0",
              m.group(0) if m else "missing")
        if args.path:
            m = re.search(r'^tzd_model_info\{.*\bpath="([^"]*)"', text, re.M)
            check(m is not None and m.group(1).rstrip("/") == args.path.rstrip("/"),
                  f"tzd_model_info: the server loaded {args.path}", m.group(0) if m else "no tzd_model_info")
        if args.dashboard:
            unknown = sorted(dashboard_metrics(args.dashboard) - exported_samples(text))
            check(not unknown, f"every metric {args.dashboard} queries is exported", unknown)
    print(f"smoke: {failures} failure(s)")
    return failures


if __name__ == "__main__":
    sys.exit(main())
