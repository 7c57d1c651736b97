"""kgen_cli/threads.py (pure: fake /proc files, a fake clock), the engine applying it, and `kgen
info` showing it. No timing is asserted: speed is measured in benchmarks/contention.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kgen_cli import threads

REPO_ROOT = Path(__file__).resolve().parent.parent


def files(mapping: dict[str, str]):
    def read(path: str) -> str:
        if path not in mapping:
            raise FileNotFoundError(path)
        return mapping[path]

    return read


def task_stat(tid: int, state: str, name: str = "py (x) thread") -> str:
    return f"{tid} ({name}) {state} 1 2 3 4 5"


# ---------------------------------------------------------------------------------------------
# The wait policy


@pytest.mark.parametrize("environ, expected", [
    ({}, {"GOMP_SPINCOUNT": threads.KGEN_SPINCOUNT}),
    ({"OMP_WAIT_POLICY": ""}, {"GOMP_SPINCOUNT": threads.KGEN_SPINCOUNT}),  # empty = unset
    ({"OMP_WAIT_POLICY": "PASSIVE"}, {}),
    ({"GOMP_SPINCOUNT": "infinite"}, {}),
    ({"OMP_NUM_THREADS": "2"}, {"GOMP_SPINCOUNT": threads.KGEN_SPINCOUNT}),  # a count, not a wait policy
])  # fmt: skip
def test_kgen_sets_a_spin_count_unless_the_user_set_a_wait_policy(environ, expected):
    assert threads.spin_env(environ) == expected


# ---------------------------------------------------------------------------------------------
# CPUs and load


def test_cpus_usable_are_the_affinity_mask_capped_by_the_cgroup_quota():
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert threads.CpuView.read(files({})).usable == affinity
    one_and_a_half = threads.CpuView.read(files({"/sys/fs/cgroup/cpu.max": "150000 100000\n"}))
    assert one_and_a_half.quota == 1.5 and one_and_a_half.usable == min(affinity, 2)
    assert threads.CpuView.read(files({"/sys/fs/cgroup/cpu.max": "max 100000\n"})).quota is None


def test_other_processes_runnable_threads_exclude_this_process_own():
    proc = {"/proc/loadavg": "3.10 2.00 1.00 5/321 4242\n", **{
        f"/proc/self/task/{tid}/stat": task_stat(tid, state) for tid, state in [(1, "R"), (2, "R"), (3, "S")]}}
    assert threads.others_runnable(files(proc), lambda: ["1", "2", "3", "4"]) == 3  # 5 - our 2; 4 ended
    # names with spaces and parentheses do not confuse the state field
    proc["/proc/self/task/2/stat"] = task_stat(2, "S", name="a) R (b")
    assert threads.others_runnable(files(proc), lambda: ["1", "2", "3"]) == 4
    assert threads.others_runnable(files({}), lambda: []) is None  # no /proc: unknown


@pytest.mark.parametrize("usable, others, expected", [
    (2, 0, 2), (2, 1, 1), (2, 9, 1), (16, 3, 8), (16, 10, 6), (4, None, 4), (1, 0, 1),
])  # fmt: skip
def test_threads_fit_the_free_cpus_between_one_and_the_cap(usable, others, expected):
    assert threads.fit(usable, others) == expected


def test_choose_prefers_threads_then_omp_num_threads_then_the_load():
    cpus = threads.CpuView(online=4, affinity=4, quota=None, usable=4)
    busy = lambda: 1  # noqa: E731
    fixed = threads.choose(3, {"OMP_NUM_THREADS": "2"}, cpus, busy)
    assert (fixed.threads, fixed.adaptive, fixed.source) == (3, False, "--threads")
    omp = threads.choose(None, {"OMP_NUM_THREADS": "2,1", "OMP_WAIT_POLICY": "passive"}, cpus, busy)
    assert (omp.threads, omp.adaptive, omp.source) == (2, False, "OMP_NUM_THREADS")
    assert omp.wait == {"OMP_WAIT_POLICY": "passive"}
    auto = threads.choose(None, {"OMP_NUM_THREADS": "lots"}, cpus, busy)
    assert (auto.threads, auto.adaptive, auto.source, auto.others) == (3, True, "kgen", 1)
    doc = auto.to_dict()
    assert json.loads(json.dumps(doc)) == doc and doc["cpus_usable"] == 4 and doc["others_runnable"] == 1


def test_the_governor_follows_the_median_load_at_most_every_sample_interval():
    now = [0.0]
    seen = iter([1, 1, 0, 0, 0, 0, 3, 3, 3])
    gov = threads.ThreadGovernor(4, 4, others=lambda: next(seen), clock=lambda: now[0])
    assert gov.poll() is None  # too early: no look at all
    decisions = []
    for _ in range(9):
        now[0] += threads.SAMPLE_EVERY
        decisions.append(gov.poll())
    # medians of the last 5 looks: 1 -> 3 threads; 1; 1 (of 1,1,0); 0 (of 1,1,0,0) -> 4; 0; 0; 0;
    # 0 (of 0,0,0,3,3); 3 (of 0,0,3,3,3) -> 1
    assert decisions == [3, None, None, 4, None, None, None, None, 1]
    assert gov.threads == 1 and gov.changes == 3
    unknown = threads.ThreadGovernor(2, 2, others=lambda: None, clock=lambda: now[0] + 10)
    assert unknown.poll() is None and unknown.threads == 2


# ---------------------------------------------------------------------------------------------
# The engine applies it


@pytest.mark.model
def test_the_engine_follows_the_governor_between_decodes(model_path, monkeypatch):
    from engine_calls import complete
    from kgen_cli import engine as eng
    from kgen_cli.sampling import CompletionRequest, SamplingParams

    if threads.CpuView.read().usable < 2:
        pytest.skip("needs two usable CPUs")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    load = [0]
    monkeypatch.setattr(threads, "others_runnable", lambda: load[0])
    monkeypatch.setattr(threads, "SAMPLE_EVERY", 0.0)
    params = SamplingParams(temperature=0.8, top_p=0.95, top_k=40, min_p=0.05, repeat_penalty=1.0, max_tokens=4)
    with eng.Engine(model_path, n_ctx=256) as e:
        start = e.n_threads
        assert e.thread_policy.adaptive and start == min(threads.CpuView.read().usable, threads.MAX_THREADS)
        assert e.model_info["thread_policy"]["threads"] == start
        load[0] = 99  # every CPU taken by others: one thread, told to llama.cpp before the next decode
        complete(e, CompletionRequest("1girl, solo,", 1, params))
        assert e.n_threads == 1 and e._ll.llama_n_threads(e._ctx) == 1
        load[0] = 0
        complete(e, CompletionRequest("1girl, solo,", 1, params))
        assert e.n_threads == start and e._ll.llama_n_threads(e._ctx) == start
    with eng.Engine(model_path, n_ctx=256, n_threads=1) as fixed:  # --threads: never changed
        load[0] = 0
        complete(fixed, CompletionRequest("1girl, solo,", 1, params))
        assert fixed.n_threads == 1 and not fixed.thread_policy.adaptive


# ---------------------------------------------------------------------------------------------
# `kgen info`


def _info(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in WAIT_AND_COUNT}
    full.update(env, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "kgen_cli", "info", *args], capture_output=True, text=True,
                          env=full, cwd=REPO_ROOT, timeout=120)  # fmt: skip


WAIT_AND_COUNT = (*threads.WAIT_ENV, "OMP_NUM_THREADS")


def test_info_shows_the_thread_policy_and_why(isolated_home):
    pytest.importorskip("llama_cpp")
    env = {"KGEN_HOME": str(isolated_home), "HF_HUB_OFFLINE": "1"}
    doc = json.loads(_info(env, "--json").stdout)["threads"]
    assert doc["source"] == "kgen" and doc["adaptive"] is True and doc["wait_source"] == "kgen"
    assert doc["wait"] == {"GOMP_SPINCOUNT": threads.KGEN_SPINCOUNT}
    assert 1 <= doc["threads"] <= doc["cpus_usable"] <= doc["cpus_affinity"]
    text = _info(env).stdout
    assert f"GOMP_SPINCOUNT={threads.KGEN_SPINCOUNT} (set by kgen" in text
    assert f"{doc['cpus_affinity']} in the affinity mask" in text and "follows the load" in text

    # The user's environment wins, and info says so.
    mine = _info(dict(env, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1"), "--json")
    doc = json.loads(mine.stdout)["threads"]
    assert doc["wait"] == {"OMP_WAIT_POLICY": "PASSIVE"} and doc["wait_source"] == "environment"
    assert (doc["threads"], doc["source"], doc["adaptive"]) == (1, "OMP_NUM_THREADS", False)
    text = _info(dict(env, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")).stdout
    assert "OMP_WAIT_POLICY=PASSIVE (from your environment)" in text and "1 (OMP_NUM_THREADS, fixed)" in text


def test_the_wait_policy_is_in_the_environment_before_libgomp_loads(isolated_home):
    """libgomp reads it once, when libllama loads it: the engine's loader sets it first."""
    pytest.importorskip("llama_cpp")
    code = (
        "import os\nfrom kgen_cli import engine\n"
        "assert 'GOMP_SPINCOUNT' not in os.environ and not engine._gomp_loaded()\n"
        "engine._llama()\n"
        "assert os.environ['GOMP_SPINCOUNT'] == engine._threads.KGEN_SPINCOUNT\n"
        "assert engine._gomp_loaded() and not engine._gomp_preloaded\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in WAIT_AND_COUNT}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
