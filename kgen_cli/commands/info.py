"""`kgen info`: what this installation can do, for bug reports and GPU set-up."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer

from kgen_cli import __version__
from kgen_cli.console import examples, write_result

EXAMPLES = examples("kgen info", "kgen info --json")


def collect() -> dict:
    """Everything `kgen info` reports, as JSON-ready data."""
    from kgen_cli import download, engine, registry
    from kgen_cli.paths import kgen_home

    registry_ = registry.load_registry()
    present, unverified, corrupt = {}, [], {}
    for spec in registry_.models.values():
        status, path, problem = download.disk_status(spec)  # the words and checks of `models list`
        if status in ("yes", "unverified"):
            present[spec.name] = str(path)
            if status == "unverified":
                unverified.append(spec.name)
        elif status == "corrupt":
            corrupt[spec.name] = problem
    try:
        from huggingface_hub import constants as hf_constants

        hf_cache = str(hf_constants.HF_HUB_CACHE)
        offline = bool(hf_constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - a dependency
        hf_cache, offline = os.environ.get("HF_HUB_CACHE", ""), False
    from kgen_cli.config import config_path, read_config

    return {
        "kgen": __version__,
        "llama_cpp": engine.llama_version(),
        "gpu_offload": engine.gpu_offload_supported(),
        "devices": engine.devices(),
        "system_info": engine.system_info(),
        "threads": engine.thread_policy().to_dict(),
        "kgen_home": str(kgen_home()),
        "hf_cache": hf_cache,
        "hf_offline": offline,
        "default_model": registry_.default,
        "models_present": present,
        "models_unverified": unverified,
        "models_corrupt": corrupt,
        "config": {"path": str(config_path()), "values": read_config()},  # validated before any command runs
    }


def thread_lines(policy: dict) -> list[str]:
    """The thread policy in effect and why, for `kgen info`."""
    if policy["source"] == "kgen":
        why = (f"kgen: {policy['cpus_usable']} usable CPUs less {policy['others_runnable']} runnable threads of "
               f"other processes, at most {policy['max_threads']}; follows the load while decoding; --threads fixes it")
        if policy["others_runnable"] is None:
            why = f"kgen: {policy['cpus_usable']} usable CPUs, at most {policy['max_threads']}"
    else:
        why = f"{policy['source']}, fixed"
    quota = "none" if policy["cpu_quota"] is None else f"{policy['cpu_quota']:g} CPUs"
    wait = " ".join(f"{k}={v}" for k, v in policy["wait"].items()) or "spin 300000, then sleep"
    whose = {"kgen": "set by kgen; OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment win",
             "environment": "from your environment"}.get(policy["wait_source"], policy["wait_source"])
    return [
        f"threads         {policy['threads']} ({why})",
        f"  CPUs          {policy['cpus_online']} online, {policy['cpus_affinity']} in the affinity mask, "
        f"cgroup quota {quota}",
        f"  OpenMP wait   {wait} ({whose})",
    ]


def info(
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show llama.cpp's version and system info, GPU offload support and devices, the CPU thread
    policy in effect and why, kgen's directories, and which registry models are downloaded."""
    data = collect()
    if json_:
        write_result(json.dumps(data, ensure_ascii=False))
        return
    lines = [
        f"kgen            {data['kgen']}",
        f"llama.cpp       {data['llama_cpp']}",
        f"GPU offload     {'yes' if data['gpu_offload'] else 'no (CPU build)'}",
    ]
    for dev in data["devices"]:
        desc = " ".join(str(v) for k, v in dev.items() if k != "name" and v not in ("", None))
        lines.append(f"  device        {dev.get('name', '?')} {desc}".rstrip())
    lines += [
        f"system          {data['system_info'].strip()}",
        *thread_lines(data["threads"]),
        f"kgen home       {data['kgen_home']}",
        f"HF cache        {data['hf_cache']}" + ("  (offline)" if data["hf_offline"] else ""),
        f"default model   {data['default_model']}",
        "models present  " + (", ".join(f"{name} (unverified)" if name in data["models_unverified"] else name
                                        for name in sorted(data["models_present"]))
                              or "none (kgen models download NAME)"),
    ]
    values = data["config"]["values"]
    options = "; ".join(f"{command}: {', '.join(f'{k}={v}' for k, v in (opts or {}).items())}"
                        for command, opts in (values or {}).items())
    lines.append(f"config          {data['config']['path']}" + (f" ({options})" if options else " (none)"
                                                                if values is None else " (empty)"))
    if data["models_corrupt"]:
        lines.append("models corrupt  " + ", ".join(sorted(data["models_corrupt"]))
                     + " (kgen models download NAME --force)")
    write_result("\n".join(lines))
