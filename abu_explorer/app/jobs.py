"""Background jobs for long work (remove-and-regenerate retrains): one worker thread, one job per key.

A job lives in the server process, not in a browser session, so its status survives a page reload; a
request whose key is queued, running or done is never started twice. Cancelling a running job stops it
at the next epoch (the checkpoint stays, so submitting the same request again resumes it) and frees its slot.

Admission control: at most ``per_client`` jobs queued or running per client and ``total`` on the server
(``ABU_JOBS_PER_CLIENT``, default 2: one request is the method's retrain and the random control's;
``ABU_JOBS_TOTAL``, default 6). A request over a cap is refused in one line; a job already known is
never counted twice.

A retrain runs in a child process with its own torch thread count (``ABU_RETRAIN_THREADS``, default 1:
``training.isolated``), so it leaves the other cores to the requests; torch's thread count is process-wide,
and changing it in the server would change the arithmetic (and the bytes) of the generations it serves.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field


class Cancelled(Exception):
    """Raised inside a job's progress callback when the job was cancelled."""


class Refused(ValueError):
    """A request over an admission cap; the message is the one line the page shows."""


@dataclass
class Job:
    key: str
    label: str
    status: str = "queued"  # queued | running | done | failed | cancelled
    done_units: int = 0
    total_units: int = 0
    started: float | None = None
    finished: float | None = None
    units_at_start: int | None = None
    result: dict | None = None
    error: str = ""
    owner: str = ""  # who asked (a client address); the per-client cap counts by it
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running") and not self.cancel.is_set()

    def eta_seconds(self) -> float | None:
        """From this run's own pace (a resumed job's earlier epochs are not counted as this run's work)."""
        if self.status != "running" or not self.started or self.units_at_start is None:
            return None
        done_here = self.done_units - self.units_at_start
        if done_here <= 0:
            return None
        return (time.time() - self.started) / done_here * (self.total_units - self.done_units)

    def describe(self) -> str:
        if self.status == "running":
            eta = self.eta_seconds()
            frac = f"{self.done_units}/{self.total_units} epochs" if self.total_units else "starting"
            return f"{self.label}: running, {frac}" + (f", about {eta / 60:.0f} min left" if eta is not None else "")
        if self.status == "failed":
            return f"{self.label}: failed: {self.error}"
        return f"{self.label}: {self.status}"


def caps_from_env() -> tuple[int, int]:
    """(jobs per client, jobs in all), from ``ABU_JOBS_PER_CLIENT`` and ``ABU_JOBS_TOTAL``."""
    return int(os.environ.get("ABU_JOBS_PER_CLIENT", "2")), int(os.environ.get("ABU_JOBS_TOTAL", "6"))


class JobQueue:
    """``submit(key, label, fn)`` where ``fn(progress)`` returns a dict; ``progress(done, total)``."""

    def __init__(self, per_client: int | None = None, total: int | None = None):
        env_per_client, env_total = caps_from_env()
        self.per_client, self.total = per_client or env_per_client, total or env_total
        self.jobs: dict[str, Job] = {}
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="abu-jobs", daemon=True)
        self._worker.start()

    def submit(self, key: str, label: str, fn, owner: str = "") -> Job:
        with self._lock:
            job = self.jobs.get(key)
            if job is not None and job.status in ("queued", "running", "done") and not job.cancel.is_set():
                return job  # never run the same request twice (a cancelled one is queued anew and resumes)
            self.admit(owner, 1)
            job = Job(key, label, owner=owner)
            self.jobs.pop(key, None)  # a resubmitted key queues at the back
            self.jobs[key] = job
            self._queue.put((job, fn))
            return job

    def admit(self, owner: str, new: int) -> None:
        """Raise ``Refused`` if ``new`` more jobs of ``owner`` would pass a cap."""
        active = [j for j in self.jobs.values() if j.active]
        mine = sum(1 for j in active if j.owner == owner)
        if mine + new > self.per_client:
            raise Refused(f"you already have {mine} retrain(s) queued or running (at most {self.per_client} per "
                          "visitor); wait for them or cancel them first")
        if len(active) + new > self.total:
            raise Refused(f"the server is busy: {len(active)} retrains queued or running (at most {self.total}); "
                          "try again later")

    def position(self, key: str) -> int | None:
        """1 for the first queued job, 2 for the next, ...; 0 while running; None when not waiting."""
        with self._lock:
            job = self.jobs.get(key)
            if job is None or not job.active:
                return None
            if job.status == "running":
                return 0
            queued = [j for j in self.jobs.values() if j.active and j.status == "queued"]
            return queued.index(job) + 1

    def typical_seconds(self, default: float) -> float:
        """How long a job takes here: the median of the finished ones, else ``default``."""
        took = sorted(j.finished - j.started for j in self.jobs.values() if j.status == "done" and j.started)
        return took[len(took) // 2] if took else default

    def expected_start_seconds(self, key: str, job_seconds: float) -> float | None:
        """A queued job's estimated wait: what the running job has left, then ``job_seconds`` per job ahead."""
        pos = self.position(key)
        if not pos:
            return None
        running = next((j for j in self.jobs.values() if j.active and j.status == "running"), None)
        left = (running.eta_seconds() or job_seconds) if running is not None else 0.0
        return left + (pos - 1) * job_seconds

    def get(self, key: str) -> Job | None:
        return self.jobs.get(key)

    def cancel(self, key: str) -> Job | None:
        with self._lock:
            job = self.jobs.get(key)
            if job is not None and job.status in ("queued", "running"):
                job.cancel.set()
                if job.status == "queued":
                    job.status = "cancelled"
            return job

    def snapshot(self) -> list[Job]:
        with self._lock:
            return list(self.jobs.values())

    def _work(self):
        while True:
            job, fn = self._queue.get()
            if job.cancel.is_set():
                job.status = "cancelled"
                continue
            job.status, job.started = "running", time.time()

            def progress(done: int, total: int, job=job):
                if job.units_at_start is None:
                    job.units_at_start = done - 1
                job.done_units, job.total_units = done, total
                if job.cancel.is_set():
                    raise Cancelled(job.key)

            try:
                job.result = fn(progress)
                job.status = "done"
            except Cancelled:
                job.status = "cancelled"
            except Exception as e:  # a failed job reports its error; the worker keeps serving
                job.status, job.error = "failed", f"{type(e).__name__}: {e}"
            job.finished = time.time()
