"""Run independent trainings (the teachers) as parallel processes with a fair share of the cores each.

On a CPU, one process with N threads scales worse than N single-threaded processes: a teacher's
small convolutions leave OpenMP's threads waiting, and two threads on two cores measured 1.4x slower
than two one-thread teachers side by side (issue 9). On GPUs the jobs spread one per device.
Every job writes its own log; a failed job does not stop the others, and the caller gets every
failure at once, so a rerun resumes only what is missing. When no job is left to start, the jobs still
running are offered the idle cores (a file each reads at its next epoch, `follow_thread_share`): 7
teachers on 2 cores otherwise end with the last one training alone on one thread while a core idles
(measured: a lone teacher's epoch took 9 s on 2 threads against 13 s on 1).
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from deploy.fileio import atomic_write_text
from train.progress import format_eta, log

# The file (path in this variable) where the parent offers a running job more threads; see follow_thread_share.
THREAD_SHARE_ENV = "FUNDUS_THREAD_SHARE"


@dataclass(frozen=True)
class Job:
    name: str
    argv: list[str]  # arguments after `python`
    log: Path
    tag: str = ""  # how the lines name the job, e.g. "teachers 3/7"


@dataclass(frozen=True)
class Outcome:
    name: str
    returncode: int
    seconds: float
    last_line: str


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow), not the
    host's total. The one rule for training jobs and benchmark threads."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS has no affinity call
        return os.cpu_count() or 1


def auto_jobs(count: int, gpus: int) -> int:
    """Parallel jobs: one per GPU, else one per core (threads are split evenly between them)."""
    return max(1, min(count, gpus if gpus else usable_cores()))


def _explicit_threads() -> int | None:
    explicit = os.environ.get("OMP_NUM_THREADS")
    return int(explicit) if explicit and explicit.isdigit() else None


def threads_per_job(jobs: int) -> int:
    """OpenMP threads each job gets: an explicit OMP_NUM_THREADS wins, else the cores shared evenly."""
    return _explicit_threads() or max(1, usable_cores() // jobs)


def follow_thread_share() -> None:
    """In a job of run_parallel: take the thread count the parent last offered, if it differs from the
    current one. Called once per epoch by the training loop; a no-op in any other process."""
    path = os.environ.get(THREAD_SHARE_ENV)
    try:
        offered = int(Path(path).read_text()) if path else 0
    except (OSError, ValueError):  # not offered yet
        return
    import torch  # here: the parent process and this module stay torch-free

    if offered > 0 and offered != torch.get_num_threads():
        torch.set_num_threads(offered)


def _share_file(job: Job) -> Path:
    return job.log.parent / ".thread_share"


def _offer_idle_cores(running: list[Job]) -> None:
    """Split the cores between the jobs still running (CPU jobs, threads not fixed by the user)."""
    if not running:
        return
    share = max(1, usable_cores() // len(running))
    for job in running:
        atomic_write_text(_share_file(job), str(share))
    each = " each" if len(running) > 1 else ""
    log(f"no job left to start: {', '.join(_label(j) for j in running)} may use {share} thread(s){each} "
        "from the next epoch")


def _run(job: Job, threads: int, gpu: int | None) -> Outcome:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    job.log.parent.mkdir(parents=True, exist_ok=True)
    _share_file(job).unlink(missing_ok=True)  # an offer made to an earlier run of this job
    env[THREAD_SHARE_ENV] = str(_share_file(job))
    start = time.perf_counter()
    with open(job.log, "a") as log:
        code = subprocess.run([sys.executable, *job.argv], stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    lines = [ln for ln in job.log.read_text(errors="replace").splitlines() if ln.strip()]
    return Outcome(job.name, code, time.perf_counter() - start, lines[-1] if lines else "")


def _label(job: Job) -> str:
    return f"[{job.tag}] {job.name}" if job.tag else f"[{job.name}]"


def _remaining(finished: list[Outcome], total: int, workers: int) -> str:
    """Rough time left: the mean job time so far for each job not finished, `workers` at a time."""
    left = total - len(finished)
    mean = sum(o.seconds for o in finished) / len(finished)
    return format_eta(mean * left / max(1, min(workers, left))) if left else "all done"


def run_parallel(jobs: list[Job], workers: int, gpus: int = 0) -> list[Outcome]:
    """Run `jobs` with `workers` at a time (each on its own GPU when `gpus`); prints a line as each
    starts and ends. Never raises for a failed job: the outcomes say which failed."""
    threads = threads_per_job(workers)
    free_gpus: queue.Queue[int | None] = queue.Queue()
    for slot in range(workers):
        free_gpus.put(slot % gpus if gpus else None)
    log(f"{len(jobs)} jobs, {workers} at a time, {threads} thread(s) each" + (f", one per GPU of {gpus}" if gpus else ""))
    finished: list[Outcome] = []
    running: list[Job] = []
    started = [0]  # jobs that have taken a worker so far
    lock = threading.Lock()
    rebalance = not gpus and _explicit_threads() is None

    def one(job: Job) -> Outcome:
        gpu = free_gpus.get()
        with lock:
            running.append(job)
            started[0] += 1
        try:
            log(f"{_label(job)} started{'' if gpu is None else f' on GPU {gpu}'}, log: {job.log}")
            outcome = _run(job, threads, gpu)
        finally:
            free_gpus.put(gpu)
            with lock:
                running.remove(job)
                if rebalance and started[0] == len(jobs):  # none left to start: its core is free
                    _offer_idle_cores(list(running))
        status = "done" if outcome.returncode == 0 else f"FAILED (exit {outcome.returncode})"
        finished.append(outcome)
        log(f"{_label(job)} {status} in {outcome.seconds / 60:.1f} min: {outcome.last_line}; "
            f"{len(finished)}/{len(jobs)} finished, {_remaining(finished, len(jobs), workers)}")
        return outcome

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, jobs))
