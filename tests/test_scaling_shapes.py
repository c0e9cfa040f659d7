"""Training length from a token or FLOP budget, and model shapes for a parameter count."""

from pathlib import Path

import pytest

from configs import smoke
from lmjax import config, flops, validate
from lmjax.scaling import shapes

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# smoke: D=32, 2 layers, 4 heads / 2 kv of 8, SwiGLU 64, V=2048 untied. Per block: q, o 32x32,
# k, v 32x16, MLP 3 x 32x64, two norms: 9,280; + final norm 32 + unembedding 32x2048.
SMOKE_NON_EMBEDDING = 2 * 9_280 + 32 + 65_536
SMOKE_FLOPS_PER_STEP = (6 * SMOKE_NON_EMBEDDING + 6 * 2 * 32 * 32) * 8 * 32  # 132,366,336


def test_smoke_golden_flops():
    cfg = smoke.get_config()
    assert flops.count_params(cfg.model)["non_embedding"] == SMOKE_NON_EMBEDDING
    assert flops.report_dict(cfg)["flops_per_step"] == SMOKE_FLOPS_PER_STEP


@pytest.mark.parametrize("override,steps", [
    ("train.tokens_budget=2560", 10),  # 2,560 tokens / 256 per step
    ("train.tokens_budget=2700", 11),  # rounded to the nearest step
    ("train.flops_budget=1e10", round(1e10 / SMOKE_FLOPS_PER_STEP)),  # 75.5 -> 76
])
def test_budgets_set_the_number_of_steps(override, steps):
    cfg = validate.load(str(CONFIGS / "smoke.py"), [override, "optim.warmup_steps=2"])
    assert cfg.train.steps == steps
    validate.validate(cfg, 8)


def test_budget_mistakes_are_one_sentence():
    with pytest.raises(ValueError, match="not both"):
        validate.load(str(CONFIGS / "smoke.py"), ["train.tokens_budget=1e4",
                                                  "train.flops_budget=1e10"])
    cfg = smoke.get_config()
    cfg.train.tokens_budget = 2560.0  # set without apply_budget: steps still 20
    with pytest.raises(ValueError, match="train.steps=20 disagrees with the budget, which "
                                         "gives 10 steps"):
        validate.validate(cfg, 8)


@pytest.mark.parametrize("target", [3e5, 1e6, 5e6])
def test_shape_for_params_is_the_nearest_width_at_the_aspect_ratio(target):
    model = smoke.get_config().model
    got = shapes.shape_for_params(target, model, aspect=32, head_dim=16)
    assert got["d_model"] % 16 == 0 and got["num_layers"] == max(1, round(got["d_model"] / 32))
    assert got["num_heads"] * got["head_dim"] == got["d_model"]

    def count(width):
        m = model.copy_and_resolve_references()
        m.update(shapes.shape(width, 32, 16, 4.0))
        return flops.count_params(m)["non_embedding"]

    distance = lambda n: max(n / target, target / n)
    assert count(got["d_model"]) == got["params"]
    for neighbour in (got["d_model"] - 16, got["d_model"] + 16):
        if neighbour > 0:
            assert distance(count(neighbour)) >= distance(got["params"])
    assert distance(got["params"]) < 1.5


def test_family_table_gives_the_published_count():
    """GPT-3 Small's shape is GPT-2 small's: 124,439,808 parameters with GPT-2's vocabulary."""
    cfg = config.load(str(CONFIGS / "gpt2.py") + ":small")
    layers, d_model, heads, head_dim, mlp = shapes.GPT3["small"]
    cfg.unlock()
    cfg.model.update(num_layers=layers, d_model=d_model, num_heads=heads, num_kv_heads=heads,
                     head_dim=head_dim, mlp_dim=mlp)
    assert flops.count_params(cfg.model)["total"] == 124_439_808
