"""How many CPU threads llama.cpp gets, and how its idle OpenMP threads wait (pure Python; the
engine applies it). Why: docs/threads.md.

- Wait policy. llama.cpp's CPU backend runs each graph on an OpenMP team whose idle threads
  spin before they sleep; libgomp reads `OMP_WAIT_POLICY` / `GOMP_SPINCOUNT` once, when it is
  loaded. Unless the user set either, kgen sets `GOMP_SPINCOUNT=KGEN_SPINCOUNT` before libllama
  (and with it libgomp) is loaded: spinning stays short, so a thread whose partner lost its core
  to another process sleeps instead of burning the time that partner needs.
- Thread count. `--threads N` (or `OMP_NUM_THREADS` set by the user) is fixed. Otherwise kgen
  uses the CPUs it may run on (affinity, cgroup quota; at most `MAX_THREADS`) less the other
  processes' runnable threads, at least one, and keeps adjusting while it decodes
  (`ThreadGovernor`): an OpenMP team larger than the free cores stalls at every barrier.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

MAX_THREADS = 8  # beyond ~8 threads a small model's decode stops scaling
WAIT_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # libgomp's knobs; when the user set one, kgen sets none
KGEN_SPINCOUNT = "30000"  # libgomp spins 300000 times by default (OMP_WAIT_POLICY unset)
SAMPLE_EVERY = 0.1  # seconds between two looks at the machine's load while decoding
WINDOW = 5  # looks whose median decides (about half a second)


def spin_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables kgen adds to the environment before libgomp loads: none when the user set
    any of `WAIT_ENV`."""
    if any(environ.get(name) for name in WAIT_ENV):
        return {}
    return {"GOMP_SPINCOUNT": KGEN_SPINCOUNT}


def _cgroup_cpus(read: Callable[[str], str]) -> float | None:
    """The cgroup v2 CPU quota in CPUs (`cpu.max` "quota period"), None when unlimited or unknown."""
    try:
        quota, period = read("/sys/fs/cgroup/cpu.max").split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _read(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read()


@dataclass
class CpuView:
    """The CPUs this process may use: its affinity mask, capped by a cgroup quota."""

    online: int
    affinity: int
    quota: float | None
    usable: int

    @classmethod
    def read(cls, read: Callable[[str], str] = _read) -> CpuView:
        online = os.cpu_count() or 1
        try:
            affinity = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            affinity = online
        quota = _cgroup_cpus(read)
        usable = max(1, min(affinity, math.ceil(quota) if quota else affinity))
        return cls(online, affinity, quota, usable)


def others_runnable(read: Callable[[str], str] = _read, tasks: Callable[[], list[str]] | None = None) -> int | None:
    """Threads of other processes that are running or waiting for a CPU right now: the
    system's runnable count (/proc/loadavg) less this process's own runnable threads. None where
    /proc is missing."""
    try:
        running = int(read("/proc/loadavg").split()[3].split("/")[0])
        own = 0
        for tid in tasks() if tasks else os.listdir("/proc/self/task"):
            try:
                stat = read(f"/proc/self/task/{tid}/stat")
            except OSError:  # the thread ended meanwhile
                continue
            own += stat[stat.rindex(")") + 2 : stat.rindex(")") + 3] == "R"
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - own)


def fit(usable: int, others: int | None) -> int:
    """Threads for `usable` CPUs with `others` runnable threads of other processes."""
    cap = min(usable, MAX_THREADS)
    return cap if others is None else max(1, min(cap, usable - others))


@dataclass
class ThreadPolicy:
    """The thread count and wait policy in effect, and why (shown by `kgen info`)."""

    threads: int
    adaptive: bool
    source: str  # "--threads", "OMP_NUM_THREADS" or "kgen"
    cpus: CpuView
    others: int | None  # other processes' runnable threads when the count was chosen
    wait: dict[str, str] = field(default_factory=dict)  # OMP_WAIT_POLICY / GOMP_SPINCOUNT in effect
    wait_source: str = "kgen"  # "kgen", "environment" or "libgomp default"

    def to_dict(self) -> dict:
        c = self.cpus
        return {
            "threads": self.threads, "adaptive": self.adaptive, "source": self.source,
            "cpus_online": c.online, "cpus_affinity": c.affinity, "cpu_quota": c.quota, "cpus_usable": c.usable,
            "others_runnable": self.others, "max_threads": MAX_THREADS,
            "wait": self.wait, "wait_source": self.wait_source,
        }  # fmt: skip


def choose(requested: int | None, environ: Mapping[str, str] | None = None, cpus: CpuView | None = None,
           others: Callable[[], int | None] | None = None) -> ThreadPolicy:  # fmt: skip
    """The starting thread count: `requested` (--threads), else the user's OMP_NUM_THREADS, else
    what fits next to the other processes' load (then adaptive)."""
    environ = os.environ if environ is None else environ
    cpus = cpus or CpuView.read()
    wait = {name: environ[name] for name in WAIT_ENV if environ.get(name)}
    if requested is not None:
        return ThreadPolicy(requested, False, "--threads", cpus, None, wait)
    omp = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if omp.isdigit() and int(omp) > 0:
        return ThreadPolicy(int(omp), False, "OMP_NUM_THREADS", cpus, None, wait)
    seen = (others or others_runnable)()
    return ThreadPolicy(fit(cpus.usable, seen), True, "kgen", cpus, seen, wait)


class ThreadGovernor:
    """Re-fits the thread count to the machine's load while decoding: `poll()` before each
    decode returns a new count, or None to keep the current one. Looks at most every
    `SAMPLE_EVERY` seconds and decides on the median of the last `WINDOW` looks."""

    def __init__(self, usable: int, threads: int, *, others: Callable[[], int | None] | None = None,
                 clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.usable, self.threads = usable, threads
        self._others, self._clock = others or (lambda: others_runnable()), clock
        self._seen: list[int] = []
        self._next = clock() + SAMPLE_EVERY
        self.changes = 0

    def poll(self) -> int | None:
        now = self._clock()
        if now < self._next:
            return None
        self._next = now + SAMPLE_EVERY
        seen = self._others()
        if seen is None:
            return None
        self._seen = (self._seen + [seen])[-WINDOW:]
        want = fit(self.usable, sorted(self._seen)[(len(self._seen) - 1) // 2])  # the low median
        if want == self.threads:
            return None
        self.threads = want
        self.changes += 1
        return want
