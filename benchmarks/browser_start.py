"""`featurestore serve --store`: seconds until the port opens, and until the browser's first page has its data.

    python benchmarks/browser_start.py [--store DIR] [--graphs DIR] [--repeats 3]

Without --store, the demo checkpoint and a store of 16 demo traces are built under --work (once). Each repeat
starts the CLI as a fresh process (cold imports), polls the port, then asks what the first page asks
(/api/overview, the first /api/features page, its sparklines) and one feature page. Prints medians and the
ratio to the targets: port open in 3 s, first page in 1 s (both measured from process start / first request).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PORT_TARGET_S, FIRST_PAGE_TARGET_S = 3.0, 1.0


def demo_store(work: Path) -> Path:
    import featurestore as fs
    from featurestore.demo import TRACES_PATH, build_demo_checkpoint

    store = work / "store"
    if not (store / "featurestore.json").exists():
        checkpoint = build_demo_checkpoint(work / "checkpoint")
        fs.collect(str(checkpoint), str(TRACES_PATH), store, max_samples=16, progress=False)
    return store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=120) as response:
        return json.loads(response.read())


def one_run(store: Path, graphs: Path | None) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "cli.main", "serve", "--store", str(store), "--port", str(port)]
    if graphs:
        command += ["--graphs", str(graphs)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if process.poll() is not None:
                    raise SystemExit("serve exited before opening its port")
                time.sleep(0.02)
        port_s = time.perf_counter() - start
        base = f"http://127.0.0.1:{port}"
        first = time.perf_counter()
        get(base + "/api/overview")
        page = get(base + "/api/features?limit=50")
        layers = sorted({r["layer"] for r in page["rows"]})
        for layer in layers:
            features = ",".join(str(r["feature"]) for r in page["rows"] if r["layer"] == layer)
            get(f"{base}/api/sparklines?layer={layer}&features={features}")
        first_page_s = time.perf_counter() - first
        top = get(base + "/api/features?limit=1&sort=count")["rows"][0]
        feature = time.perf_counter()
        get(f"{base}/api/feature?layer={top['layer']}&feature={top['feature']}")
        feature_s = time.perf_counter() - feature
    finally:
        process.terminate()
        process.wait(timeout=30)
    return {"port_s": port_s, "first_page_s": first_page_s, "feature_page_s": feature_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path)
    parser.add_argument("--graphs", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/featurestore-browser-bench"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    store = args.store or demo_store(args.work)
    runs = [one_run(store, args.graphs) for _ in range(args.repeats)]
    for run in runs:
        print(json.dumps({k: round(v, 3) for k, v in run.items()}))
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"median over {len(runs)} runs: port open {median['port_s']:.2f} s, first page {median['first_page_s']:.2f} s, "
          f"feature page (uncached) {median['feature_page_s']:.2f} s")
    print(f"ratio target/measured: port {PORT_TARGET_S / median['port_s']:.2f}x (target {PORT_TARGET_S:g} s), "
          f"first page {FIRST_PAGE_TARGET_S / median['first_page_s']:.2f}x (target {FIRST_PAGE_TARGET_S:g} s); "
          ">= 1 meets the target")


if __name__ == "__main__":
    main()
