"""``bench load``: the web app under load, a real retrain running, the admission caps tried. Loopback only.

    python -m abu_explorer bench load [--browsers 8] [--api-clients 32] [--seconds 300] [--json FILE]

Phases, against ``python app.py`` started here as a child (its own process group, a temporary results
folder, so no committed result short-cuts a retrain):

1. start-up: process start to the first HTTP answer;
2. idle probe: one client, ``--probe`` AbU fast-mode attributions of fixed (prompt, seed) queries, timed;
3. retrains: four simulated visitors (``X-Forwarded-For``) request remove-and-regenerate until the global cap
   is full (one retrain runs, the rest queue), then one over the global cap and one over a visitor's own cap,
   both of which must be refused in one line;
4. retrain probe: the same probe while the retrain runs, so the two p95s compare (the ratio is the figure),
   and its rankings must equal the idle ones (no request path shares RNG state with the job);
5. mixed load: ``--browsers`` headless Chromiums (Playwright, Debian's ``/usr/bin/chromium``) run the page's
   generate -> attribute flow and ``--api-clients`` ``gradio_client`` clients mix generate / attribute /
   box requests, for ``--seconds``, while a monitor polls the job list (the caps must hold throughout) and
   the server's memory.

Prints p50 / p95 per endpoint and phase, errors (expected refusals are not errors), peak RSS of the server
and of its retrain process, and whether the caps held; exits 1 on any error or a cap that did not hold.
"""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["red apple", "red heart", "banana", "grinning face", "sun", "pizza", "rocket", "snowman", "fish",
           "ghost", "green apple", "blue heart", "cat face", "crescent moon", "hot pepper", "watermelon"]
CHROMIUM = os.environ.get("ABU_CHROMIUM", "/usr/bin/chromium")
BOX = (4, 4, 24, 24)
BUSY = "the server is busy"  # the waiting room's one-line refusal (app/turns.py)


class Tally:
    """Latencies per (phase, endpoint) and errors, from many threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seconds: dict[tuple[str, str], list[float]] = {}
        self.errors: list[str] = []
        self.busy: dict[str, int] = {}  # refusals by the full waiting room, per endpoint: not errors

    def add(self, phase: str, endpoint: str, seconds: float) -> None:
        with self.lock:
            self.seconds.setdefault((phase, endpoint), []).append(seconds)

    def error(self, where: str, e: BaseException | str) -> None:
        with self.lock:
            self.errors.append(f"{where}: {e if isinstance(e, str) else f'{type(e).__name__}: {e}'}"[:300])

    def refused(self, endpoint: str) -> None:
        with self.lock:
            self.busy[endpoint] = self.busy.get(endpoint, 0) + 1

    def summary(self) -> dict:
        out: dict = {}
        for (phase, endpoint), v in sorted(self.seconds.items()):
            out.setdefault(phase, {})[endpoint] = {"n": len(v), "p50": float(np.percentile(v, 50)),
                                                   "p95": float(np.percentile(v, 95)), "max": max(v)}
        return out


# --- the server -----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(precomputed: str, results: Path, timeout_s: float = 300) -> tuple[subprocess.Popen, str, float]:
    port = _free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_ANALYTICS_ENABLED": "False", "ABU_RESULTS_DIR": str(results)}
    log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty server never blocks on a full pipe
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--precomputed", precomputed], env=env,
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    while True:
        if server.poll() is not None:
            log.seek(0)
            raise SystemExit("app.py exited during start-up:\n" + log.read().decode(errors="replace")[-2000:])
        try:
            urllib.request.urlopen(url, timeout=1)
            return server, url, time.perf_counter() - t0
        except OSError:
            if time.perf_counter() - t0 > timeout_s:
                raise SystemExit(f"app.py did not answer within {timeout_s:.0f} s") from None
            time.sleep(0.2)


def stop_server(server: subprocess.Popen) -> None:
    """The server and its retrain process (same process group) stop together."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(server.pid, signal.SIGKILL)


def memory_mb(pid: int) -> dict:
    """Peak RSS (VmHWM) of the process and of each of its children, in MB."""
    def hwm(p):
        try:
            line = next(ln for ln in Path(f"/proc/{p}/status").read_text().splitlines() if ln.startswith("VmHWM:"))
            return int(line.split()[1]) / 1024
        except (OSError, StopIteration):
            return 0.0
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        children += [int(c) for c in task.read_text().split()]
    return {"server": hwm(pid), "children": {c: hwm(c) for c in children}}


# --- clients -------------------------------------------------------------------------------------------

def client(url: str, visitor: str):
    from gradio_client import Client

    # HTTP timeout 60 s: on the 2-core host the server shares the CPUs with 8 Chromiums and a retrain, and an
    # answer may take longer than httpx's 5 s default (a browser waits; these clients should too)
    return Client(url, verbose=False, download_files=False, headers={"X-Forwarded-For": visitor},
                  httpx_kwargs={"timeout": 60})


def attribute(c, prompt: str, seed: int, method: str, box=(None,) * 4, k: int = 10) -> list[str]:
    """The app's attribution endpoint for one method; the captions of its tiles, in rank order."""
    _, tiles = c.predict(prompt, seed, 50, 3.0, None, "", *box, k, [method], "fast", api_name=f"/attribute_{method}")
    if len(tiles) != k:
        raise AssertionError(f"{method}: {len(tiles)} tiles, expected {k}")
    return [t["caption"] for t in tiles]


def probe(url: str, n: int, phase: str, tally: Tally) -> list[list[str]]:
    """n AbU fast-mode attributions of fixed queries, one after another, each timed."""
    c = client(url, "10.0.9.1")
    rankings = []
    for i in range(n):
        prompt, seed = PROMPTS[i % len(PROMPTS)], i
        c.predict(prompt, seed, 50, 3.0, api_name="/generate")
        t0 = time.perf_counter()
        rankings.append(attribute(c, prompt, seed, "abu"))
        tally.add(phase, "abu fast (probe)", time.perf_counter() - t0)
    return rankings


def api_worker(url: str, i: int, until: float, tally: Tally, methods: list[str]) -> None:
    rng = random.Random(i)
    try:
        c = client(url, f"10.0.1.{i}")
    except Exception as e:  # a load test reports failures instead of stopping at the first
        tally.error(f"api client {i}", e)
        return
    while time.time() < until:
        prompt, seed = rng.choice(PROMPTS), rng.randrange(100)
        op = rng.choice(("generate", "attribute", "box"))
        method = rng.choice(methods)
        endpoint = "generate" if op == "generate" else f"{method}{' box' if op == 'box' else ''}"
        t0 = time.perf_counter()
        try:
            if op == "generate":
                c.predict(prompt, seed, 50, 3.0, api_name="/generate")
            else:
                attribute(c, prompt, seed, method, BOX if op == "box" else (None,) * 4)
            tally.add("load", endpoint, time.perf_counter() - t0)
        except Exception as e:
            if BUSY not in str(e):
                tally.error(f"api client {i} {op} {method}", e)
                continue
            tally.refused(endpoint)  # as a visitor would: wait a little, then ask again
            tally.add("load", f"{endpoint} (refused: busy)", time.perf_counter() - t0)
            time.sleep(rng.uniform(2.0, 8.0))


_TOAST = "document.querySelector('.toast-body.error')"
# a new query image is shown and the previous query's galleries are cleared
_NEW_QUERY = ("old => { const i = document.querySelector('#query img');"
              " return i && i.complete && i.naturalWidth > 0 && i.src !== old"
              " && !document.querySelector('[id^=gallery-] button img'); }")
_GALLERIES = ("sels => sels.every(sel => [...document.querySelectorAll(sel + ' button img')]"
              ".some(i => i.complete && i.naturalWidth > 0))")


def _step(page, tally: Tally, i: int, rng, what: str, click: str, done_js: str, arg) -> bool:
    """Click, then wait until ``done_js`` holds or an error toast shows. A busy refusal is counted (the visitor
    reloads and tries again a little later); any other toast is an error. True when the step completed."""
    t0 = time.perf_counter()
    page.locator(click).click()
    page.wait_for_function(f"arg => {_TOAST} || ({done_js})(arg)", arg=arg)
    toasts = [t.inner_text().strip() for t in page.locator(".toast-body.error").all()]
    if not toasts:
        tally.add("load", f"browser: {what}", time.perf_counter() - t0)
        return True
    for text in toasts:
        if BUSY in text:
            tally.refused(f"browser: {what}")
        else:
            tally.error(f"browser {i} {what}", text)
    _close_toasts(page)  # as a visitor would: close the message, wait a little, click again
    time.sleep(rng.uniform(2.0, 8.0))
    return False


def _close_toasts(page, timeout_s: float = 10.0) -> None:
    deadline = time.time() + timeout_s
    while page.locator(".toast-body.error").count() and time.time() < deadline:
        for button in page.locator(".toast-body.error .toast-close").all():
            try:
                button.click(timeout=1000)
            except Exception:  # noqa: BLE001 - a toast may close on its own meanwhile
                pass
        time.sleep(0.25)
    if page.locator(".toast-body.error").count():
        page.reload()  # the toasts would not close: start the page afresh


def browser_worker(url: str, i: int, until: float, tally: Tally, methods: list[str]) -> None:
    """The page's own flow in a real Chromium: type a prompt, generate, attribute, wait for every gallery."""
    from playwright.sync_api import sync_playwright

    rng = random.Random(1000 + i)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox", "--disable-background-networking"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.set_default_timeout(600_000)
                page.goto(url, wait_until="domcontentloaded")
                while time.time() < until:
                    page.locator("#prompt textarea, #prompt input").first.fill(rng.choice(PROMPTS))
                    query = page.locator("#query img")
                    old = query.first.get_attribute("src") if query.count() else None
                    if _step(page, tally, i, rng, "generate", "#generate", _NEW_QUERY, old):
                        _step(page, tally, i, rng, "attribute (all galleries)", "#attribute", _GALLERIES,
                              [f"#gallery-{m}" for m in methods])
            finally:
                browser.close()
    except Exception as e:
        tally.error(f"browser {i}", e)


# --- retrains and caps ---------------------------------------------------------------------------------

def request_retrain(url: str, visitor: str, method: str, k: int) -> str:
    """'' when accepted, else the refusal's one line."""
    c = client(url, visitor)
    c.predict("red apple", 0, 50, 3.0, api_name="/generate")
    try:
        c.predict("red apple", 0, 50, 3.0, None, "", None, None, None, None, method, k, api_name="/counterfactual")
        return ""
    except Exception as e:
        return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__


def job_counts(c) -> dict:
    listing = c.predict(api_name="/counterfactual_status")[-1]
    lines = [ln for ln in listing.split("\n") if ":" in ln]
    return {"running": sum(": running" in ln for ln in lines), "queued": sum(ln.rstrip(" ").endswith(": queued")
                                                                               for ln in lines)}


def fill_queue(url: str, per_client: int, total: int) -> dict:
    """Visitors ask until the global cap is full, then once over it and once over their own cap."""
    asked, refused = [], []
    visitors = [f"10.0.2.{v}" for v in range(total // 2 + 1)]
    for v, visitor in enumerate(visitors[:-1]):  # two jobs per request: the method's and the random control's
        msg = request_retrain(url, visitor, ("pixel", "clip")[v % 2], 17 + v)
        (refused if msg else asked).append((visitor, msg))
    over_total = request_retrain(url, visitors[-1], "pixel", 40)
    over_own = request_retrain(url, visitors[0], "clip", 41) if per_client <= 2 else "(per-visitor cap > 2)"
    return {"accepted": [v for v, _ in asked], "refused_early": refused,
            "over_total": over_total, "over_own": over_own}


def monitor(url: str, until: float, server_pid: int, out: dict, total: int) -> None:
    c = client(url, "10.0.9.2")
    while time.time() < until:
        try:
            n = job_counts(c)
            out["max_active"] = max(out.get("max_active", 0), n["running"] + n["queued"])
            out["max_running"] = max(out.get("max_running", 0), n["running"])
        except Exception as e:
            out.setdefault("errors", []).append(f"{type(e).__name__}: {e}"[:200])
        mem = memory_mb(server_pid)
        out["server_peak_rss_mb"] = mem["server"]
        out["retrain_peak_rss_mb"] = max([out.get("retrain_peak_rss_mb", 0.0), *mem["children"].values()])
        time.sleep(5)
    out["caps_held"] = out.get("max_active", 0) <= total and out.get("max_running", 0) <= 1


# --- the run -------------------------------------------------------------------------------------------

def main(args) -> None:
    from abu_explorer.app.jobs import caps_from_env
    from abu_explorer.artifacts import save_json
    from abu_explorer.machine import machine

    if args.browsers and not os.path.exists(CHROMIUM):
        raise SystemExit(f"{CHROMIUM} is missing: install it with `apt-get install -y --no-install-recommends "
                         "chromium`, or run with --browsers 0")
    per_client, total = caps_from_env()  # what the server reads from the same environment
    methods = args.methods.split(",")
    tally, report = Tally(), {"machine": machine(), "settings": vars(args) | {"func": None}}
    with tempfile.TemporaryDirectory(prefix="abu-load-") as results:
        server, url, startup = start_server(args.precomputed, Path(results))
        try:
            report["startup_seconds"] = startup
            print(f"start-up {startup:.1f} s; idle probe ({args.probe} AbU fast attributions) ...", flush=True)
            idle = probe(url, args.probe, "idle", tally)
            report["retrains"] = fill_queue(url, per_client, total)
            client_ = client(url, "10.0.9.3")
            t0 = time.time()
            while job_counts(client_)["running"] < 1 and time.time() - t0 < 120:
                time.sleep(1)
            print(f"retrains: {report['retrains']}", flush=True)
            busy = probe(url, args.probe, "retrain running", tally)
            report["probe_rankings_equal"] = busy == idle
            until = time.time() + args.seconds
            watch: dict = {}
            threads = [threading.Thread(target=monitor, args=(url, until, server.pid, watch, total))]
            threads += [threading.Thread(target=browser_worker, args=(url, i, until, tally, methods))
                        for i in range(args.browsers)]
            threads += [threading.Thread(target=api_worker, args=(url, i, until, tally, methods))
                        for i in range(args.api_clients)]
            print(f"mixed load: {args.browsers} browsers + {args.api_clients} API clients for {args.seconds} s ...",
                  flush=True)
            for t in threads:
                t.start()
            for t in threads:
                t.join(max(1.0, until + args.grace - time.time()))
            report["stragglers"] = sum(t.is_alive() for t in threads)
            report["jobs"] = watch
        finally:
            stop_server(server)
    report["latency"] = tally.summary()
    report["errors"] = tally.errors + watch.get("errors", [])
    report["refused_busy"] = dict(sorted(tally.busy.items()))
    lat = report["latency"]
    ratio = lat["retrain running"]["abu fast (probe)"]["p95"] / lat["idle"]["abu fast (probe)"]["p95"]
    report["abu_p95_ratio"] = ratio
    r = report["retrains"]
    report["caps_held"] = bool(watch.get("caps_held")) and bool(r["over_total"]) and bool(r["over_own"]) \
        and not r["refused_early"]
    _print(report, args.target_ratio)
    if args.json:
        save_json(Path(args.json), report)
    ok = not report["errors"] and report["caps_held"] and report["probe_rankings_equal"] and ratio <= args.target_ratio
    if not ok:
        raise SystemExit(1)


def _print(report: dict, target: float) -> None:
    for phase, endpoints in report["latency"].items():
        for name, v in endpoints.items():
            print(f"  {phase:16} {name:36} n={v['n']:4d}  p50 {v['p50']:6.1f} s  p95 {v['p95']:6.1f} s")
    r, jobs = report["retrains"], report["jobs"]
    print(f"AbU fast p95 with a retrain running / idle: {report['abu_p95_ratio']:.2f}x (target <= {target}x); "
          f"rankings the same: {report['probe_rankings_equal']}")
    print(f"caps: {len(r['accepted'])} requests queued, over the server's cap: {r['over_total']!r}; over a "
          f"visitor's: {r['over_own']!r}; at most {jobs.get('max_active')} jobs active, {jobs.get('max_running')} "
          f"running -> held: {report['caps_held']}")
    print(f"peak RSS: server {jobs.get('server_peak_rss_mb', 0):.0f} MB, retrain process "
          f"{jobs.get('retrain_peak_rss_mb', 0):.0f} MB; {len(report['errors'])} errors, "
          f"{report['stragglers']} clients still waiting at the end")
    served = sum(v["n"] for k, v in report["latency"].get("load", {}).items() if "refused" not in k)
    print(f"served {served} requests under load; refused (waiting room full, one line each): "
          f"{sum(report['refused_busy'].values())} {report['refused_busy']}")
    for e in report["errors"][:20]:
        print("  error:", e)
