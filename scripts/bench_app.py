"""The app under a bounded load on 127.0.0.1: concurrent clients on the feature, prompt and steering pages.

    python scripts/bench_app.py [--json PATH] [--clients 8] [--requests 10] [--run RUN]

Serves RUN (default: a small run built here in a temporary folder, as the app's tests build theirs: 4,096 MiniLM
tokens at blocks.1.hook_resid_post, a TopK SAE with k 16 and 1,536 latents, its analysis) with
`saelab.dashboards.app.serve` in a child process, so the memory measured is the server's alone. For each page in
turn, --clients threads each send --requests requests one after another (a closed loop, each waiting for its
answer) to the callback a browser calls when it opens the page's URL: feature pages of random latents, prompts and
steering requests (a latent, a coefficient, a prompt or query) that differ from request to request. Prints per
page the p50 and p95 latency, the requests that failed (not HTTP 200, or answered with an error box), and the
server's resident memory when it has started, after one request of each page (the model loaded) and after the load.
Then, the server stopped, the CPU time of one feature page request in this process (the app's Flask test client,
50 random latents, the analysis opened but no chunk of it read yet): the figure that the machine's load does not
change, which the latency under 8 clients follows (the clients take turns on the GIL).
"""

from __future__ import annotations

import gc
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
from _bench import load_note, parser, write_json  # scripts/ is on the path when run as a script

from saelab.analysis import FeatureStore
from saelab.dashboards.app import create_app
from saelab.run import RunDir
from saelab.toys.runs import small_run

CALLBACK = "/_dash-update-component"
HOOK = "blocks.1.hook_resid_post"
TEXTS = [
    "Return the absolute value of a number",
    "Open a network connection to a host",
    "Read the whole file into memory",
    "Raise an error when the key is missing",
    "Sort the list in place and return None",
    "Create a new thread and start it",
    "Parse the date string into a datetime",
    "Close the socket and release its resources",
]


def build_run(root: Path) -> Path:
    """A small analysed MiniLM run at `root/run` (about a minute on two CPU cores)."""
    return small_run(root, "minilm", HOOK, k=16, expansion=4, analysed=True)


def route(path: str, **query: Any) -> bytes:
    """The body of the callback that renders the page `path?query` (what the browser posts on opening a URL)."""
    inputs = [
        {"id": "url", "property": "pathname", "value": path},
        {"id": "url", "property": "search", "value": "?" + urlencode(query)},
    ]
    request = {
        "output": "page.children",
        "outputs": {"id": "page", "property": "children"},
        "inputs": inputs,
        "changedPropIds": ["url.pathname"],
    }
    return json.dumps(request).encode()


def has_error_box(node: Any) -> bool:
    """Whether a callback's answer (parsed JSON) holds an error box."""
    if isinstance(node, dict):
        props = node.get("props")
        if isinstance(props, dict) and props.get("className") == "error":
            return True
        return any(has_error_box(v) for v in node.values())
    return isinstance(node, list) and any(has_error_box(v) for v in node)


def post(base: str, body: bytes) -> tuple[float, bool]:
    """Seconds to answer one callback request, and whether it failed."""
    start = time.perf_counter()
    request = urllib.request.Request(base + CALLBACK, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())
            failed = response.status != 200 or has_error_box(answer)
    except OSError:  # an HTTP error status, a refused or dropped connection
        failed = True
    return time.perf_counter() - start, failed


def rss_mb(pid: int) -> float:
    """The resident memory of process `pid` in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int) -> subprocess.Popen[bytes]:
    """`serve(run)` on 127.0.0.1:`port` in a child process, once it answers."""
    code = f"from saelab.dashboards.app import serve; serve({str(run)!r}, host='127.0.0.1', port={port})"
    server = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).close()
            return server
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with status {server.returncode}") from None
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("the server did not answer within a minute")


def requests_for(run: Path, clients: int, n: int) -> dict[str, list[list[bytes]]]:
    """Per page, each client's `n` request bodies."""
    sae = next(iter(RunDir(run).saes()))
    n_features = FeatureStore.open(str(RunDir(run).analysis(sae.hook, sae.variant))).n_features
    rng = np.random.default_rng(0)
    where = {"hook": sae.hook, "sae": sae.variant}

    def texts(client: int) -> list[str]:
        return [TEXTS[(client + i) % len(TEXTS)] + " " * (i // len(TEXTS)) for i in range(n)]

    return {
        "feature": [
            [route("/feature", **where, id=int(i)) for i in rng.integers(0, n_features, n)] for _ in range(clients)
        ],
        "prompt": [[route("/prompt", **where, text=t) for t in texts(c)] for c in range(clients)],
        "steering": [
            [
                route("/steering", **where, latent=int(rng.integers(0, n_features)), coef=2 + i % 4, text=t)
                for i, t in enumerate(texts(c))
            ]
            for c in range(clients)
        ],
    }


def load(base: str, bodies: list[list[bytes]]) -> dict[str, Any]:
    """Every client sends its bodies in turn, all clients at once: latency percentiles (ms) and failures."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = [r for client in pool.map(lambda own: [post(base, b) for b in own], bodies) for r in client]
    times = sorted(t for t, _ in results)
    return {
        "requests": len(results),
        "p50_ms": round(1000 * statistics.median(times), 1),
        "p95_ms": round(1000 * float(np.percentile(times, 95)), 1),
        "errors": sum(failed for _, failed in results),
    }


def feature_cpu(run: Path, n: int = 50) -> dict[str, float]:
    """CPU time (ms, this process's, every thread) of `n` feature page requests of random latents, answered in
    this process by the app's Flask test client after one request has opened the analysis: median and p95."""
    client = create_app(str(run)).server.test_client()
    sae = next(iter(RunDir(run).saes()))
    ids = np.random.default_rng(1).integers(
        1, FeatureStore.open(str(RunDir(run).analysis(sae.hook, sae.variant))).n_features, n
    )

    def ask(i: int) -> None:
        body = route("/feature", hook=sae.hook, sae=sae.variant, id=i)
        answer = client.post(CALLBACK, data=body, headers={"Content-Type": "application/json"})
        if answer.status_code != 200 or has_error_box(answer.get_json()):
            raise RuntimeError(f"the feature page of latent {i} failed: {answer.data[:300]!r}")

    ask(0)
    gc.freeze()  # as `serve` does
    times = []
    for i in ids.tolist():
        start = time.process_time()
        ask(i)
        times.append(1000 * (time.process_time() - start))
    return {"median_ms": round(statistics.median(times), 2), "p95_ms": round(float(np.percentile(times, 95)), 2)}


def main() -> None:
    args = parser(__doc__, clients=8, requests=10)
    args.add_argument("--run", help="the run directory to serve (default: build a small one)")
    options = args.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(options.run) if options.run else build_run(Path(tmp))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = start_server(run, port)
        try:
            memory = {"started_mb": rss_mb(server.pid)}
            work = requests_for(run, options.clients, options.requests)
            for bodies in work.values():  # the first request of a page opens what it reads and loads the model
                post(base, bodies[0][0])
            memory["warm_mb"] = rss_mb(server.pid)
            pages = {page: load(base, bodies) for page, bodies in work.items()}
            memory["after_mb"] = rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait()
        cpu = feature_cpu(run)
    print(f"{options.clients} clients x {options.requests} requests per page; {load_note()}")
    for page, row in pages.items():
        print(f"  {page:9s} p50 {row['p50_ms']:8.1f} ms  p95 {row['p95_ms']:8.1f} ms  errors {row['errors']}")
    print(
        "  server RSS: {started_mb:.0f} MB started, {warm_mb:.0f} MB warm, {after_mb:.0f} MB after the load".format(
            **memory
        )
    )
    print("  feature page CPU time in-process: median {median_ms:.1f} ms, p95 {p95_ms:.1f} ms".format(**cpu))
    write_json(options.json, options, {"pages": pages, "memory_mb": memory, "feature_cpu_ms": cpu})


if __name__ == "__main__":
    main()
