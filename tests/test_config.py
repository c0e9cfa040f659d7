import ast
import os
import shutil
import subprocess
import sys

import pytest

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


def test_loaded_config_is_locked():
    cfg = config.load(SMOKE)
    with pytest.raises(AttributeError):
        cfg.model.new_key = 1


@pytest.mark.parametrize("key,value,message", [
    ("model.mlp", "relu", "model.mlp='relu' is not one of"),
    ("model.num_kv_heads", 3, "model.num_heads=4 is not divisible by model.num_kv_heads=3"),
    ("model.dtype", "float99", "model.dtype='float99' is not a dtype"),
    ("optim.warmup_steps", 100, "optim.warmup_steps=100 exceeds train.steps=20"),
    ("train.grad_accum", 3, "not divisible by train.grad_accum=3"),
    ("mesh.rules", "zero", "mesh.rules='zero' is not one of"),
    ("data.source", "web", "data.source='web' is not one of"),
    ("train.log_every", 0, "train.log_every=0 must be at least 1"),
])
def test_validate(key, value, message):
    cfg = config.load(SMOKE)
    group, name = key.split(".")
    cfg[group][name] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        validate.validate(cfg, 8)
    assert validate.validate(config.load(SMOKE), 8) == (8, 1, 1, 1)  # data, fsdp, seq, tensor


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
