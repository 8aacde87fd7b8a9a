"""The trainer's bf16 step (autocast around the loss) against an fp32 run of the same step (#19)."""
from __future__ import annotations

import math

import pytest

from fastkd.train import TrainConfig, Trainer

from test_train import assets, mode_config, read_metrics  # noqa: F401  (assets is a fixture)

# bf16 autocast rounds the model's GEMM operands to 8 significant bits (2⁻⁸ ≈ 0.4 %) through every
# layer; the loss itself keeps unrounded fp32 statistics. A first-step loss within 2 % of the fp32
# one says the loss saw no dtype trouble (before #19 bf16 autocast gave JSD above log 2).
TOLERANCE = 2e-2


@pytest.mark.parametrize("name", ["online", "offline"])
def test_bf16_first_step_matches_fp32(assets, tmp_path, name):  # noqa: F811
    losses = {}
    for bf16 in (False, True):
        cfg = mode_config(assets, name, tmp_path / f"{name}-{bf16}")
        cfg.update(max_steps=1, bf16=bf16, eval_data=None, eval_cache=None)
        Trainer(TrainConfig(**cfg)).train()
        (record,) = [r for r in read_metrics(cfg["output_dir"]) if "loss" in r]
        losses[bf16] = record["loss"]
    assert math.isfinite(losses[True])
    assert abs(losses[True] - losses[False]) <= TOLERANCE * abs(losses[False]), losses
