"""Graph semantics: same window, same/adjacent keyframes, weights, self loops, symmetry;
padding (buckets, pinned slots, row blocks) invisible to real nodes; float32 attention logits
under autocast."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stage_dist.data.batch import Padding, bucket, collate
from stage_dist.data.graph import Graph, build_graph
from tests.reference_stage import random_window, reference_adjacency


def _random_batch(seed: int, num_windows: int, max_keyframes: int = 8):
    rng = np.random.default_rng(seed)
    windows = [
        random_window(rng, int(rng.integers(1, max_keyframes + 1)), 6, 6, clip=i)
        for i in range(num_windows)
    ]
    return collate(windows)


def _node_attributes(batch):
    window = torch.cat((batch.actor_window, batch.object_window))
    frame = torch.cat((batch.actor_frame, batch.object_frame))
    boxes = torch.cat((batch.actor_boxes, batch.object_boxes))
    return window, frame, boxes


def _dense(batch, tau: float = 1.0):
    """(mask, weights) over the batch's real nodes (actors then objects)."""
    boxes = torch.cat((batch.actor_boxes, batch.object_boxes))
    mask, weights = batch.graph.to_dense(boxes, tau)
    real = torch.cat((torch.arange(batch.num_actors),
                      batch.actor_boxes.shape[0] + torch.arange(batch.num_objects)))
    return mask[real][:, real], weights[real][:, real]


def _graph(window, frame, boxes=None):
    return build_graph(window.numpy(), frame.numpy())


@pytest.mark.parametrize("seed", range(6))
def test_edges_are_same_window_and_adjacent_keyframes(seed):
    batch = _random_batch(seed, num_windows=3)
    window, frame, _ = _node_attributes(batch)
    mask, _ = _dense(batch)
    expected = (window[:, None] == window[None, :]) & ((frame[:, None] - frame[None, :]).abs() <= 1)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("seed", range(6))
def test_matches_published_block_adjacency(seed):
    batch = _random_batch(100 + seed, num_windows=2)
    mask, weights = _dense(batch)
    adj = reference_adjacency(batch)
    assert torch.equal(mask, adj > 0)
    torch.testing.assert_close(weights, adj, atol=0, rtol=0)


@pytest.mark.parametrize("tau", [1.0, 0.5, 3.0])
def test_weights_are_exp_of_centre_distance(tau):
    batch = _random_batch(7, num_windows=2)
    _, _, boxes = _node_attributes(batch)
    mask, weights = _dense(batch, tau)
    centres = torch.stack(((boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2), 1)
    expected = torch.exp(-tau * torch.cdist(centres.double(), centres.double())).float()
    torch.testing.assert_close(weights[mask], expected[mask], atol=1e-6, rtol=0)
    assert torch.all(weights[~mask] == 0)


def test_self_loops_and_symmetry():
    batch = _random_batch(11, num_windows=4)
    mask, weights = _dense(batch)
    assert mask.diagonal().all()
    assert torch.all(weights.diagonal() == 1.0)
    assert torch.equal(mask, mask.T)
    torch.testing.assert_close(weights, weights.T, atol=1e-7, rtol=0)


def test_two_clips_never_connect():
    rng = np.random.default_rng(3)
    # Two consecutive windows of different clips; the last keyframe of the first and the first
    # of the second are adjacent in the batch but must not connect.
    first = random_window(rng, 3, 6, 6, clip=0, actors_per_keyframe=2, objects_per_keyframe=3)
    second = random_window(rng, 3, 6, 6, clip=1, actors_per_keyframe=2, objects_per_keyframe=3)
    batch = collate([first, second])
    window, _, _ = _node_attributes(batch)
    mask, _ = _dense(batch)
    assert not mask[window[:, None] != window[None, :]].any()
    assert mask[window[:, None] == window[None, :]].any()


def test_empty_keyframe_breaks_the_chain():
    # keyframe 1 has no nodes: keyframes 0 and 2 are two apart and never connect.
    window = torch.zeros(4, dtype=torch.int64)
    frame = torch.tensor([0, 0, 2, 2])
    boxes = torch.tensor([[0.1, 0.1, 0.2, 0.2]] * 4)
    mask, _ = _graph(window, frame).to_dense(boxes)
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]).bool()
    assert torch.equal(mask, expected)


def test_single_keyframe_window_and_known_weight():
    window = torch.zeros(2, dtype=torch.int64)
    frame = torch.zeros(2, dtype=torch.int64)
    boxes = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.3, 0.4, 0.5, 0.6]])  # centres 0.3, 0.4 apart
    mask, weights = _graph(window, frame).to_dense(boxes)
    assert mask.all()
    assert weights[0, 1].item() == pytest.approx(math.exp(-0.5), abs=1e-6)


def test_empty_graph():
    graph = build_graph(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    assert graph.num_nodes == 0
    h = torch.zeros(0, 2, 3)
    weights = graph.weights(torch.zeros(0, 4), 1.0)
    assert graph.attend(h, torch.zeros(0, 2), torch.zeros(0, 2), weights).shape == (0, 2, 3)


def test_layout_is_banded_for_32_windows():
    rng = np.random.default_rng(5)
    windows = [
        random_window(rng, 6, 4, 4, clip=i, actors_per_keyframe=2, objects_per_keyframe=36)
        for i in range(32)
    ]
    graph = collate(windows).graph
    assert graph.mask.shape == (32 * 6, 38, 3 * 38)  # linear in keyframes, not (N, N)
    assert graph.mask.sum().item() == 32 * (6 * 38 * 38 + 2 * 5 * 38 * 38)


def test_bucket_sizes():
    assert [bucket(n) for n in (0, 1, 8, 9, 11, 16, 17, 33, 100, 129)] == [8, 8, 8, 10, 12, 16, 20, 40, 112, 160]
    for n in range(1, 5000):
        b = bucket(n)
        assert n <= b <= max(8, 1.25 * n) and bucket(b) == b


@pytest.mark.parametrize("padding", [Padding(bucketed=True), Padding.batch_invariant(60)],
                         ids=["bucketed", "invariant"])
def test_padding_is_invisible_to_real_nodes(padding):
    rng = np.random.default_rng(21)
    windows = [random_window(rng, 3, 6, 6, clip=i, actors_per_keyframe=np.array([1, 3, 2]),
                             objects_per_keyframe=np.array([5, 0, 9])) for i in range(3)]
    exact, padded = collate(windows), collate(windows, padding)
    assert padded.graph.num_nodes > exact.graph.num_nodes and padded.graph.slots > exact.graph.slots
    assert padded.graph.num_groups > exact.graph.num_groups
    padding_rows = padded.actor_features[exact.num_actors:]
    assert torch.equal(padding_rows, torch.zeros_like(padding_rows))
    # Same edges and weights among the real nodes; padding nodes have none.
    for got, expected in zip(_dense(padded), _dense(exact)):
        assert torch.equal(got, expected)
    boxes = torch.cat((padded.actor_boxes, padded.object_boxes))
    mask, _ = padded.graph.to_dense(boxes)
    assert mask.sum() == _dense(exact)[0].sum()
    # Attention of the real nodes is the same with or without padding.
    torch.manual_seed(0)
    n = padded.graph.num_nodes
    h, src, dst = torch.randn(n, 2, 5), torch.randn(n, 2), torch.randn(n, 2)
    real = torch.cat((torch.arange(exact.num_actors), padded.actor_boxes.shape[0] + torch.arange(exact.num_objects)))
    out = padded.graph.attend(h, src, dst, padded.graph.weights(boxes, 1.0))[real]
    exact_boxes = torch.cat((exact.actor_boxes, exact.object_boxes))
    expected = exact.graph.attend(h[real], src[real], dst[real], exact.graph.weights(exact_boxes, 1.0))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_pinned_slots_and_invariant_multiples():
    rng = np.random.default_rng(22)
    windows = [random_window(rng, 5, 6, 6, clip=i, max_actors=3, max_objects=5) for i in range(2)]
    batch = collate(windows, Padding.batch_invariant(17))
    assert batch.graph.slots == 17  # pinned, not bucketed
    assert batch.actor_features.shape[0] % 128 == 0 and batch.object_features.shape[0] % 128 == 0
    assert batch.graph.num_groups % 32 == 0 and batch.row_block == 128


def test_attention_logits_are_float32_under_autocast():
    """bf16 projections are summed and LeakyReLU'd in float32 (issue 10.1)."""
    rng = np.random.default_rng(23)
    batch = collate([random_window(rng, 6, 6, 6, clip=i) for i in range(2)])
    graph, n = batch.graph, batch.graph.num_nodes
    weights = graph.weights(torch.cat((batch.actor_boxes, batch.object_boxes)), 1.0)
    torch.manual_seed(0)
    x, a = torch.randn(n, 16), torch.randn(16, 2 * 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        halves = (x @ a).view(n, 3, 2)  # the projections, in bf16 as autocast makes them
        assert halves.dtype == torch.bfloat16
        logits = graph.logits(halves[..., 0], halves[..., 1], weights)
    assert logits.dtype == torch.float32
    src, dst = halves[..., 0].float(), halves[..., 1].float()
    queries = src.t()[:, graph.query_node].unsqueeze(3)
    keys = dst.t()[:, graph.key_node].unsqueeze(2)
    expected = torch.nn.functional.leaky_relu(queries + keys, 0.2) * weights
    mask = graph.mask.expand_as(expected)
    assert torch.equal(logits[mask], expected[mask])
    assert torch.all(logits[~mask] == torch.finfo(torch.float32).min)
    # The low-precision sum (what the model did before) is not the same arithmetic.
    low = torch.nn.functional.leaky_relu(halves[..., 0].t()[:, graph.query_node].unsqueeze(3)
                                         + halves[..., 1].t()[:, graph.key_node].unsqueeze(2), 0.2).float() * weights
    assert not torch.equal(low[mask], expected[mask])


def test_graph_is_built_on_the_host():
    batch = collate([random_window(np.random.default_rng(24), 4, 6, 6)])
    assert isinstance(batch.graph, Graph)
    assert batch.labels.dtype == torch.uint8
    moved = batch.to("cpu")
    assert moved.labels.dtype == torch.float32 and torch.equal(moved.labels, batch.labels.float())
    assert moved.actor_index is batch.actor_index and moved.actor_keyframe is batch.actor_keyframe
