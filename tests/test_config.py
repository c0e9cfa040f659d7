import ast
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmjax import config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.py")


def test_overrides_are_typed():
    cfg = config.load(SMOKE, ["model.d_model=48", "optim.lr=0.5", "model.qk_norm=true",
                              "data.source=synthetic"])
    assert cfg.model.d_model == 48 and cfg.optim.lr == 0.5 and cfg.model.qk_norm is True
    assert cfg.data.source == "synthetic"


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(KeyError, match=r"Unknown config key 'model.d_modl' \(did you mean "
                                       r"'model.d_model'\?\)"):
        config.load(SMOKE, ["model.d_modl=3"])


def test_bad_value_and_missing_file():
    with pytest.raises(ValueError, match="'model.d_model' expects a int, got 'abc'"):
        config.load(SMOKE, ["model.d_model=abc"])
    with pytest.raises(ValueError, match="must look like key.subkey=value"):
        config.load(SMOKE, ["model.d_model"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        config.load("configs/nope.py")


@pytest.mark.parametrize("source,message", [
    ("def get_config(:\n    pass\n", "has a syntax error on line 1"),
    ("CONFIG = {}\n", "defines no get_config(arg=None) function"),
    ("def get_config(arg=None):\n    return [1]\n", "returned a list, not a ConfigDict or dict"),
])
def test_a_config_file_that_gives_no_config_is_one_sentence(tmp_path, source, message):
    (tmp_path / "bad.py").write_text(source)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/bad.py") + ".*" +
                       re.escape(message)):
        config.load(str(tmp_path / "bad.py"))


def test_a_folder_and_a_dict_returning_config(tmp_path):
    with pytest.raises(ValueError, match=f"Config '{tmp_path}' is a folder; name a config file"):
        config.load(str(tmp_path))
    (tmp_path / "plain.py").write_text("def get_config(arg=None):\n"
                                       "    return {'model': {'d_model': int(arg)}}\n")
    assert config.load(f"{tmp_path}/plain.py:12").model.d_model == 12


@pytest.mark.parametrize("text,message", [
    ('{"model": {"d_model": 3', "is not valid JSON"),
    ("[1, 2]", "holds a JSON list, not the object of a config lmjax wrote"),
    ("\xff\xfe garbage", "is not valid JSON"),
])
def test_a_bad_config_json_names_the_file(tmp_path, text, message):
    (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=f"{tmp_path}/config.json {message}"):
        config.from_workdir(tmp_path)
    with pytest.raises(ValueError, match=f"{tmp_path}/config.json {message}"):
        config.load(str(tmp_path / "config.json"))


def test_the_command_line_shows_a_bad_config_file_in_one_line(tmp_path):
    (tmp_path / "bad.py").write_text("def get_config(:\n")
    out = subprocess.run([sys.executable, "-m", "lmjax", "info", f"--config={tmp_path}/bad.py"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(
        f"lmjax info: Config file '{tmp_path}/bad.py' has a syntax error on line 1: ")


def test_loaded_config_is_locked():
    cfg = config.load(SMOKE)
    with pytest.raises(AttributeError):
        cfg.model.new_key = 1


@pytest.mark.parametrize("key,value,message", [
    ("model.mlp", "relu", "model.mlp='relu' is not one of"),
    ("model.num_kv_heads", 3, "model.num_heads=4 is not divisible by model.num_kv_heads=3"),
    ("model.dtype", "float99", "model.dtype='float99' is not a dtype"),
    ("optim.warmup_steps", 100, "optim.warmup_steps=100 must be in [0, train.steps=20)."),
    ("train.grad_accum", 3, "not divisible by train.grad_accum=3"),
    ("mesh.rules", "zero", "mesh.rules='zero' is not one of"),
    ("data.source", "web", "data.source='web' is not one of"),
    ("train.log_every", 0, "train.log_every=0 must be at least 1"),
])
def test_validate(key, value, message):
    cfg = config.load(SMOKE)
    group, name = key.split(".")
    cfg[group][name] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        validate.validate(cfg, 8)
    assert validate.validate(config.load(SMOKE), 8) == (8, 1, 1, 1, 1)  # sharding.AXES order


def test_every_numeric_key_has_a_range_that_its_default_meets():
    """validate.RANGES is the one table of single-key ranges: a numeric key added to base.py
    without a rule fails here, and every default lies in its range."""
    flat = config._flat(config.load(config.BASE).to_dict())
    numeric = {k for k, v in flat.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    assert numeric == set(validate.RANGES)
    validate.check_ranges(config.load(config.BASE))


@pytest.mark.parametrize("override,message", [
    ("optim.lr=-0.001", "optim.lr=-0.001 must be above 0."),
    ("optim.lr=0", "optim.lr=0.0 must be above 0."),
    ("optim.lr=nan", "optim.lr=nan must be a finite number, above 0."),
    ("optim.warmup_steps=20", "optim.warmup_steps=20 must be in [0, train.steps=20)."),
    ("model.dropout=1", "model.dropout=1.0 must be in [0, 1)."),
    ("optim.b2=1.5", "optim.b2=1.5 must be in [0, 1)."),
    ("data.global_batch_size=0", "data.global_batch_size=0 must be at least 1."),
    ("data.eval_fraction=1", "data.eval_fraction=1.0 must be in [0, 1)."),
    ("mesh.fsdp=0", "mesh.fsdp=0 must be at least 1 (or -1 = the devices the other axes leave)."),
    ("train.spike_factor=0.5", "train.spike_factor=0.5 must be above 1 (or 0 = off)."),
    ("train.tokens_budget=inf",
     "train.tokens_budget=inf must be a finite number, at least 0 (0 = off)."),
    ("checkpoint.max_to_keep=0", "checkpoint.max_to_keep=0 must be at least 1."),
])
def test_a_number_out_of_range_is_one_sentence_naming_key_value_and_range(override, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        validate.validate(validate.load(SMOKE, [override]), 8)


@pytest.mark.parametrize("key,value,message", [
    ("model.d_model", True, "model.d_model=True must be an integer, at least 1."),
    ("optim.lr", None, "optim.lr=None must be a finite number, above 0."),
])
def test_a_value_of_the_wrong_type_is_named(key, value, message):
    """What a config file can still set: ConfigDict refuses a str for an int, but not these."""
    cfg = config.load(SMOKE)
    group, name = key.split(".")
    cfg[group][name] = value
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        validate.validate(cfg, 8)


KEYS = sorted(config._flat(config.load(SMOKE).to_dict()))
TEXT = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "-1", "0", "1", "0.5", "1e309", "nan", "true", "none", "xla", "[1]"]),
    st.text(max_size=12),
)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), TEXT),
                min_size=1, max_size=3))
def test_random_overrides_fail_only_with_one_sentence(items):
    """Any overrides (wrong type, out of range, unknown key) are accepted, or refused with one
    of the errors the CLI prints as one line; never another exception. Derandomized: CI runs
    the same 300 examples every time."""
    try:
        cfg = validate.load(SMOKE, [f"{key}={value}" for key, value in items])
        validate.validate(cfg, 8)
    except (ValueError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) else str(e)
        assert "\n" not in message and message.endswith((".", ")")), message
        return
    for key, rule in validate.RANGES.items():  # accepted: every number is in its range
        value = validate._value(cfg, key)
        assert math.isfinite(value) and rule.holds(value, cfg), key


def test_budgets_are_applied_by_validate_load_only():
    """config.load cannot count FLOPs (it imports nothing of lmjax); validate.load sets
    train.steps from the budget, and validate refuses a config whose steps disagree."""
    raw = config.load(SMOKE, ["train.tokens_budget=2560"])
    assert raw.train.steps == 20
    with pytest.raises(ValueError, match="disagrees with the budget"):
        validate.validate(raw, 8)
    assert validate.load(SMOKE, ["train.tokens_budget=2560"]).train.steps == 10  # 256 / step


def test_save_round_trip(tmp_path):
    cfg = config.load(SMOKE)
    config.save(cfg, tmp_path / "config.json")
    assert config.from_json(tmp_path / "config.json").to_dict() == cfg.to_dict()


def test_config_imports_nothing_of_lmjax():
    """config.py is the bottom layer: every module may import it, so it imports none of them."""
    tree = ast.parse(open(os.path.join(ROOT, "lmjax", "config.py")).read())
    imports = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):  # a relative import starts with '.'
            imports.append("." * node.level + (node.module or ""))
    assert not [n for n in imports if n.split(".")[0] in ("lmjax", "")], imports


def test_configs_path_outside_a_checkout_reads_the_shipped_copy(tmp_path, monkeypatch):
    """`--config=configs/x.py` typed where no configs/ is, and a config file of the user's own
    that starts from base.py, both read the configs/ lmjax ships."""
    own = tmp_path / "mine.py"
    own.write_text("from configs import base\n\n\ndef get_config(arg=None):\n"
                   "    c = base.get_config()\n    c.model.d_model = 40\n    return c\n")
    monkeypatch.chdir(tmp_path)
    assert config.find("configs/smoke.py") == os.path.join(config.configs_dir(), "smoke.py")
    assert config.load("configs/smoke.py").to_dict() == config.load(SMOKE).to_dict()
    assert config.load("mine.py").model.d_model == 40
    assert config.BASE == os.path.join(config.configs_dir(), "base.py")


def _copy_of_the_checkout(dest) -> str:
    """What `pip install .` builds from, copied so that the build writes nothing here."""
    os.makedirs(dest)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), dest)
    for name in ("lmjax", "configs"):
        shutil.copytree(os.path.join(ROOT, name), os.path.join(dest, name),
                        ignore=shutil.ignore_patterns("__pycache__"))
    return str(dest)


def test_a_non_editable_install_ships_configs(tmp_path):
    """From a plain `pip install .`, run outside any checkout, `configs/x.py[:arg]` names the
    installed copy and its `from configs import base` finds the installed base.py."""
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(site),
                    _copy_of_the_checkout(tmp_path / "src")],
                   check=True, capture_output=True, timeout=300)
    elsewhere.mkdir()
    script = ("from lmjax import config\n"
              "print(config.BASE)\n"
              "print(config.load('configs/tiny.py').model.d_model)\n"
              "print(config.load('configs/llama.py:tiny').model.num_kv_heads)\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env,
                         capture_output=True, text=True, check=True, timeout=120)
    base, tiny_width, llama_kv_heads = out.stdout.split()
    assert base == str(site / "lmjax" / "configs" / "base.py")
    assert (tiny_width, llama_kv_heads) == ("128", "2")


def test_a_workdir_from_before_a_new_key_resumes_when_the_key_is_at_its_default(tmp_path):
    """Keys lmjax gained later (optim.name, train.lease_timeout, ...) read their base default
    from an old config.json; set to something else, they are a change like any other."""
    from configs import smoke

    cfg = smoke.get_config()
    old = json.loads(cfg.to_json())
    del old["optim"]["name"], old["model"]["embed_scale"]  # as a workdir from before them
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    assert config.resume_conflicts(path, cfg) == []
    cfg.optim.name = "lion"
    assert config.resume_conflicts(path, cfg) == ["optim.name"]


@pytest.mark.parametrize("override, message", [
    ("train=0", "Config key 'train' is a group of keys; set one of them (train."),
    ("seed.x=1", "Unknown config key 'seed.x': seed is a value, not a group of keys."),
])
def test_an_override_of_a_group_or_below_a_value_is_one_sentence(override, message):
    with pytest.raises((ValueError, KeyError), match=re.escape(message)):
        config.load(SMOKE, [override])
