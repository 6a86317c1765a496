"""The house rules: one configuration path, one results layout, one command line, no import cycles."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import config as C
from pipeline.layout import Layout

ROOT = Path(__file__).resolve().parents[1]


def _py(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


# -- configuration ------------------------------------------------------------------------------------
def test_schema_defaults_config_yaml_and_docs_agree():
    schema = C.load_schema()
    props = schema["properties"]
    # the schema knows exactly the keys that have defaults, section by section
    assert set(props) == set(C.TOP_DEFAULTS) | set(C.STAGE_DEFAULTS)
    for section, defaults in C.STAGE_DEFAULTS.items():
        assert set(props[section]["properties"]) == set(defaults), section
        for key in defaults:
            assert props[section]["properties"][key].get("description"), f"{section}.{key} has no description"
    # the defaults themselves are a valid config, and resolving them changes nothing but derived values
    full = {**C.TOP_DEFAULTS, **{s: dict(d) for s, d in C.STAGE_DEFAULTS.items()}}
    C.validate(json.loads(json.dumps(full)), schema)
    for section, defaults in C.STAGE_DEFAULTS.items():
        resolved = C.resolve(section, {})
        assert C.resolve(section, resolved) == resolved  # idempotent
        assert {k: v for k, v in resolved.items() if defaults[k] is not None} == \
            {k: v for k, v in defaults.items() if v is not None}
    # choices of the string settings: schema enums == pipeline.config.CHOICES
    for (section, key), allowed in C.CHOICES.items():
        node = props[key] if not section else props[section]["properties"][key]
        assert tuple(v for v in node["enum"] if v is not None) == tuple(allowed), (section, key)
    # config.yaml only holds values equal to the defaults (it is a template, not a second home)
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    for key, value in cfg.items():
        if key in C.STAGE_DEFAULTS:
            for k, v in value.items():
                assert C.STAGE_DEFAULTS[key][k] == v, f"config.yaml {key}.{k}={v!r} != default"
        else:
            assert C.TOP_DEFAULTS[key] == value, f"config.yaml {key}={value!r} != default"
    # docs/config.md carries the generated reference, unchanged
    doc = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    table = re.search(r"<!-- reference:start -->\n(.*?)<!-- reference:end -->", doc, re.S).group(1)
    assert table == C.reference_table(schema), "docs/config.md is stale: regenerate with python -m pipeline.config"


def test_unknown_and_invalid_settings_are_named():
    with pytest.raises(C.ConfigError, match="patchsize"):
        C.resolve("grid", {"patchsize": 256})
    with pytest.raises(C.ConfigError, match="target_mpp"):
        C.resolve("grid", {"target_mpp": 0})
    with pytest.raises(C.ConfigError, match="thumbnail_max_px"):
        C.resolve("tissue", {"thumbnail_max_px": "big"})
    with pytest.raises(C.ConfigError, match="device"):
        C.resolve("features", {"device": "gpu"})


@pytest.mark.parametrize("model, key", [("transmil", "hidden_dim"), ("dsmil", "hidden_dim"),
                                        ("instance_max", "hidden_dim"), ("instance_max", "attn_dim")])
def test_mil_model_arguments_are_checked_when_the_config_is_read(model, key):
    """mil.hidden_dim from the config used to crash models that take other arguments at training time."""
    with pytest.raises(C.ConfigError, match=rf"mil\.{key}.*{model}"):
        C.resolve("mil", {"model": model, key: 64})
    with pytest.raises(C.ConfigError, match=r"mil\.model_args\.bogus"):
        C.resolve("mil", {"model": model, "model_args": {"bogus": 1}})
    with pytest.raises(C.ConfigError, match="unknown MIL model"):
        C.resolve("mil", {"model": "no_such_model"})
    ok = C.resolve("mil", {"model": "abmil", "hidden_dim": 64, "model_args": {"attn_dim": 32}})
    assert C.mil_model_kwargs(ok) == {"hidden_dim": 64, "attn_dim": 32}


def test_mil_signatures_read_without_torch_match_the_registry():
    """The torch-free reading of the model factories (used while planning) agrees with the registry."""
    from pipeline.mil import _factory, list_models, resolve_model_kwargs

    read = C.mil_model_params()
    assert set(read) == set(list_models())
    for name in list_models():
        params = dict(read[name])
        if params.pop("**", False):
            continue
        assert params == resolve_model_kwargs(name), name
        assert "task" not in params and set(params) <= set(inspect.signature(_factory(name)).parameters)


def test_mil_cli_and_train_defaults_come_from_the_config():
    from pipeline.mil.__main__ import build_parser
    from pipeline.mil.train import train

    train_parser = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices
                        and "train" in a.choices).choices["train"]
    defaults = {a.dest: a.default for a in train_parser._actions}
    sig = inspect.signature(train).parameters
    for key, value in C.STAGE_DEFAULTS["mil"].items():
        if key == "model":
            value = C.DEFAULT_MIL_MODEL  # null in the config: the default model
        if key in defaults:
            assert defaults[key] == value, key
        if key in sig and sig[key].default is not inspect.Parameter.empty:
            assert sig[key].default == value, key


def test_workflow_config_resolves_every_stage_once():
    cfg = C.load_workflow_config({"slides_dir": "s", "results_dir": "r/", "grid": {"target_mpp": 1.0},
                                  "features": {"model": "test_resnet", "tag": "my tag"}})
    assert cfg.results_dir == "r" and cfg.tag == "my_tag"
    assert cfg.stages["grid"]["stride"] == 224 and cfg.stages["preflight"]["target_mpp"] == 1.0
    assert cfg.stages["report"]["tag"] == "my_tag" and cfg.stages["report"]["mil_model"] == ["abmil"]
    assert list(cfg.mil) == ["abmil"] and cfg.mil["abmil"]["model"] == "abmil"
    assert json.loads(cfg.settings("grid")) == cfg.stages["grid"]
    with pytest.raises(C.ConfigError, match="config key grid"):
        C.load_workflow_config({"slides_dir": "s", "results_dir": "r", "grid": {"patchsize": 1}})


# -- layout -------------------------------------------------------------------------------------------
def test_one_layout_for_rules_and_readers(tmp_path):
    lay = Layout(tmp_path, "tag")
    assert lay.bag("{slide}") == f"{tmp_path}/features/tag/{{slide}}.zarr"
    assert lay.heatmap("abmil", "s1", "png") == f"{tmp_path}/heatmaps/tag/abmil/s1.png"
    (tmp_path / "tissue" / "a").mkdir(parents=True)
    (tmp_path / "grid").mkdir()
    (tmp_path / "grid" / "b.json").write_text("{}")
    (tmp_path / "features" / "tag" / "c.zarr").mkdir(parents=True)
    (tmp_path / "features" / "tag" / ".d.zarr.partial").mkdir()
    assert lay.slide_ids() == ["a", "b", "c"]
    # no other module spells the layout out
    offenders = []
    for path in (ROOT / "pipeline").rglob("*.py"):
        if path.name == "layout.py":
            continue
        text = "\n".join(ln for ln in path.read_text(encoding="utf-8").splitlines() if "__file__" not in ln)
        for pat in (r'/ "(grid|tissue|features|failures|heatmaps|mil|logs|report)"', r'"failures.tsv"',
                    r'"preflight.json"', r'"\.wsipipe\.lock"'):
            if re.search(pat, text):
                offenders.append(f"{path.relative_to(ROOT)}: {pat}")
    for path in (ROOT / "workflow" / "rules").glob("*.smk"):
        code = "\n".join(ln for ln in path.read_text(encoding="utf-8").splitlines() if not ln.lstrip().startswith("#"))
        for pat in (r"/tissue/", r"/grid/", r"/features/", r"/mil/", r"/heatmaps/", r"/logs/"):
            if re.search(pat, code):
                offenders.append(f"{path.relative_to(ROOT)}: {pat}")
    assert not offenders, offenders


# -- imports and the command line ---------------------------------------------------------------------
def test_planning_modules_do_not_import_torch_and_there_are_no_cycles():
    out = _py("import sys; import pipeline.config, pipeline.layout, pipeline.files, pipeline.features.catalog, "
              "pipeline.store, pipeline.provenance, pipeline.failures, pipeline.cli; "
              "pipeline.config.mil_model_params(); "
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm') "
              "or m.startswith('pipeline.mil')))")
    assert out == "[]"
    # the preset data is importable on its own; the weights module does not import the builders
    assert _py("import sys, pipeline.features.weights; print('pipeline.features.presets' in sys.modules)") == "False"


def test_one_command_line_lists_every_subcommand():
    from pipeline.cli import COMMANDS

    proc = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0
    for name in ("tissue", "grid", "features", "mil", "heatmap", "report", "preflight", "bench", "synthetic",
                 "weights"):
        assert name in COMMANDS and re.search(rf"^\s+{name}\s", proc.stdout, re.M), name
    import importlib

    for name, (module, _) in COMMANDS.items():
        assert callable(importlib.import_module(module).main), name
    assert "wsipipe" in (ROOT / "pyproject.toml").read_text() and 'wsipipe = "pipeline.cli:main"' in \
        (ROOT / "pyproject.toml").read_text()
    bad = subprocess.run([sys.executable, "-m", "pipeline", "tisue"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert bad.returncode == 2 and "unknown command 'tisue'" in bad.stderr


def test_rules_hand_every_stage_its_settings_the_same_way():
    for name in ("tissue", "grid", "features", "mil", "heatmap", "report"):
        text = (ROOT / "workflow" / "rules" / f"{name}.smk").read_text()
        for rule in re.split(r"\nrule ", text)[1:]:
            if ("python -m pipeline" not in rule or "weights prefetch" in rule or "mil predict" in rule
                    or "mil compare" in rule):  # these stages have no settings of their own
                continue
            assert re.search(r'settings=(settings\("\w+"\)|mil_settings)', rule), rule[:60]
            assert "--settings {params.settings:q}" in rule, rule[:60]
            assert "python -m pipeline " in rule  # the one command line (`wsipipe` is the same program)


def test_readme_matches_the_makefile():
    """The README's quick start says what `make demo` does (it once said 8 slides while the Makefile made 10)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    n_make = int(re.search(r"pipeline[. ]synthetic \S+ --n (\d+)", makefile).group(1))
    n_readme = int(re.search(r"make demo\s+#.*?makes (\d+) synthetic slides", readme).group(1))
    assert n_make == n_readme
    assert re.search(r"^make test\b", readme, re.M) and "test:" in makefile
