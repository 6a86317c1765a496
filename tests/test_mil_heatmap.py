"""Heatmap stage: per-patch scores + cached coords -> PNG over the thumbnail and QuPath GeoJSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from pipeline.heatmap import HeatmapError, main, normalise_scores, render_heatmap


def _tissue_dir(root: Path, W=2048, H=1536, thumb=(256, 192)) -> Path:
    d = root / "tissue" / "s1"
    d.mkdir(parents=True)
    img = np.full((thumb[1], thumb[0], 3), 230, np.uint8)
    cv2.imwrite(str(d / "thumbnail.png"), img)
    (d / "tissue.json").write_text(json.dumps({"slide_id": "s1", "slide": {"dimensions": [W, H]},
                                               "mask_downsample": 16.0}))
    return d


def test_normalise_scores():
    assert normalise_scores(np.array([3.0, 1.0, 2.0])).tolist() == [1.0, 0.0, 0.5]
    assert normalise_scores(np.array([1.0, 1.0, 3.0]), "rank").tolist() == [0.25, 0.25, 1.0]
    assert normalise_scores(np.array([0.0, 5.0, 10.0]), "minmax").tolist() == [0.0, 0.5, 1.0]
    assert normalise_scores(np.array([2.0, 2.0])).tolist() == [0.5, 0.5]
    assert normalise_scores(np.array([])).size == 0
    with pytest.raises(HeatmapError):
        normalise_scores(np.array([np.nan, 1.0]))


def test_render_colours_only_the_scored_patches(tmp_path):
    d = _tissue_dir(tmp_path)
    coords = np.array([[0, 0], [1024, 768], [1280, 768]])
    scores = np.array([0.1, 0.5, 0.9])
    out = render_heatmap(d / "thumbnail.png", d / "tissue.json", coords, scores, 256,
                         tmp_path / "h.png", tmp_path / "h.geojson")
    assert out.shape == (192, 256, 3)
    png = cv2.cvtColor(cv2.imread(str(tmp_path / "h.png")), cv2.COLOR_BGR2RGB)
    assert np.array_equal(png, out)
    # thumbnail scale 1/8: patch 256 px -> 32 thumbnail px
    low, high = out[10, 10], out[100, 164]  # inside patch 1 (lowest score) and patch 3 (highest)
    assert high[0] > high[2] and low[2] > low[0]  # jet: red = high, blue = low
    assert np.array_equal(out[50, 200], [230, 230, 230])  # untouched outside the patches
    gj = json.loads((tmp_path / "h.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 3
    f = gj["features"][2]
    assert f["geometry"] == {"type": "Polygon", "coordinates": [[[1280, 768], [1536, 768], [1536, 1024],
                                                                 [1280, 1024], [1280, 768]]]}
    assert f["properties"]["objectType"] == "tile"
    assert f["properties"]["measurements"] == {"attention": 0.9, "heatmap": 1.0}
    with pytest.raises(HeatmapError, match="outside"):
        render_heatmap(d / "thumbnail.png", (2048, 1536), np.array([[5000, 0]]), np.array([1.0]), 256)
    with pytest.raises(HeatmapError, match="2 patch coordinates but 1"):
        render_heatmap(d / "thumbnail.png", (2048, 1536), coords[:2], scores[:1], 256)


def test_cli(tmp_path, capsys):
    d = _tissue_dir(tmp_path)
    grid = tmp_path / "grid.json"
    coords = [[0, 0], [256, 0], [512, 256]]
    grid.write_text(json.dumps({"coords": coords, "read_plan": {"patch_size_level0_px": 256}}))
    pd.DataFrame({"x": [0, 256, 512], "y": [0, 0, 256], "attention": [0.2, 0.3, 0.5],
                  "score": [-1.0, 0.0, 2.0]}).to_csv(tmp_path / "s1.csv", index=False)
    args = ["--scores", str(tmp_path / "s1.csv"), "--tissue-dir", str(d), "--grid", str(grid),
            "--out-png", str(tmp_path / "o" / "s1.png"), "--out-geojson", str(tmp_path / "o" / "s1.geojson")]
    assert main(args) == 0
    gj = json.loads((tmp_path / "o" / "s1.geojson").read_text())
    assert [f["properties"]["measurements"]["attention"] for f in gj["features"]] == [0.2, 0.3, 0.5]
    assert main(args + ["--column", "score", "--object-type", "detection"]) == 0
    gj = json.loads((tmp_path / "o" / "s1.geojson").read_text())
    assert gj["features"][0]["properties"] == {"objectType": "detection", "name": "patch 0 (0, 0)",
                                               "measurements": {"score": -1.0, "heatmap": 0.0}}
    # scores from another grid are refused, naming the files
    grid.write_text(json.dumps({"coords": coords[:2], "read_plan": {"patch_size_level0_px": 256}}))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not in the grid" in err and "s1.csv" in err
    assert main(args[:1] + [str(tmp_path / "missing.csv")] + args[2:]) == 2
    assert "missing.csv" in capsys.readouterr().err
    # empty slide: an untouched thumbnail and an empty FeatureCollection
    pd.DataFrame({"x": [], "y": [], "attention": []}).to_csv(tmp_path / "empty.csv", index=False)
    r = subprocess.run([sys.executable, "-m", "pipeline.heatmap", "--scores", str(tmp_path / "empty.csv"),
                        *args[2:6], "--out-png", str(tmp_path / "e.png"), "--out-geojson",
                        str(tmp_path / "e.geojson")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "e.geojson").read_text())["features"] == []
    assert np.array_equal(cv2.imread(str(tmp_path / "e.png")), cv2.imread(str(d / "thumbnail.png")))


def test_heatmap_rule_in_the_dag(cohort, root, env_with_venv, tmp_path):
    """The rule plugs into the workflow: one heatmap job per slide after mil_predict (dry run)."""
    import yaml

    (tmp_path / "workflow").symlink_to(root / "workflow")  # common.smk finds the schema via workflow.basedir
    rules = ["common", "tissue", "grid", "features", "mil", "heatmap"]
    (tmp_path / "Snakefile").write_text(
        "configfile: " + repr(str(root / "config.yaml")) + "\n"
        + "".join(f"include: {str(root / 'workflow' / 'rules' / f'{r}.smk')!r}\n" for r in rules)
        + "rule all:\n    input:\n        heatmap_targets(),\n    default_target: True\n")
    cfg = {"slides_dir": str(cohort), "labels_csv": str(cohort / "labels.csv"), "results_dir": str(tmp_path / "r"),
           "features": {"model": "test_resnet", "device": "cpu"}, "mil": {"model": "transmil", "folds": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(["snakemake", "--snakefile", str(tmp_path / "Snakefile"), "--directory", str(tmp_path),
                           "-n", "--cores", "1", "--configfile", str(tmp_path / "c.yaml"), "--forceall"],
                          cwd=tmp_path, env=env_with_venv, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    n = len(list(cohort.glob("slide_*")))
    import re

    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out, re.M))
    assert int(counts.get("heatmap", 0)) == n and int(counts.get("mil_predict", 0)) == 1, out[-3000:]
    assert "heatmaps/test_resnet/transmil/slide_000.png" in out
