"""Load test of the web app: start-up time, 8 concurrent clients, peak memory. Loopback only.

    python scripts/load_test.py [--clients 8] [--methods clip,abu] [--json assets/benchmarks/app_load_test.json]

Starts ``python app.py`` as a child process on a free port, times until it answers, then runs N
gradio_client clients at once, each generating one image (its own prompt and seed) and attributing it
with the given methods. Prints per-request latencies, errors, and the server's peak RSS (VmHWM), then
stops the server. Bounded: at most --timeout seconds in all.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["red apple", "red heart", "banana", "grinning face", "sun", "pizza", "rocket", "snowman", "fish", "ghost"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def client_run(url: str, i: int, methods: list[str], out: list, deadline: float):
    from gradio_client import Client

    rec = {"client": i, "errors": [], "seconds": {}}
    try:
        c = Client(url, verbose=False)
        prompt, seed = PROMPTS[i % len(PROMPTS)], i
        t0 = time.perf_counter()
        c.predict(prompt, seed, 50, 3.0, api_name="/generate")
        rec["seconds"]["generate"] = time.perf_counter() - t0
        for m in methods:
            if time.time() > deadline:
                rec["errors"].append("deadline")
                break
            t0 = time.perf_counter()
            head, tiles = c.predict(prompt, seed, 50, 3.0, None, "", None, None, None, None, 10, [m], "fast",
                                    api_name=f"/attribute_{m}")
            rec["seconds"][m] = time.perf_counter() - t0
            if len(tiles) != 10:
                rec["errors"].append(f"{m}: {len(tiles)} tiles")
    except Exception as e:  # a load test reports failures instead of stopping at the first
        rec["errors"].append(f"{type(e).__name__}: {e}")
    out.append(rec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--methods", default="clip,abu")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--json", default="")
    args = p.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_ANALYTICS_ENABLED": "False"}
    t0 = time.perf_counter()
    log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty server never blocks on a full pipe
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py")], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + args.timeout
    try:
        import urllib.request

        while True:
            if server.poll() is not None:
                log.seek(0)
                print(log.read().decode(errors="replace")[-2000:], file=sys.stderr)
                raise SystemExit("app.py exited during start-up")
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit("app.py did not answer in time")
                time.sleep(0.2)
        startup = time.perf_counter() - t0
        rss_idle = peak_rss_mb(server.pid)
        print(f"start-up {startup:.1f} s (process start to first HTTP answer), peak RSS {rss_idle:.0f} MB")
        records: list = []
        threads = [threading.Thread(target=client_run, args=(url, i, methods, records, deadline))
                   for i in range(args.clients)]
        t1 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, deadline - time.time()))
        wall = time.perf_counter() - t1
        rss = peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    errors = [e for r in records for e in r["errors"]]
    summary = {"clients": args.clients, "methods": methods, "startup_seconds": startup, "wall_seconds": wall,
               "peak_rss_mb": rss, "rss_after_startup_mb": rss_idle, "completed": len(records),
               "errors": errors, "threads": os.environ.get("OMP_NUM_THREADS", "default"),
               "latency": {k: {"median": statistics.median(v), "max": max(v)}
                           for k in ["generate", *methods]
                           if (v := [r["seconds"][k] for r in records if k in r["seconds"]])}}
    for k, v in summary["latency"].items():
        print(f"  {k:9} median {v['median']:6.1f} s  max {v['max']:6.1f} s (queued behind each other)")
    print(f"{len(records)}/{args.clients} clients finished in {wall:.1f} s, {len(errors)} errors, "
          f"server peak RSS {rss:.0f} MB")
    for e in errors:
        print("  error:", e)
    if args.json:
        sys.path.insert(0, str(ROOT))
        from abu_explorer.artifacts import save_json

        save_json(Path(args.json), summary)
    return 0 if not errors and len(records) == args.clients else 1


if __name__ == "__main__":
    raise SystemExit(main())
