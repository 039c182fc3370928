"""The LR a run gets for its effective batch (stage_dist.engine.lr_scaling) and what the trainer makes of it."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from stage_dist.core.config import from_flat
from stage_dist.engine.distributed import init_distributed
from stage_dist.engine.lr_scaling import DEFAULT_RULE, MEASURED_BATCHES, RECOVERED_UP_TO, choose_lr, lr_factor
from stage_dist.engine.train_config import TrainConfig
from stage_dist.engine.trainer import Trainer
from stage_dist.model.stage import ModelConfig, action_logits, build_model
from tests.conftest import Stores


def test_factors_of_the_three_rules():
    assert [lr_factor("none", b) for b in (1, 8)] == [1.0, 1.0]
    assert [lr_factor("linear", b) for b in (1, 8)] == [1.0, 8.0]
    assert [lr_factor("sqrt", b) for b in (1, 16)] == [1.0, 4.0]
    with pytest.raises(ValueError):
        lr_factor("cube", 2)


def test_recipe_gets_the_base_lr_and_no_warmup_whatever_the_warmup_keyframes():
    for rule in ("none", "linear", "sqrt"):
        choice = choose_lr(6.25e-5, rule, 1, 1, window=6, warmup_keyframes=10_000)
        assert (choice.lr, choice.factor, choice.warmup_steps) == (6.25e-5, 1.0, 0)
    # none at a large batch: the LR is not raised, so no derived warmup either
    assert choose_lr(1e-3, "none", 8, 4, window=6, warmup_keyframes=10_000).warmup_steps == 0


def test_warmup_keyframes_become_steps_of_the_effective_batch():
    # 4 ranks x 8 windows x 6 keyframes = 192 keyframes per step; 1000 keyframes -> ceil(5.2) = 6 steps
    choice = choose_lr(1e-4, "linear", 8, 4, window=6, warmup_keyframes=1000)
    assert (choice.effective_batch, choice.lr, choice.warmup_steps) == (32, pytest.approx(32e-4), 6)
    assert "--warmup-keyframes 1000" in choice.describe() and "x 32 (--lr-scaling linear)" in choice.describe()
    # --warmup-steps wins, at any factor
    assert choose_lr(1e-4, "linear", 8, 4, window=6, warmup_steps=50, warmup_keyframes=1000).warmup_steps == 50
    assert choose_lr(1e-4, "none", 1, 1, window=6, warmup_steps=7).warmup_steps == 7
    assert choose_lr(1e-4, "sqrt", 16, 1, window=6).lr == pytest.approx(4e-4)


def test_coverage_warning_outside_the_measured_batches():
    low, high = MEASURED_BATCHES
    assert choose_lr(1e-4, DEFAULT_RULE, RECOVERED_UP_TO, 1, window=6).coverage_warning() is None
    assert choose_lr(1e-4, DEFAULT_RULE, low, 1, window=6).coverage_warning() is None
    above = choose_lr(1e-4, DEFAULT_RULE, RECOVERED_UP_TO, 2, window=6).coverage_warning()
    assert above is not None and "no measured LR rule" in above
    outside = choose_lr(1e-4, DEFAULT_RULE, high, 2, window=6).coverage_warning()
    assert outside is not None and f"effective batch {2 * high} windows is outside the measured range" in outside


def _config(stores: Stores, tmp_path, **flags) -> TrainConfig:
    base = dict(train_store=str(stores.train), output_dir=str(tmp_path), workers=0, device="cpu", log_every=100)
    return from_flat(TrainConfig, **{**base, **flags})


def test_trainer_logs_its_choice_and_warms_up(tiny_stores, tmp_path, caplog):
    config = _config(tiny_stores, tmp_path / "a", lr=1e-3, windows_per_step=2, lr_scaling="linear",
                     warmup_keyframes=48, window=4)
    trainer = Trainer(config, init_distributed("cpu"))
    assert trainer.lr_choice.warmup_steps == 6  # 48 keyframes / (2 windows x 4 keyframes)
    # LambdaLR applies the first warmup factor at once: step 0 runs at lr x 1/6
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 / 6)
    with caplog.at_level(logging.INFO, logger="stage_dist.train"):
        trainer._log_start()
    assert "effective batch 2 windows: lr 0.002 = base 0.001 x 2 (--lr-scaling linear), warmup 6 steps" in caplog.text
    assert "outside the measured range" not in caplog.text

    caplog.clear()
    wide = Trainer(_config(tiny_stores, tmp_path / "b", windows_per_step=MEASURED_BATCHES[1] + 1),
                   init_distributed("cpu"))
    with caplog.at_level(logging.INFO, logger="stage_dist.train"):
        wide._log_start()
    assert any(r.levelno == logging.WARNING and "outside the measured range" in r.getMessage() for r in caplog.records)


def test_default_rule_is_the_measured_one_and_the_recipe_is_unchanged():
    """The evidence chose sqrt (the previous default) and no warmup: a default run's LR is as before."""
    from stage_dist.engine.train_config import OptimConfig
    from stage_dist.engine.trainer import effective_lr

    optim = OptimConfig(windows_per_step=8, lr=1e-4)
    assert (optim.lr_scaling, optim.warmup_keyframes, optim.optimizer) == ("sqrt", 0, "adam")
    assert effective_lr(optim, 1) == (8, pytest.approx(1e-4 * math.sqrt(8)))


def test_published_recipe_is_plain_adam_at_the_base_lr_bit_for_bit(tiny_stores, tmp_path):
    """--lr-scaling none, 1 window, 1 rank, no warmup flags: the same weights, bit for bit, as a
    hand-written loop of fused Adam at the base LR over the sampler's windows."""
    steps, lr = 12, 6.25e-5
    config = _config(tiny_stores, tmp_path / "run", lr=lr, lr_scaling="none", windows_per_step=1, max_steps=steps,
                     epochs=1, seed=3)
    trainer = Trainer(config, init_distributed("cpu"))
    assert (trainer.lr_choice.lr, trainer.lr_choice.warmup_steps) == (lr, 0)
    # the reference: same seeds, same windows (an untouched copy of the data), plain Adam
    reference_data = Trainer(_config(tiny_stores, tmp_path / "ref", lr=lr, lr_scaling="none", seed=3),
                             init_distributed("cpu"))
    torch.manual_seed(3)
    model = build_model("stage", ModelConfig(actor_dim=reference_data.data.actor_dim,
                                             object_dim=reference_data.data.object_dim))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    torch.manual_seed(3)  # the trainer's own seeding of dropout (rank 0), set after its start-up
    trainer.fit()
    torch.manual_seed(3)  # the same dropout masks for the reference
    model.train()
    reference_data.data.source.load_state_dict({"epoch": 0, "step": 0})
    for step, batch in enumerate(reference_data.data.loader):
        if step == steps:
            break
        batch = batch.to(torch.device("cpu"))
        logits = action_logits(model(batch)).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels) \
            if logits.numel() else logits.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for name, value in model.state_dict().items():
        assert torch.equal(value, trainer.model.state_dict()[name]), name
    assert math.isclose(trainer.optimizer.param_groups[0]["lr"], lr)


def test_lamb_matches_a_hand_computation_and_moves_each_tensor_by_lr_times_its_norm():
    from stage_dist.engine.lamb import Lamb

    w0 = torch.tensor([[3.0, -4.0], [0.5, 2.0]], dtype=torch.float64)
    bias = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # ||w|| = 0: trust ratio 1
    w = w0.clone().requires_grad_(True)
    grads = [torch.tensor([[0.1, 0.2], [-0.3, 0.4]], dtype=torch.float64),
             torch.tensor([[-0.2, 0.1], [0.3, 0.05]], dtype=torch.float64)]
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.999, 1e-6, 0.1
    optimizer = Lamb([w, bias], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    expected, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    for t, g in enumerate(grads, start=1):
        w.grad, bias.grad = g.clone(), torch.ones(2, dtype=torch.float64)
        optimizer.step()
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps) + wd * expected
        before = expected.clone()
        expected = expected - lr * (expected.norm() / u.norm()) * u
        assert torch.allclose(w.detach(), expected, rtol=1e-12, atol=1e-14), t
        assert float((w.detach() - before).norm()) == pytest.approx(lr * float(before.norm()), rel=1e-12)
    # the zero bias: trust ratio 1 at step 1 (a plain Adam step of ~lr, m_hat / sqrt(v_hat) = 1 for a
    # constant gradient), then lr x ||bias|| = lr x lr x sqrt(2) along (1, 1)
    assert torch.allclose(bias.detach(), torch.full((2,), -(lr + lr * lr), dtype=torch.float64), rtol=1e-4)


def test_trainer_uses_lamb_when_asked(tiny_stores, tmp_path):
    from stage_dist.engine.lamb import Lamb

    trainer = Trainer(_config(tiny_stores, tmp_path, optimizer="lamb", lr=1e-2, max_steps=3, epochs=1),
                      init_distributed("cpu"))
    assert isinstance(trainer.optimizer, Lamb)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
