"""STAGE vs the published equations (tests/reference_stage.py): logits, gradients,
AMP, several windows per step, receptive field, baseline.

AMP tolerances (CPU, small dims, eval mode, logits of magnitude ~2): bf16 autocast logits within
0.05 absolute of float32 and parameter gradients within 5% relative L2 error; float16 (model and
inputs cast with ``.half()``) within 0.01 absolute and 2% relative L2 error.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from stage_dist.data.batch import Padding, collate
from stage_dist.model.saved_model import load_model_state
from stage_dist.model.stage import (
    STAGE,
    ModelConfig,
    ModelConfigError,
    ModelInputError,
    NoGraphBaseline,
    action_logits,
    build_model,
    compile_model,
)
from tests.reference_stage import ReferenceStage, random_window, reference_logits

SMALL = ModelConfig(actor_dim=60, object_dim=124)
ACTOR, OBJECT = SMALL.actor_dim, SMALL.object_dim


def _pair(config: ModelConfig, seed: int = 0) -> tuple[STAGE, ReferenceStage]:
    torch.manual_seed(seed)
    reference = ReferenceStage(config.num_outputs, config.actor_dim, config.object_dim,
                               config.num_heads, dropout=config.dropout)
    model = STAGE(config)
    load_model_state(model, reference.state_dict())
    return model, reference


def _windows(rng, count: int, **kwargs):
    return [random_window(rng, int(rng.integers(1, 9)), ACTOR, OBJECT, clip=i, **kwargs)
            for i in range(count)]


def _edge_case_batches():
    rng = np.random.default_rng(42)
    yield "random", collate(_windows(rng, 3))
    yield "single keyframe", collate([random_window(rng, 1, ACTOR, OBJECT, actors_per_keyframe=3)])
    yield "keyframes without objects", collate(
        [random_window(rng, 5, ACTOR, OBJECT, objects_per_keyframe=np.array([0, 4, 0, 0, 7]))])
    yield "no objects at all", collate(
        [random_window(rng, 4, ACTOR, OBJECT, objects_per_keyframe=0)])
    yield "window without actors", collate(
        [random_window(rng, 3, ACTOR, OBJECT, actors_per_keyframe=0),
         random_window(rng, 8, ACTOR, OBJECT, clip=1)])
    yield "max sizes", collate(
        [random_window(rng, 8, ACTOR, OBJECT, actors_per_keyframe=10, objects_per_keyframe=40)])


def _grads(module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters()}


def _compare_with_reference(config: ModelConfig, train_mode: bool, dtype: torch.dtype):
    model, reference = _pair(config, seed=config.num_heads)
    model.to(dtype).train(train_mode)
    reference.to(dtype).train(train_mode)
    for name, batch in _edge_case_batches():
        model.zero_grad()
        reference.zero_grad()
        ours, theirs = model(batch), reference_logits(reference, batch)
        assert ours.shape == (batch.actor_features.shape[0], 81), name
        assert ours.dtype == dtype
        yield name, ours, theirs
        upstream = torch.randn_like(ours)
        (ours * upstream).sum().backward()
        (theirs * upstream).sum().backward()
        ours_grads, their_grads = _grads(model), _grads(reference)
        assert ours_grads.keys() == their_grads.keys()
        for key, grad in ours_grads.items():
            yield f"{name}: gradient of {key}", grad, their_grads[key]


@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("train_mode", [False, True])
def test_logits_and_gradients_match_reference(heads, train_mode):
    """float32: logits within 1e-5 absolute; each gradient within 1e-4 of its largest entry
    (``a``'s gradient sums N x N x 2F products, so reduction order alone moves it ~1e-5
    relative). Train mode runs with dropout 0, to be deterministic."""
    config = replace(SMALL, num_heads=heads, dropout=0.0 if train_mode else 0.5)
    for name, ours, theirs in _compare_with_reference(config, train_mode, torch.float32):
        if "gradient" in name:
            atol = 1e-4 * max(theirs.abs().max().item(), 1e-2)
        else:
            atol = 1e-5
        torch.testing.assert_close(ours, theirs, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("heads", [1, 4])
def test_float64_logits_and_gradients_match_reference_tightly(heads):
    """In float64 rounding vanishes: the two computations are the same function."""
    config = replace(SMALL, num_heads=heads)
    for name, ours, theirs in _compare_with_reference(config, False, torch.float64):
        torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-9, msg=name)


def test_random_windows_sweep_matches_reference():
    model, reference = _pair(SMALL, seed=9)
    model.eval()
    reference.eval()
    rng = np.random.default_rng(7)
    with torch.no_grad():
        for _ in range(8):
            batch = collate(_windows(rng, int(rng.integers(1, 4))))
            torch.testing.assert_close(model(batch), reference_logits(reference, batch),
                                       atol=1e-5, rtol=0)


@pytest.mark.parametrize("heads", [0, 3, 5, 8])
def test_unsupported_head_counts_are_refused(heads):
    with pytest.raises(ModelConfigError, match=f"num_heads={heads}"):
        STAGE(ModelConfig(num_heads=heads))


def test_other_config_errors():
    with pytest.raises(ModelConfigError, match="object_dim"):
        STAGE(ModelConfig(actor_dim=64, object_dim=32))
    with pytest.raises(ModelConfigError, match="dropout"):
        STAGE(replace(SMALL, dropout=1.0))
    with pytest.raises(ModelConfigError, match="unknown model kind"):
        build_model("gcn", SMALL)


def test_equal_object_and_actor_dims_have_no_reducer():
    model = STAGE(ModelConfig(actor_dim=60, object_dim=60))
    assert not any(name.startswith("obj_reducer") for name in model.state_dict())
    batch = collate([random_window(np.random.default_rng(0), 3, 60, 60)])
    assert model(batch).shape == (batch.actor_features.shape[0], 81)


def test_batch_with_wrong_feature_size_is_refused():
    batch = collate([random_window(np.random.default_rng(0), 2, ACTOR + 1, OBJECT)])
    with pytest.raises(ModelInputError, match="actor_features have 61 columns"):
        STAGE(SMALL)(batch)


def test_published_parameter_names_and_shapes():
    shapes = {k: tuple(v.shape) for k, v in STAGE(ModelConfig()).state_dict().items()}
    assert shapes["gat1.attention_0.W"] == (1028, 257)
    assert shapes["gat1.attention_3.a"] == (514, 1)
    assert shapes["gat_fc.weight"] == (1028, 1028)
    assert shapes["gat_fc2.weight"] == (1028, 1028)
    assert shapes["l_norm.weight"] == shapes["l_norm2.weight"] == (1028,)
    assert shapes["logits.weight"] == (81, 1028)
    assert shapes["obj_reducer.weight"] == (1024, 2048)
    reference = ReferenceStage(81, 1024, 2048, 4)
    assert shapes == {k: tuple(v.shape) for k, v in reference.state_dict().items()}


def _run(model, batch, context=contextlib.nullcontext()):
    model.zero_grad()
    with context:
        out = model(batch)
    out.float().sum().backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    return out.float().detach(), grads


def _half_batch(batch):
    halved = copy.copy(batch)
    halved.actor_features = batch.actor_features.half()
    halved.object_features = batch.object_features.half()
    return halved


@pytest.mark.parametrize("precision", ["bf16-autocast", "float16"])
def test_low_precision_is_finite_and_close(precision):
    torch.manual_seed(0)
    model = STAGE(SMALL).eval()
    batch = collate(_windows(np.random.default_rng(3), 3))
    logits32, grads32 = _run(model, batch)
    if precision == "bf16-autocast":
        logits, grads = _run(model, batch, torch.autocast("cpu", dtype=torch.bfloat16))
        atol, grad_rtol = 0.05, 0.05
    else:
        logits, grads = _run(copy.deepcopy(model).half(), _half_batch(batch))
        atol, grad_rtol = 0.01, 0.02
    assert torch.isfinite(logits).all() and torch.isfinite(grads).all()
    assert (logits - logits32).abs().max().item() <= atol
    assert ((grads - grads32).norm() / grads32.norm()).item() <= grad_rtol


def test_float16_features_are_cast_to_model_dtype():
    model = STAGE(SMALL).eval()
    batch = collate(_windows(np.random.default_rng(4), 2))
    halved = _half_batch(batch)
    as_float = copy.copy(halved)
    as_float.actor_features = halved.actor_features.float()
    as_float.object_features = halved.object_features.float()
    with torch.no_grad():
        out = model(halved)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, model(as_float), atol=0, rtol=0)


def test_several_windows_per_step_equal_one_at_a_time():
    model = STAGE(SMALL).eval()
    windows = _windows(np.random.default_rng(5), 5)
    with torch.no_grad():
        together = model(collate(windows))
        alone = torch.cat([model(collate([w])) for w in windows])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_receptive_field_is_two_keyframes():
    model = STAGE(SMALL).eval()
    rng = np.random.default_rng(6)
    window = random_window(rng, 8, ACTOR, OBJECT, actors_per_keyframe=2, objects_per_keyframe=3)
    k = 3
    base = collate([window])

    def perturbed(frame: int):
        changed = copy.deepcopy(window)
        a0, a1 = changed.actor_ptr[frame], changed.actor_ptr[frame + 1]
        o0, o1 = changed.object_ptr[frame], changed.object_ptr[frame + 1]
        changed.actor_features[a0:a1] += 3.0
        changed.object_features[o0:o1] -= 3.0
        changed.object_boxes[o0:o1] = [0.0, 0.0, 1.0, 1.0]
        return collate([changed])

    rows = base.actor_frame == k
    with torch.no_grad():
        out = model(base)[rows]
        for frame in (k - 3, k + 3):  # outside +/-2: no effect
            torch.testing.assert_close(model(perturbed(frame))[rows], out, atol=1e-6, rtol=0)
        for frame in (k - 2, k + 2):  # two hops away: reaches keyframe k
            assert (model(perturbed(frame))[rows] - out).abs().max().item() > 1e-3


def test_baseline_uses_actors_only_with_the_same_classifier():
    torch.manual_seed(0)
    baseline = build_model("baseline", SMALL).eval()
    assert isinstance(baseline, NoGraphBaseline)
    assert set(baseline.state_dict()) == {"logits.weight", "logits.bias"}
    batch = collate(_windows(np.random.default_rng(8), 2))
    other = copy.copy(batch)
    other.object_features = torch.randn_like(batch.object_features)
    with torch.no_grad():
        out = baseline(batch)
        torch.testing.assert_close(out, baseline(other), atol=0, rtol=0)
        x1, y1, x2, y2 = batch.actor_boxes.unbind(1)
        geometry = torch.stack((y2 - y1, x2 - x1, (x1 + x2) / 2, (y1 + y2) / 2), dim=1)
        nodes = torch.cat((batch.actor_features, geometry), dim=1)
        torch.testing.assert_close(out, baseline.logits(nodes), atol=1e-5, rtol=0)
    assert isinstance(build_model("stage", SMALL), STAGE)


def test_action_logits_drop_the_background_column():
    logits = torch.arange(2 * 81, dtype=torch.float32).view(2, 81)
    actions = action_logits(logits)
    assert actions.shape == (2, 80)
    assert torch.equal(actions[:, 0], logits[:, 1])
    with pytest.raises(ModelConfigError, match="81 columns"):
        action_logits(torch.zeros(2, 80))


def test_train_mode_applies_dropout():
    model = STAGE(SMALL).train()
    window = random_window(np.random.default_rng(9), 3, ACTOR, OBJECT, actors_per_keyframe=2)
    batch = collate([window])
    with torch.no_grad():
        assert not torch.equal(model(batch), model(batch))
        model.eval()
        torch.testing.assert_close(model(batch), model(batch), atol=0, rtol=0)


# -- torch.compile (issue 10.2): one graph, bucketed shapes, compiled == eager ---------------


def test_forward_and_backward_trace_as_one_graph_without_host_reads():
    """fullgraph=True fails on any graph break: an .item(), a bincount/nonzero (data-dependent
    shape) or any other host read inside the forward."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    model = compile_model(STAGE(SMALL).train(), "cpu", backend=counter)
    rng = np.random.default_rng(30)
    batch = collate(_windows(rng, 3), Padding(bucketed=True))
    model(batch).sum().backward()
    assert counter.frame_count == 1
    assert all(p.grad is not None for p in model.parameters())
    # Same shapes, other values and other real sizes (one actor fewer): no recompilation.
    again = copy.copy(batch)
    again.actor_features = torch.randn_like(batch.actor_features)
    again.actor_index = batch.actor_index[:-1]
    assert model(again).shape[0] == batch.num_actors - 1
    assert counter.frame_count == 1


def test_an_epoch_compiles_once_per_bucketed_shape(tiny_stores):
    from torch._dynamo.testing import CompileCounter

    from stage_dist.data.split_config import SplitConfig
    from stage_dist.data.splits import open_train_data

    torch._dynamo.reset()
    split = SplitConfig(store=str(tiny_stores.train))
    data = open_train_data(split, window=4, windows_per_step=2, seed=0, rank=0, world_size=1, num_workers=0,
                           pin_memory=False, padding=Padding(bucketed=True))
    exact = open_train_data(split, window=4, windows_per_step=2, seed=0, rank=0, world_size=1, num_workers=0,
                            pin_memory=False)
    config = ModelConfig(actor_dim=data.actor_dim, object_dim=data.object_dim)
    counter = CompileCounter()  # counts dynamo compilations, runs the traced graph eagerly
    model = compile_model(STAGE(config).train(), "cpu", backend=counter)
    shapes, raw_shapes = set(), set()
    for batch, unpadded in zip(data.loader, exact.loader):
        model(batch).sum().backward()
        shapes.add(batch.shape_key())
        raw_shapes.add(unpadded.shape_key())
    # At most one compilation per bucketed shape, none per step (dynamo's automatic dynamic
    # shapes make it fewer: a dimension seen at two sizes is compiled symbolically after that).
    assert 1 <= counter.frame_count <= len(shapes) < len(raw_shapes)


@pytest.mark.slow
def test_inductor_logits_and_gradients_equal_eager():
    """Inductor (the CPU default of compile_model) against eager, float32, within 1e-5, with
    the training loss (BCE mean) for the gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = STAGE(SMALL).eval()
    compiled = compile_model(copy.deepcopy(eager), "cpu")
    batch = collate(_windows(np.random.default_rng(31), 3), Padding(bucketed=True))
    labels = batch.labels.float()

    def run(model):
        model.zero_grad()
        logits = model(batch)
        torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 1:], labels).backward()
        return logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    expected, expected_grads = run(eager)
    got, got_grads = run(compiled)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_grads, expected_grads, atol=1e-5, rtol=0)
