"""pipeline.cluster: the shipped SLURM profile's submissions against canned sinfo / scontrol output."""

from __future__ import annotations

import pytest

from pipeline.cluster import (ClusterError, Limits, Node, bundle_request, check, check_cluster, load_profile,
                              parse_partition, parse_sinfo_nodes, parse_time_min, rule_requests)

PROFILE = "profiles/slurm"
# the cluster: one node, 2 CPUs, 22 GB, no GPU
SMALL_SINFO = "localhost|2|22000|(null)|debug*|idle\nlocalhost|2|22000|(null)|extra|idle\n"
SMALL_PART = ("PartitionName=debug AllowGroups=ALL Default=YES MaxNodes=UNLIMITED MaxTime=UNLIMITED "
              "MaxCPUsPerNode=UNLIMITED MaxMemPerNode=UNLIMITED Nodes=localhost State=UP TotalCPUs=2\n")
GPU_SINFO = ("g001|64|512000|gpu:a100:4(S:0-1)|gpu|mix\ng002|64|512000|gpu:a100:4(S:0-1)|gpu|drain*\n"
             "c001|32|192000|(null)|gpu|idle\n")


@pytest.fixture
def profile(root):
    return load_profile(root / PROFILE, environ={})


def fake_run(sinfo: str, part: str, default: str = "debug*\nextra\n"):
    calls = []

    def run(cmd):
        calls.append(cmd)
        if cmd[:2] == ["sinfo", "-h"]:
            return default
        if cmd[0] == "sinfo":
            return sinfo
        if cmd[:3] == ["scontrol", "show", "partition"]:
            return part
        raise AssertionError(cmd)

    run.calls = calls
    return run


def test_parsers():
    nodes = parse_sinfo_nodes(GPU_SINFO + "x1|8|16000|gpu:2,gpu:v100:1|gpu|idle\n")
    assert [(n.name, n.cpus, n.mem_mb, n.gpus, n.usable) for n in nodes] == [
        ("g001", 64, 512000, 4, True), ("g002", 64, 512000, 4, False), ("c001", 32, 192000, 0, True),
        ("x1", 8, 16000, 3, True)]
    assert [n.partitions for n in parse_sinfo_nodes(SMALL_SINFO)] == [["debug", "extra"]]
    assert parse_time_min("UNLIMITED") is None and parse_time_min("30") == 30
    assert parse_time_min("1:30:00") == 90 and parse_time_min("2-00:00:00") == 2880 and parse_time_min("10:30") == 11
    lim = parse_partition("PartitionName=gpu MaxTime=04:00:00 MaxCPUsPerNode=16 MaxMemPerNode=64000 State=UP")
    assert (lim.name, lim.max_time_min, lim.max_cpus_per_node, lim.max_mem_per_node) == ("gpu", 240, 16, 64000)


def test_bundle_requests_follow_snakemake_group_rules(profile):
    reqs = rule_requests(profile, {"gpus_per_feature_job": 1})
    assert (reqs["features"].cpus, reqs["features"].mem_mb, reqs["features"].gpus) == (4, 16000, 1)
    # tissue + grid of 4 slides side by side (1 CPU each, at most 8 per submission): 4 x 4000 MB, 20 + 10 min
    b = bundle_request(reqs, 4, 8, 1)
    assert (b.cpus, b.mem_mb, b.gpus, b.runtime_min) == (4, 16000, 0, 30)
    # 2 CPUs per submission: two tissue jobs at a time, runtimes add up stage by stage
    b = bundle_request(reqs, 4, 2, 1)
    assert (b.cpus, b.mem_mb, b.runtime_min) == (2, 8000, 2 * 20 + 2 * 10)


def test_small_cluster_is_refused_naming_rule_request_and_node(profile):
    nodes, lim = parse_sinfo_nodes(SMALL_SINFO), parse_partition(SMALL_PART)
    res = check(profile, nodes, lim, {"gpus_per_feature_job": 0})
    assert not res["ok"]
    msgs = {f["what"]: f["message"] for f in res["findings"] if f["fatal"]}
    # a feature job needs 2 + num_workers = 4 CPUs: named, with the request, the node and what to lower
    assert "rule features" in msgs and "4 CPUs, 16000 MB" in msgs["rule features"]
    assert "localhost (2 CPUs, 22000 MB, no GPU)" in msgs["rule features"] and "partition 'debug'" in msgs["rule features"]
    assert "num_workers" in msgs["rule features"]
    # four tissue jobs side by side need 4 CPUs: fewer CPUs per submission makes the 4-slide bundle fit
    bundle = next(f for f in res["findings"] if f["what"].startswith("bundle"))
    assert "4 CPUs, 16000 MB" in bundle["message"] and "export WSIPIPE_SLURM_CORES=2" in bundle["fix"]
    assert res["fit"] == {"bundle": 4, "cores": 2}
    res = check(profile, nodes, lim, {"gpus_per_feature_job": 0, "features": {"num_workers": 0}})
    assert not any(f["what"] == "rule features" for f in res["findings"])
    # retries ask for 2x and 3x the memory: said, not fatal
    retry = [f for f in res["findings"] if not f["fatal"]]
    assert any("features" in f["what"] or "bundle" in f["what"] for f in retry)
    assert all("WSIPIPE_SLURM_MAX_MEM_MB" in f["fix"] for f in retry)


def test_profile_sizes_from_the_environment(root):
    env = {"WSIPIPE_SLURM_CORES": "2", "WSIPIPE_SLURM_BUNDLE": "2", "WSIPIPE_SLURM_FEATURES_MEM_MB": "8000",
           "WSIPIPE_SLURM_MIL_MEM_MB": "12000", "WSIPIPE_SLURM_MAX_MEM_MB": "10000"}
    prof = load_profile(root / PROFILE, environ=env)
    assert prof["cores"] == 2 and prof["group-components"] == {"perslide": 2}
    assert prof["set-resources"]["features"]["mem_mb"] == "min(8000 * attempt, 10000)"
    nodes, lim = parse_sinfo_nodes(SMALL_SINFO), parse_partition(SMALL_PART)
    res = check(prof, nodes, lim, {"gpus_per_feature_job": 0, "features": {"num_workers": 0}})
    assert res["ok"] and res["findings"] == [], res["findings"]
    assert res["requests"]["bundle"]["mem_mb"] == 8000 and res["requests"]["bundle"]["cpus"] == 2
    assert res["requests"]["mil_predict"]["mem_mb"] == 6000 and res["requests"]["mil_train"]["mem_mb"] == 10000
    # without the cap, the third attempt of a 2-slide bundle (two tissue jobs side by side, 3 x 4000 MB each)
    # would ask for more than the node has: said as a warning
    env.pop("WSIPIPE_SLURM_MAX_MEM_MB")
    res = check(load_profile(root / PROFILE, environ=env), nodes, lim,
                {"gpus_per_feature_job": 0, "features": {"num_workers": 0}})
    assert res["ok"] and not any(f["fatal"] for f in res["findings"])
    whats = {f["what"]: f for f in res["findings"]}
    assert set(whats) == {"bundle of 2 slide(s) (tissue, grid) (retry 2, attempt 3)",
                          "rule features (retry 2, attempt 3)",
                          "rule mil_train (retry 1, attempt 2)", "rule mil_train (retry 2, attempt 3)"}
    assert "24000 MB > 22000 MB" in whats["bundle of 2 slide(s) (tissue, grid) (retry 2, attempt 3)"]["message"]


def test_gpu_partition_limits_and_states(profile):
    nodes = parse_sinfo_nodes(GPU_SINFO)
    assert check(profile, nodes, Limits(name="gpu"), {"gpus_per_feature_job": 1})["ok"]
    # MaxTime shorter than mil_train's 4 h: named
    res = check(profile, nodes, Limits(name="gpu", max_time_min=120), {"gpus_per_feature_job": 1})
    assert not res["ok"]
    names = [f["what"] for f in res["findings"] if f["fatal"]]
    assert names == ["rule mil_train"]  # a feature job (90 min) and a bundle (30 min) fit
    mt = next(f for f in res["findings"] if f["what"] == "rule mil_train")
    assert "240 min > MaxTime 120 min" in mt["message"] and "g001 (64 CPUs, 512000 MB, 4 GPU(s))" in mt["message"]
    # a GPU per feature job on a partition without GPUs
    res = check(profile, parse_sinfo_nodes("c001|32|192000|(null)|cpu|idle\n"), Limits(name="cpu"),
                {"gpus_per_feature_job": 1})
    assert not res["ok"] and "gpus_per_feature_job=0" in res["findings"][0]["fix"]
    assert res["findings"][0]["what"] == "rule features"
    with pytest.raises(ClusterError, match="no usable node"):
        check(profile, [Node("n1", 8, 1000, 0, "down*")], Limits(name="p"))


def test_check_cluster_queries_the_target_partition(root, monkeypatch):
    for k in ("WSIPIPE_SLURM_PARTITION", "WSIPIPE_SLURM_GPU_PARTITION", "WSIPIPE_SLURM_BUNDLE",
              "WSIPIPE_SLURM_CORES", "WSIPIPE_SLURM_FEATURES_MEM_MB", "WSIPIPE_SLURM_MIL_MEM_MB",
              "WSIPIPE_SLURM_MAX_MEM_MB"):
        monkeypatch.delenv(k, raising=False)
    run = fake_run(SMALL_SINFO, SMALL_PART)
    res = check_cluster(root / PROFILE, config={"gpus_per_feature_job": 0}, run=run)
    assert not res["ok"] and res["partition"] == "debug"
    assert ["sinfo", "-N", "-h", "-p", "debug", "-o", "%N|%c|%m|%G|%P|%t"] in run.calls
    # the feature jobs are checked against the GPU partition, the rest against the default one
    monkeypatch.setenv("WSIPIPE_SLURM_GPU_PARTITION", "extra")
    run = fake_run(SMALL_SINFO, SMALL_PART.replace("debug", "extra"))
    res = check_cluster(root / PROFILE, config={"gpus_per_feature_job": 0}, run=run)
    assert any(c[:5] == ["sinfo", "-N", "-h", "-p", "extra"] for c in run.calls)
    assert any(c[:5] == ["sinfo", "-N", "-h", "-p", "debug"] for c in run.calls)
    assert {"features", "bundle", "mil_train"} <= set(res["requests"])
    with pytest.raises(ClusterError, match="has no nodes"):
        check_cluster(root / PROFILE, partition="nope", run=fake_run("", ""))
