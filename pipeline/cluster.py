"""Will the SLURM jobs of this workflow fit the cluster? Check before submitting anything.

SLURM accepts a job that asks for more CPUs, memory or GPUs than any node of its partition has and leaves
it pending for ever (reason ``PartitionConfig`` or ``Resources``); Snakemake then waits without a word.
This module compares what each submission of ``profiles/slurm`` will ask for (per rule, and per bundle
of per-slide jobs) with what the target partition's nodes offer (``sinfo -N``) and its limits
(``scontrol show partition``: MaxCPUsPerNode, MaxMemPerNode, MaxTime), and says, for a submission that
cannot fit: the rule or bundle, the request, the largest node, and the setting that makes it fit (a
smaller bundle: ``WSIPIPE_SLURM_BUNDLE``; fewer CPUs per submission: ``WSIPIPE_SLURM_CORES``; less
memory: ``WSIPIPE_SLURM_FEATURES_MEM_MB`` ...; see ``docs/cluster.md``).

    python -m pipeline.cluster check --profile profiles/slurm [--partition P] [--config config.yaml]

The per-slide CPU stages (tissue, grid) of several slides are bundled into one submission; each feature
job (a batch of ``features.slides_per_job`` slides, one encoder) is a submission of its own on the GPU
partition. Bundle requests follow Snakemake's own computation for a group (``group-components``): the
jobs of one stage run side by side as far as ``cores`` (CPUs per submission) allows, their CPUs and
memory add up, the largest stage sets the request, and runtimes add up stage by stage. With the
profile's defaults a bundle of 4 slides asks for 4 CPUs and 16,000 MB; a feature job for
2 + ``features.num_workers`` CPUs, 16,000 MB and one GPU.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

#: per-slide rules bundled into one submission (``groups: perslide`` in the profile), in run order
BUNDLED = ("tissue", "grid")
#: rules submitted on their own (the others are local rules); features = one batch of slides
SINGLE = ("features", "mil_train", "mil_predict", "heatmap")
BAD_STATES = ("down", "drain", "drng", "fail", "maint", "inval", "unk", "futr", "npc", "boot", "plnd")


class ClusterError(RuntimeError):
    """The cluster cannot run a submission as configured (message names rule, request and largest node)."""


@dataclass
class Node:
    name: str
    cpus: int
    mem_mb: int
    gpus: int
    state: str = "idle"
    partitions: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return not self.state.lower().rstrip("*~#!%$@^-+").startswith(BAD_STATES)

    def describe(self) -> str:
        gpu = f", {self.gpus} GPU(s)" if self.gpus else ", no GPU"
        return f"{self.name} ({self.cpus} CPUs, {self.mem_mb} MB{gpu})"


@dataclass
class Limits:
    """Partition limits (None = unlimited)."""

    name: str = ""
    max_cpus_per_node: int | None = None
    max_mem_per_node: int | None = None
    max_time_min: int | None = None


@dataclass
class Request:
    what: str  # "rule mil_train" or "bundle of 4 slides (tissue, grid, features)"
    cpus: int
    mem_mb: int
    gpus: int
    runtime_min: int
    partition: str | None = None

    def describe(self) -> str:
        gpu = f", {self.gpus} GPU(s)" if self.gpus else ""
        return f"{self.cpus} CPUs, {self.mem_mb} MB{gpu}, {self.runtime_min} min"


# ---------------------------------------------------------------------------------------------------
# what the cluster offers
# ---------------------------------------------------------------------------------------------------
def _run(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ClusterError(f"`{cmd[0]}` not found: this is not a SLURM login node (or SLURM is not in PATH)") from None
    except subprocess.TimeoutExpired:
        raise ClusterError(f"`{' '.join(cmd)}` timed out: is slurmctld up?") from None
    if proc.returncode != 0:
        raise ClusterError(f"`{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def _gres_gpus(gres: str) -> int:
    """GPUs in a sinfo %G field: ``gpu:4``, ``gpu:a100:4(S:0-1)``, ``gpu:a100:2,gpu:v100:1``, ``(null)``."""
    total = 0
    for item in gres.split(","):
        parts = item.strip().split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) >= 2:
            try:
                total += int(parts[-1])
            except ValueError:
                total += 1 if len(parts) == 2 else 0
    return total


def parse_sinfo_nodes(text: str) -> list[Node]:
    """Nodes from ``sinfo -N -h -o '%N|%c|%m|%G|%P|%t'`` (one line per node and partition)."""
    nodes: dict[str, Node] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.strip().split("|")
        if len(parts) < 6:
            raise ClusterError(f"unexpected sinfo line {line!r}")
        name, cpus, mem, gres, part, state = (p.strip() for p in parts[:6])
        mem_mb = int(re.sub(r"[^0-9]", "", mem) or 0)
        node = nodes.setdefault(name, Node(name, int(cpus.rstrip("+") or 0), mem_mb, _gres_gpus(gres), state))
        node.partitions.append(part.rstrip("*"))
    return list(nodes.values())


def parse_time_min(text: str | None) -> int | None:
    """SLURM time (``UNLIMITED``, ``minutes``, ``mm:ss``, ``hh:mm:ss``, ``d-hh[:mm[:ss]]``) -> minutes."""
    if text is None or str(text).upper() in ("UNLIMITED", "INFINITE", "NONE", ""):
        return None
    t = str(text)
    days = 0
    if "-" in t:
        d, t = t.split("-", 1)
        days = int(d)
        hms = [int(x) for x in t.split(":")] + [0, 0]
        h, m, s = hms[0], hms[1], hms[2]
    else:
        f = [int(x) for x in t.split(":")]
        if len(f) == 1:
            h, m, s = 0, f[0], 0
        elif len(f) == 2:
            h, m, s = 0, f[0], f[1]
        else:
            h, m, s = f[:3]
    return days * 1440 + h * 60 + m + math.ceil(s / 60)


def parse_partition(text: str) -> Limits:
    """Limits from ``scontrol show partition NAME -o`` (key=value pairs)."""
    kv = dict(re.findall(r"(\w+)=(\S+)", text))

    def num(key: str) -> int | None:
        v = kv.get(key)
        return None if v is None or not v.isdigit() else int(v)

    return Limits(name=kv.get("PartitionName", ""), max_cpus_per_node=num("MaxCPUsPerNode"),
                  max_mem_per_node=num("MaxMemPerNode"), max_time_min=parse_time_min(kv.get("MaxTime")))


def default_partition(run: Callable[[list[str]], str] = _run) -> str:
    parts = run(["sinfo", "-h", "-o", "%P"]).split()
    for p in parts:
        if p.endswith("*"):
            return p.rstrip("*")
    if not parts:
        raise ClusterError("sinfo lists no partition")
    return parts[0]


def cluster_offer(partition: str | None = None, run: Callable[[list[str]], str] = _run) -> tuple[list[Node], Limits]:
    """Usable nodes of ``partition`` (default: the cluster's default partition) and its limits."""
    partition = partition or default_partition(run)
    nodes = parse_sinfo_nodes(run(["sinfo", "-N", "-h", "-p", partition, "-o", "%N|%c|%m|%G|%P|%t"]))
    if not nodes:
        raise ClusterError(f"partition {partition!r} has no nodes (sinfo -p {partition}); check "
                           "WSIPIPE_SLURM_PARTITION / WSIPIPE_SLURM_GPU_PARTITION")
    limits = parse_partition(run(["scontrol", "show", "partition", partition, "-o"]))
    limits.name = limits.name or partition
    return nodes, limits


# ---------------------------------------------------------------------------------------------------
# what the profile asks for
# ---------------------------------------------------------------------------------------------------
def _eval(expr: Any, attempt: int) -> float:
    if isinstance(expr, (int, float)):
        return float(expr)
    return float(eval(str(expr), {"__builtins__": {"min": min, "max": max, "int": int, "round": round}},
                      {"attempt": attempt}))


def load_profile(profile: str | os.PathLike, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The profile's ``config.yaml`` as Snakemake sees it (YTE template evaluated with ``environ``)."""
    path = Path(profile)
    path = path / "config.yaml" if path.is_dir() else path
    text = path.read_text()
    old = dict(os.environ)
    try:
        if environ is not None:
            os.environ.clear()
            os.environ.update(environ)
        import yaml

        data = yaml.safe_load(text) or {}
        if data.get("__use_yte__"):
            from yte import process_yaml

            data = process_yaml(text) or {}
    finally:
        if environ is not None:
            os.environ.clear()
            os.environ.update(old)
    return data


#: rule -> (threads, mem_mb, runtime) of the workflow's rules (workflow/rules/*.smk) before the profile
RULE_DEFAULTS = {
    "tissue": (1, 4000, 20), "grid": (1, 2000, 15), "features": (None, 16000, 240),
    "mil_train": (2, 16000, 240), "mil_predict": (1, 8000, 60), "heatmap": (1, 2000, 10),
}


def rule_requests(profile: dict[str, Any], config: dict[str, Any] | None = None, attempt: int = 1,
                  threads: dict[str, int] | None = None) -> dict[str, Request]:
    """Per-rule requests of one job at ``attempt`` (1 = first submission). ``threads`` overrides the
    rules' threads (the workflow knows them; default: as in workflow/rules, features = 2 + num_workers)."""
    config = config or {}
    feats = config.get("features") or {}
    gpus = int(config.get("gpus_per_feature_job", 1))
    default = profile.get("default-resources") or {}
    out = {}
    for rule, (t, mem, runtime) in RULE_DEFAULTS.items():
        res = (profile.get("set-resources") or {}).get(rule) or {}
        cpus = (threads or {}).get(rule) or t or (2 + int(feats.get("num_workers", 2)))
        cpus = int(res.get("cpus_per_task", cpus))
        m = res.get("mem_mb", mem)  # set-resources, else the rule's own (which wins over default-resources)
        r = res.get("runtime", runtime)
        out[rule] = Request(what=f"rule {rule}", cpus=cpus, mem_mb=int(_eval(m, attempt)),
                            gpus=gpus if rule == "features" else 0, runtime_min=int(_eval(r, attempt)),
                            partition=res.get("slurm_partition") or default.get("slurm_partition"))
    return out


def bundle_request(rules: dict[str, Request], n_slides: int, cores: int | None, gpu_limit: int | None) -> Request:
    """What one submission of ``n_slides`` bundled slides asks for (see the module docstring)."""
    cpus = mem = gpus = runtime = 0
    for rule in BUNDLED:
        r = rules[rule]
        k = n_slides
        if cores:
            k = min(k, max(1, cores // max(r.cpus, 1)))
        if r.gpus and gpu_limit is not None:
            k = min(k, max(1, gpu_limit // r.gpus))
        k = max(1, k)
        cpus, mem, gpus = max(cpus, k * r.cpus), max(mem, k * r.mem_mb), max(gpus, k * r.gpus)
        runtime += math.ceil(n_slides / k) * r.runtime_min
    if cores:
        cpus = min(cpus, max(cores, max(rules[r].cpus for r in BUNDLED)))
    return Request(what=f"bundle of {n_slides} slide(s) ({', '.join(BUNDLED)})", cpus=cpus, mem_mb=mem, gpus=gpus,
                   runtime_min=runtime, partition=rules[BUNDLED[0]].partition)


def _fits(req: Request, node: Node, limits: Limits) -> list[str]:
    """Why ``req`` does not fit ``node`` in a partition with ``limits`` (empty: it fits)."""
    why = []
    max_cpus = min(node.cpus, limits.max_cpus_per_node or node.cpus)
    max_mem = min(node.mem_mb, limits.max_mem_per_node or node.mem_mb)
    if req.cpus > max_cpus:
        why.append(f"{req.cpus} CPUs > {max_cpus}")
    if req.mem_mb > max_mem:
        why.append(f"{req.mem_mb} MB > {max_mem} MB")
    if req.gpus > node.gpus:
        why.append(f"{req.gpus} GPU(s) > {node.gpus}")
    if limits.max_time_min is not None and req.runtime_min > limits.max_time_min:
        why.append(f"{req.runtime_min} min > MaxTime {limits.max_time_min} min")
    return why


@dataclass
class Finding:
    what: str
    request: dict[str, Any]
    partition: str
    largest_node: str
    reasons: list[str]
    fix: str
    fatal: bool = True

    def message(self) -> str:
        kind = "cannot run" if self.fatal else "warning"
        return (f"{kind}: {self.what} asks for {Request(**self.request).describe()} but the largest node of "
                f"partition {self.partition!r} is {self.largest_node} ({'; '.join(self.reasons)}): {self.fix}")


def _largest(nodes: list[Node]) -> Node:
    return max(nodes, key=lambda n: (n.gpus, n.cpus, n.mem_mb))


def check(profile: dict[str, Any], nodes: list[Node], limits: Limits, config: dict[str, Any] | None = None,
          threads: dict[str, int] | None = None, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Compare every submission (first attempt; later attempts as warnings) with the partition.

    Returns ``{"ok", "findings": [...], "requests": {...}, "fit": {"bundle": n, "cores": c}}`` where ``fit``
    is the largest bundle (and CPUs per submission) that fits, when the configured one does not. ``only``:
    the submissions to check (rule names and ``bundle``; default all)."""
    usable = [n for n in nodes if n.usable] or []
    part = limits.name or "?"
    findings: list[Finding] = []
    if not usable:
        states = ", ".join(f"{n.name}: {n.state}" for n in nodes)
        raise ClusterError(f"partition {part!r} has no usable node ({states})")
    largest = _largest(usable)
    retries = int(profile.get("retries", 0) or 0)
    n_bundle = int(((profile.get("group-components") or {}).get("perslide")) or 1)
    cores = profile.get("cores")
    cores = int(cores) if cores not in (None, "all") else None
    gpu_limit = (profile.get("resources") or {}).get("gpu")
    gpu_limit = int(gpu_limit) if gpu_limit is not None else None
    grouped = bool(profile.get("groups"))
    reqs = rule_requests(profile, config, 1, threads)
    submissions = {r: reqs[r] for r in SINGLE}
    if grouped:
        submissions["bundle"] = bundle_request(reqs, n_bundle, cores, gpu_limit)
    else:
        submissions.update({r: reqs[r] for r in BUNDLED})
    if only is not None:
        submissions = {k: v for k, v in submissions.items() if k in only or (k in BUNDLED and "bundle" in only)}
    fit = {"bundle": n_bundle, "cores": cores}

    def fits_somewhere(req: Request) -> list[str] | None:
        why = None
        for node in usable:
            w = _fits(req, node, limits)
            if not w:
                return None
            why = why or _fits(req, largest, limits)
        return why

    for key, req in submissions.items():
        why = fits_somewhere(req)
        if why is None:
            continue
        fix = _fix_for(key, req, reqs, n_bundle, cores, gpu_limit, usable, limits, fit)
        findings.append(Finding(req.what, asdict(req), part, largest.describe(), why, fix))
    # later attempts ask for more memory/time: say which retries could never start
    for attempt in range(2, retries + 2):
        later = rule_requests(profile, config, attempt, threads)
        subs = {r: later[r] for r in SINGLE}
        if grouped:
            subs["bundle"] = bundle_request(later, fit["bundle"], fit["cores"], gpu_limit)
        else:
            subs.update({r: later[r] for r in BUNDLED})
        if only is not None:
            subs = {k: v for k, v in subs.items() if k in only or (k in BUNDLED and "bundle" in only)}
        for key, req in subs.items():
            if key != "bundle" and any(f.what == req.what for f in findings):
                continue  # already refused at the first attempt
            why = fits_somewhere(req)
            if why is not None:
                findings.append(Finding(f"{req.what} (retry {attempt - 1}, attempt {attempt})", asdict(req), part,
                                        largest.describe(), why,
                                        "that retry would stay pending; lower the memory or set "
                                        "WSIPIPE_SLURM_MAX_MEM_MB to cap requests at the node's memory",
                                        fatal=False))
    return {"ok": not any(f.fatal for f in findings), "findings": [asdict(f) | {"message": f.message()}
                                                                  for f in findings],
            "requests": {k: asdict(v) for k, v in submissions.items()}, "fit": fit,
            "partition": part, "largest_node": asdict(largest)}


def _fix_for(key: str, req: Request, reqs: dict[str, Request], n: int, cores: int | None, gpu_limit: int | None,
             nodes: list[Node], limits: Limits, fit: dict[str, Any]) -> str:
    if key != "bundle":
        r = req.what.split()[-1]
        if r == "features":
            return ("a feature job does not fit: lower features.num_workers (CPUs = 2 + num_workers), "
                    "WSIPIPE_SLURM_FEATURES_MEM_MB, or set gpus_per_feature_job=0 on a cluster without GPUs, or "
                    "submit to a partition with larger nodes (WSIPIPE_SLURM_GPU_PARTITION)")
        env = {"mil_train": "WSIPIPE_SLURM_MIL_MEM_MB", "mil_predict": "WSIPIPE_SLURM_MIL_MEM_MB"}.get(r)
        hint = f" (export {env}=...)" if env else ""
        return (f"lower the request of {r} (profile set-resources{hint}) or submit to a partition with larger "
                "nodes (WSIPIPE_SLURM_PARTITION)")
    # the largest bundle that fits a node, keeping the bundle size and lowering the CPUs per submission first
    caps = [cores] + sorted({c for c in (1, 2, 4, 8, 16, _largest(nodes).cpus) if cores is None or c < cores},
                            reverse=True)
    for k in range(n, 0, -1):
        for c in caps:
            b = bundle_request(reqs, k, c, gpu_limit)
            if any(not _fits(b, node, limits) for node in nodes):
                fit.update(bundle=k, cores=c)
                parts = []
                if k != n:
                    parts.append(f"WSIPIPE_SLURM_BUNDLE={k}")
                if c != cores:
                    parts.append(f"WSIPIPE_SLURM_CORES={c}")
                return (f"a bundle of {k} slide(s){f' with at most {c} CPUs' if c else ''} fits "
                        f"({b.describe()}): export {' '.join(parts)}")
    single = max((reqs[r] for r in BUNDLED), key=lambda r: (r.cpus, r.mem_mb))
    return (f"even one slide does not fit ({single.what} alone asks for {single.describe()}): lower its request "
            "(WSIPIPE_SLURM_MAX_MEM_MB) or use a partition with larger nodes")


def check_cluster(profile_dir: str | os.PathLike, partition: str | None = None, config: dict[str, Any] | None = None,
                  threads: dict[str, int] | None = None, run: Callable[[list[str]], str] = _run) -> dict[str, Any]:
    """:func:`check` against the live cluster (``sinfo``/``scontrol``), each submission against the
    partition it goes to (the feature jobs: the profile's GPU partition; the rest: its partition; unset:
    the cluster's default). ``partition`` checks every submission against that one partition instead."""
    profile = load_profile(profile_dir)
    reqs = rule_requests(profile, config)
    if partition is not None:
        targets = {partition: None}
    else:
        groups: dict[str | None, list[str]] = {}
        for key in ("bundle", *SINGLE):
            part = reqs[BUNDLED[0] if key == "bundle" else key].partition
            groups.setdefault(part, []).append(key)
        targets = {p: tuple(keys) for p, keys in groups.items()}
    merged: dict[str, Any] | None = None
    for part, keys in targets.items():
        nodes, limits = cluster_offer(part, run)
        res = check(profile, nodes, limits, config, threads, only=keys)
        if merged is None:
            merged = res
        else:
            merged["ok"] = merged["ok"] and res["ok"]
            merged["findings"] += res["findings"]
            merged["requests"].update(res["requests"])
            if res["fit"] != {"bundle": merged["fit"]["bundle"], "cores": merged["fit"]["cores"]} and "bundle" in (keys or ()):
                merged["fit"] = res["fit"]
    return merged or {"ok": True, "findings": [], "requests": {}, "fit": {}}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    import yaml

    ap = argparse.ArgumentParser(prog="python -m pipeline.cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="do this workflow's SLURM submissions fit the partition's nodes?")
    c.add_argument("--profile", default="profiles/slurm", help="SLURM profile folder (default profiles/slurm)")
    c.add_argument("--partition", default=None, help="target partition (default: the profile's, else the cluster's)")
    c.add_argument("--config", default=None, help="workflow config (features.num_workers, gpus_per_feature_job)")
    c.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = ap.parse_args(argv)
    config = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    try:
        res = check_cluster(args.profile, args.partition, config)
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res, indent=2))
    for f in res["findings"]:
        print(f["message"], file=sys.stderr)
    if res["ok"]:
        sub = ", ".join(f"{k}: {Request(**v).describe()}" for k, v in res["requests"].items())
        print(f"ok: every submission fits partition {res['partition']!r} ({sub})", file=sys.stderr)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
