"""The workflow on SLURM through profiles/slurm, against a real (single-node) SLURM cluster.

Start the cluster with ``.ci/slurm-setup.sh`` (Debian packages slurmctld, slurmd, slurm-client, munge on
localhost). Without a usable cluster the SLURM tests are skipped, saying why; with
``WSIPIPE_REQUIRE_SLURM=1`` they fail instead (CI, so a broken cluster cannot pass as a skip).
They carry the ``slurm`` marker: ``make test`` deselects them, ``make test-slurm`` runs them.

What differs from a production run, and why:

* ``gpus_per_feature_job: 0``: the test machine has no GPU, and sbatch refuses ``--gpus=1`` on a node
  without GPUs. The profile itself keeps one GPU per feature job (checked by the dry-run test).
* ``--slurm-status-command squeue``: the test cluster has no accounting database (``sacct`` does not
  work); finished jobs stay visible to ``squeue`` because slurm.conf sets a large MinJobAge.
* a second profile (written here) with small memory/runtime requests, ``cores: 1`` (each submission asks
  for one CPU so two bundles run side by side on a 2-core machine) and bundles of 2 slides instead of 4.
* ``--slurm-init-seconds-before-status-checks 1`` (the default 40 s only makes the tests slower).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from pipeline.store import list_bags, read_bag

pytestmark = [pytest.mark.slow, pytest.mark.slurm]  # `make test` deselects them; `make test-slurm` runs them

REQUIRE = os.environ.get("WSIPIPE_REQUIRE_SLURM") == "1"
ENV_VARS = ("WSIPIPE_SLURM_PARTITION", "WSIPIPE_SLURM_GPU_PARTITION", "WSIPIPE_SLURM_ACCOUNT")

# Test-cluster sizes: same structure as profiles/slurm (attempt-scaled memory and runtime), small numbers.
TEST_OVERLAY = {
    "cores": 1,
    "group-components": {"perslide": 2},
    "set-resources": {
        "tissue": {"mem_mb": "500 * attempt", "runtime": "10 * attempt"},
        "grid": {"mem_mb": "500 * attempt", "runtime": "10 * attempt"},
        "features": {"mem_mb": "1500 * attempt", "runtime": "20 * attempt"},
        "mil_train": {"mem_mb": "2000 * attempt", "runtime": "20 * attempt"},
        "mil_predict": {"mem_mb": "1000 * attempt", "runtime": "10 * attempt"},
    },
}
FAST = {
    "gpus_per_feature_job": 0,  # no GPU on the test machine (see the module docstring)
    "features": {"model": "test_resnet", "batch_size": 16, "num_workers": 0, "device": "cpu"},
    "mil": {"model": "abmil", "folds": 1, "epochs": 8, "patience": 4, "seed": 0},
}


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def _run(cmd, timeout=30):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def cluster_problem() -> str | None:
    """Why the SLURM tests cannot run here, or None when a cluster answers and has an idle node."""
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed"
    missing = [c for c in ("sinfo", "sbatch", "squeue", "scancel", "scontrol") if shutil.which(c) is None]
    if missing:
        return f"SLURM client commands not found: {', '.join(missing)}"
    try:
        proc = _run(["sinfo", "-h", "-o", "%P %a %t"])
    except subprocess.TimeoutExpired:
        return "sinfo timed out (is slurmctld running?)"
    if proc.returncode != 0:
        return f"sinfo failed: {(proc.stderr or proc.stdout).strip()}"
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    if not any(len(r) == 3 and r[1] == "up" and r[2].rstrip("*~#") in ("idle", "mix", "comp") for r in rows):
        return f"no partition with an idle node (sinfo: {proc.stdout.strip() or 'empty'})"
    cfg = _run(["scontrol", "show", "config"]).stdout
    m = re.search(r"^MinJobAge\s*=\s*(\d+)", cfg, re.M)
    if not m or int(m.group(1)) < 120:
        return "MinJobAge < 120 s: finished jobs vanish from squeue before snakemake sees them"
    return None


@pytest.fixture(scope="module")
def slurm():
    """Information about the running test cluster (skips, or fails with WSIPIPE_REQUIRE_SLURM=1)."""
    problem = cluster_problem()
    if problem:
        if REQUIRE:
            pytest.fail(f"WSIPIPE_REQUIRE_SLURM=1 but no usable SLURM cluster: {problem}. Run .ci/slurm-setup.sh")
        pytest.skip(f"no usable SLURM cluster: {problem} (start one with .ci/slurm-setup.sh; "
                    "WSIPIPE_REQUIRE_SLURM=1 turns this skip into a failure)")
    parts = _run(["sinfo", "-h", "-o", "%P"]).stdout.split()
    default = next((p.rstrip("*") for p in parts if p.endswith("*")), parts[0])
    return {"partitions": [p.rstrip("*") for p in parts], "default": default}


@pytest.fixture()
def env(env_with_venv):
    """The venv's PATH, without the profile's partition/account variables of whoever runs the tests. The
    workflow's start-up check compares profiles/slurm's own sizes with the node; the runs with the test
    overlay (smaller sizes, merged by Snakemake) skip it (WSIPIPE_SLURM_CHECK=0); test D runs it."""
    return {**{k: v for k, v in env_with_venv.items() if k not in ENV_VARS}, "WSIPIPE_SLURM_CHECK": "0"}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def workflow_config(path: Path, slides: Path, results: Path, labels: Path | None, **extra) -> Path:
    cfg = {"slides_dir": str(slides), "results_dir": str(results), "labels_csv": str(labels) if labels else None}
    cfg.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in FAST.items()})
    for k, v in extra.items():
        cfg[k].update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
    return write_yaml(path, cfg)


def slurm_cmd(root: Path, work: Path, *args) -> list[str]:
    overlay = write_yaml(work / "test-cluster-profile.yaml", TEST_OVERLAY)
    return ["snakemake", "--snakefile", str(root / "Snakefile"),
            "--profile", str(root / "profiles" / "slurm"), "--profile", str(overlay),
            "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1", *args]


def snakemake(root, work, env, *args, check=True, timeout=420):
    """Run snakemake with the SLURM profile in ``work`` (its own .snakemake, not the repository's)."""
    proc = subprocess.run(slurm_cmd(root, work, *args), cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}")
    return proc


def slurm_job_ids(text: str) -> list[str]:
    return re.findall(r"submitted with SLURM jobid (\d+)", text)


def squeue_jobs(ids) -> dict[str, dict[str, str]]:
    """State, partition, memory and CPUs of (finished or not) jobs, straight from slurmctld (no sacct)."""
    out = _run(["squeue", "-h", "--states=all", "-j", ",".join(ids), "-o", "%i|%T|%P|%m|%C|%j"]).stdout
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    return {r[0]: {"state": r[1], "partition": r[2], "mem": r[3], "cpus": r[4], "name": r[5]} for r in rows}


BLOCK = r"\n\s*\[[A-Z][a-z]{2} [^\]]+\][^\n]*\n"  # the "[date]" line that opens each job in snakemake's output


def planned(dry_run_output: str) -> dict[str, set[str]]:
    """Rule -> slides (or other wildcard values) of the jobs a dry run plans."""
    jobs: dict[str, set[str]] = {}
    for block in re.split(BLOCK, dry_run_output):
        m = re.match(r"\s*(?:local)?rule (\w+):", block)
        if not m:
            continue
        w = re.search(r"wildcards: (\S+)", block)
        jobs.setdefault(m.group(1), set()).add(w.group(1).split("=", 1)[1] if w else "")
    return jobs


def bag_ids(folder: Path) -> dict[str, tuple[int, int]]:
    """Finished bags (hidden partial bags excluded): slide id -> (inode, mtime_ns)."""
    if not folder.is_dir():
        return {}
    return {p.stem: (p.stat().st_ino, p.stat().st_mtime_ns) for p in list_bags(folder)}


# ---------------------------------------------------------------------------------------------------
# the profile itself (needs the plugin, not a cluster)
# ---------------------------------------------------------------------------------------------------
def test_profile_requests(cohort, root, env, tmp_path):
    """Dry runs: per-rule memory/runtime, one GPU on features, partition and account from the environment."""
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip("snakemake-executor-plugin-slurm is not installed")
    cfg = workflow_config(tmp_path / "c.yaml", cohort, tmp_path / "r", cohort / "labels.csv")
    base = ["snakemake", "--snakefile", str(root / "Snakefile"), "--profile", str(root / "profiles" / "slurm"),
            "--configfile", str(cfg), "--config", "gpus_per_feature_job=1", "-n"]

    def resources(extra_env):
        proc = subprocess.run(base, cwd=tmp_path, env={**env, **extra_env}, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out = {}
        for block in re.split(BLOCK, proc.stdout + proc.stderr):
            m = re.match(r"\s*rule (\w+):", block)
            r = re.search(r"resources: (.*)", block)
            if m and r:
                out[m.group(1)] = dict(kv.split("=", 1) for kv in r.group(1).split(", "))
        return out

    res = resources({})
    expected = {"tissue": ("4000", "20"), "grid": ("2000", "10"), "features": ("16000", "90"),
                "mil_train": ("16000", "240"), "mil_predict": ("8000", "60")}
    for rule, (mem, runtime) in expected.items():
        assert (res[rule]["mem_mb"], res[rule]["runtime"]) == (mem, runtime), (rule, res[rule])
        assert "slurm_partition" not in res[rule] and "slurm_account" not in res[rule]
    assert res["features"]["gpu"] == "1" and "gpu" not in res["tissue"]

    res = resources({"WSIPIPE_SLURM_PARTITION": "cpu_p", "WSIPIPE_SLURM_ACCOUNT": "lab_a"})
    assert all(res[r]["slurm_partition"] == "cpu_p" and res[r]["slurm_account"] == "lab_a" for r in expected), res
    res = resources({"WSIPIPE_SLURM_PARTITION": "cpu_p", "WSIPIPE_SLURM_GPU_PARTITION": "gpu_p"})
    assert {rule: r["slurm_partition"] for rule, r in res.items() if rule in expected} == {
        "tissue": "cpu_p", "grid": "cpu_p", "features": "gpu_p", "mil_train": "cpu_p", "mil_predict": "cpu_p"}


# ---------------------------------------------------------------------------------------------------
# real SLURM
# ---------------------------------------------------------------------------------------------------
def test_whole_dag_through_slurm(slurm, root, env, tmp_path):
    """Test A: 4 labelled slides, tissue -> grid -> features -> MIL, every job submitted with sbatch."""
    from pipeline.synthetic import make_cohort

    slides = tmp_path / "slides"
    make_cohort(slides, n=4, width=2048, height=1536, mpp=0.5, seed=1)
    results = tmp_path / "results"
    cfg = workflow_config(tmp_path / "c.yaml", slides, results, slides / "labels.csv")
    # a partition other than the default (the set-up script makes "extra"), so the check below means something
    part = next((p for p in slurm["partitions"] if p != slurm["default"]), slurm["default"])
    run_env = {**env, "WSIPIPE_SLURM_PARTITION": part}
    proc = snakemake(root, tmp_path, run_env, "--configfile", str(cfg))
    out = proc.stdout + proc.stderr

    ids = slurm_job_ids(out)
    # one sbatch per bundle (tissue + grid of 2 slides: 2 bundles for 8 jobs), per feature job (one batch
    # of 4 slides) and per other job
    singles = re.findall(r"^rule (\w+):", out, re.M)
    assert out.count("Group job perslide") == 2 and {"mil_train", "mil_predict"} <= set(singles), out[-4000:]
    assert len(ids) == 2 + len(singles), out[-4000:]
    local = set(re.findall(r"localrule (\w+):", out)) & {"tissue", "grid", "features", "mil_train", "mil_predict"}
    assert not local, f"ran outside SLURM: {local}"
    jobs = squeue_jobs(ids)
    assert set(jobs) == set(ids), f"squeue does not know the jobs {ids}: {jobs}"
    assert all(j["state"] == "COMPLETED" for j in jobs.values()), jobs
    assert all(j["partition"] == part for j in jobs.values()), jobs  # WSIPIPE_SLURM_PARTITION -> sbatch -p
    assert len({j["name"] for j in jobs.values()}) == 1  # the run id the plugin polls squeue with

    bags = list_bags(results / "features" / "test_resnet")
    assert [b.stem for b in bags] == [f"slide_{i:03d}" for i in range(4)]
    assert all(read_bag(b).n > 0 for b in bags)
    mil = results / "mil" / "test_resnet" / "abmil"
    metrics = yaml.safe_load((mil / "metrics.json").read_text())
    assert set(metrics["mean"]) >= {"auc", "balanced_accuracy", "accuracy"}
    assert len((mil / "predictions_all.csv").read_text().strip().splitlines()) == 1 + 4

    proc = snakemake(root, tmp_path, run_env, "--configfile", str(cfg), "-n")
    assert planned(proc.stdout + proc.stderr) == {}, "a finished run must leave nothing to do"


def test_scancel_then_rerun_redoes_only_unfinished_slides(slurm, root, env, tmp_path):
    """Test B: cancel the running SLURM jobs while a feature job is writing; the next invocation reruns
    only the slides that had not finished, and the finished bags stay untouched (same inode, same mtime)."""
    from pipeline.synthetic import make_cohort

    slides = tmp_path / "slides"
    make_cohort(slides, n=4, width=2048, height=1536, mpp=0.5, seed=3)
    results = tmp_path / "results"
    # a heavier encoder and small chunks, so a feature job runs long enough to be caught mid-way
    cfg = workflow_config(tmp_path / "c.yaml", slides, results, None,
                          features={"model": "resnet18", "batch_size": 4, "chunk_rows": 8})
    bag_dir = results / "features" / "resnet18"
    log = (tmp_path / "first.log").open("w")
    # --retries 0: the profile would resubmit the cancelled job at once; this test is about the next run
    first = subprocess.Popen(slurm_cmd(root, tmp_path, "--configfile", str(cfg), "--retries", "0"),
                             cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    cancelled, finished_at_cancel = [], {}
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and first.poll() is None:
            m = re.search(r"SLURM run ID: (\S+)", (tmp_path / "first.log").read_text())
            done = bag_ids(bag_dir)
            writing = list(bag_dir.glob(".*.zarr.partial")) if bag_dir.is_dir() else []
            if m and done and writing:
                running = _run(["squeue", "-h", "--name", m.group(1), "-t", "RUNNING", "-o", "%i"]).stdout.split()
                if running:
                    finished_at_cancel = done
                    _run(["scancel", "--name", m.group(1)])  # this run's jobs only
                    cancelled = running
                    break
            time.sleep(0.3)
        assert cancelled, "never saw a finished bag while a feature job was running under SLURM"
        rc = first.wait(timeout=240)
    finally:
        if first.poll() is None:
            first.terminate()
            first.wait(timeout=60)
        log.close()
    out = (tmp_path / "first.log").read_text()
    assert rc != 0, "snakemake must report the cancelled job as failed"
    assert "CANCELLED" in out, out[-4000:]
    for jid, job in squeue_jobs(cancelled).items():
        assert job["state"] == "CANCELLED", (jid, job)

    finished = bag_ids(bag_dir)  # finished before the cancellation reached them (superset of the above)
    assert set(finished_at_cancel) <= set(finished) and len(finished) < 4, (finished_at_cancel, finished)
    assert all(finished[s] == finished_at_cancel[s] for s in finished_at_cancel)
    unfinished = {f"slide_{i:03d}" for i in range(4)} - set(finished)

    # the dry run before the rerun plans the interrupted feature job (its batch) and nothing upstream
    dry = snakemake(root, tmp_path, env, "--configfile", str(cfg), "-n")
    plan = planned(dry.stdout + dry.stderr)
    assert plan.get("features") == {"00000"}, plan  # the one batch of 4 slides
    for rule in ("tissue", "grid"):
        assert not plan.get(rule), plan

    proc = snakemake(root, tmp_path, env, "--configfile", str(cfg))
    assert len(slurm_job_ids(proc.stdout + proc.stderr)) >= 1
    after = bag_ids(bag_dir)
    assert set(after) == {f"slide_{i:03d}" for i in range(4)}
    for s, ident in finished.items():
        assert after[s] == ident, f"finished bag {s} was rewritten by the rerun"
    for s in unfinished:
        assert read_bag(bag_dir / f"{s}.zarr").n > 0


def test_failed_job_is_retried_with_more_memory(slurm, root, env, tmp_path):
    """A failing submission is resubmitted asking for twice the memory (attempt-scaled requests).

    The profile sets ``retries: 2``; ``--retries 1`` here keeps the test short (the plugin's status
    polling backs off after every failure)."""
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "broken.tif").write_text("not a slide\n")
    # on_slide_error: fail, so the broken slide fails its job (the default records it and goes on)
    cfg = workflow_config(tmp_path / "c.yaml", slides, tmp_path / "results", None, on_slide_error="fail")
    proc = snakemake(root, tmp_path, env, "--configfile", str(cfg), "--retries", "1", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    ids = slurm_job_ids(out)
    assert len(ids) == 2, out[-4000:]  # first attempt + 1 retry
    jobs = squeue_jobs(ids)
    # the bundle asks for its largest job's memory (tissue and grid: 500 MB * attempt in the test sizes)
    assert [jobs[i]["mem"] for i in sorted(ids, key=int)] == ["500M", "1000M"], jobs
    assert all(jobs[i]["state"] == "FAILED" for i in ids), jobs


def test_shipped_profile_is_checked_against_the_cluster_and_fits_with_its_settings(slurm, root, env, tmp_path):
    """Test D: the shipped profile (no test overlay). `pipeline.cluster` refuses its defaults on this small
    node, naming the bundle, its request and the node; with the sizes it suggests (environment variables)
    the whole run goes through SLURM, and the bundle SLURM received is the one the check computed."""
    from pipeline.cluster import bundle_request, check_cluster, load_profile, rule_requests
    from pipeline.synthetic import make_cohort

    small = {"gpus_per_feature_job": 0, "features": {"num_workers": 0}}
    res = check_cluster(root / "profiles" / "slurm", config=small)
    nodes_cpus = int(_run(["sinfo", "-h", "-N", "-o", "%c"]).stdout.split()[0])
    if nodes_cpus >= 8:
        pytest.skip(f"the test node has {nodes_cpus} CPUs: the shipped profile's bundles fit it")
    assert not res["ok"], res
    msg = next(f["message"] for f in res["findings"] if f["fatal"])
    assert "bundle of 4 slide(s)" in msg and "largest node of partition" in msg and "CPUs" in msg
    # the workflow runs the same check when it starts: it stops before submitting anything, naming the
    # bundle, its request and the node (the issue: it used to wait for ever on a job stuck in PartitionConfig)
    pre = tmp_path / "pre"
    pre.mkdir()
    make_cohort(pre / "slides", n=2, width=1024, height=768, mpp=0.5, seed=2)
    pre_cfg = workflow_config(pre / "c.yaml", pre / "slides", pre / "results", None, features={"num_workers": 0})
    stop = subprocess.run(["snakemake", "--snakefile", str(root / "Snakefile"), "--profile",
                           str(root / "profiles" / "slurm"), "--slurm-status-command", "squeue",
                           "--configfile", str(pre_cfg)], cwd=pre, env={**env, "WSIPIPE_SLURM_CHECK": "1"},
                          capture_output=True, text=True, timeout=300)
    out = stop.stdout + stop.stderr
    assert stop.returncode != 0 and "nothing was submitted" in out, out[-4000:]
    assert "bundle of 4 slide(s)" in out and "largest node of partition" in out
    assert not slurm_job_ids(out)
    sizes = {"WSIPIPE_SLURM_CORES": str(res["fit"]["cores"]), "WSIPIPE_SLURM_BUNDLE": str(res["fit"]["bundle"]),
             "WSIPIPE_SLURM_MAX_MEM_MB": str(int(res["largest_node"]["mem_mb"]) // 2)}
    fitted_env = {**env, **sizes, "WSIPIPE_SLURM_CHECK": "1"}
    import os as _os

    old = dict(_os.environ)
    _os.environ.update(sizes)
    try:
        ok = check_cluster(root / "profiles" / "slurm", config=small)
        profile = load_profile(root / "profiles" / "slurm")
    finally:
        _os.environ.clear()
        _os.environ.update(old)
    assert ok["ok"], ok["findings"]

    slides = tmp_path / "slides"
    make_cohort(slides, n=2, width=1024, height=768, mpp=0.5, seed=2)
    results = tmp_path / "results"
    cfg = workflow_config(tmp_path / "c.yaml", slides, results, None, features={"num_workers": 0})
    cmd = ["snakemake", "--snakefile", str(root / "Snakefile"), "--profile", str(root / "profiles" / "slurm"),
           "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
           "--configfile", str(cfg)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=fitted_env, capture_output=True, text=True, timeout=420)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    jobs = squeue_jobs(slurm_job_ids(out))
    assert jobs and all(j["state"] == "COMPLETED" for j in jobs.values()), jobs
    reqs = rule_requests(profile, small)
    expected = bundle_request(reqs, min(2, res["fit"]["bundle"]), res["fit"]["cores"], 1)
    received = {(int(j["cpus"]), j["mem"]) for j in jobs.values()}
    assert (expected.cpus, f"{expected.mem_mb}M") in received, (received, expected)  # the tissue + grid bundle
    assert (reqs["features"].cpus, f"{reqs['features'].mem_mb}M") in received, (received, reqs["features"])
    assert len(list_bags(results / "features" / "test_resnet")) == 2
