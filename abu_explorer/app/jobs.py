"""Background jobs for long work (remove-and-regenerate retrains): one worker thread, one job per key.

A job lives in the server process, not in a browser session, so its status survives a page reload; a
request whose key is queued, running or done is never started twice. Cancelling a running job stops it
at the next epoch (the checkpoint stays, so submitting the same request again resumes it).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field


class Cancelled(Exception):
    """Raised inside a job's progress callback when the job was cancelled."""


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
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)

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


class JobQueue:
    """``submit(key, label, fn)`` where ``fn(progress)`` returns a dict; ``progress(done, total)``."""

    def __init__(self):
        self.jobs: dict[str, Job] = {}
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="abu-jobs", daemon=True)
        self._worker.start()

    def submit(self, key: str, label: str, fn) -> Job:
        with self._lock:
            job = self.jobs.get(key)
            if job is not None and job.status in ("queued", "running", "done") and not job.cancel.is_set():
                return job  # never run the same request twice (a cancelled one is queued anew and resumes)
            job = Job(key, label)
            self.jobs[key] = job
            self._queue.put((job, fn))
            return job

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
