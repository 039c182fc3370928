"""Graph semantics: same window, same/adjacent keyframes, weights, self loops, symmetry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reference_stage import random_window, reference_adjacency
from stage_dist.batch import collate
from stage_dist.graph import build_batch_graph, build_graph


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


@pytest.mark.parametrize("seed", range(6))
def test_edges_are_same_window_and_adjacent_keyframes(seed):
    batch = _random_batch(seed, num_windows=3)
    window, frame, _ = _node_attributes(batch)
    mask, _ = build_batch_graph(batch).to_dense()
    expected = (window[:, None] == window[None, :]) & ((frame[:, None] - frame[None, :]).abs() <= 1)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("seed", range(6))
def test_matches_published_block_adjacency(seed):
    batch = _random_batch(100 + seed, num_windows=2)
    mask, weights = build_batch_graph(batch).to_dense()
    adj = reference_adjacency(batch)
    assert torch.equal(mask, adj > 0)
    torch.testing.assert_close(weights, adj, atol=0, rtol=0)


@pytest.mark.parametrize("tau", [1.0, 0.5, 3.0])
def test_weights_are_exp_of_centre_distance(tau):
    batch = _random_batch(7, num_windows=2)
    _, _, boxes = _node_attributes(batch)
    mask, weights = build_batch_graph(batch, tau=tau).to_dense()
    centres = torch.stack(((boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2), 1)
    expected = torch.exp(-tau * torch.cdist(centres.double(), centres.double())).float()
    torch.testing.assert_close(weights[mask], expected[mask], atol=1e-6, rtol=0)
    assert torch.all(weights[~mask] == 0)


def test_self_loops_and_symmetry():
    batch = _random_batch(11, num_windows=4)
    mask, weights = build_batch_graph(batch).to_dense()
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
    mask, _ = build_batch_graph(batch).to_dense()
    assert not mask[window[:, None] != window[None, :]].any()
    assert mask[window[:, None] == window[None, :]].any()


def test_empty_keyframe_breaks_the_chain():
    # keyframe 1 has no nodes: keyframes 0 and 2 are two apart and never connect.
    window = torch.zeros(4, dtype=torch.int64)
    frame = torch.tensor([0, 0, 2, 2])
    boxes = torch.tensor([[0.1, 0.1, 0.2, 0.2]] * 4)
    mask, _ = build_graph(window, frame, boxes).to_dense()
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]).bool()
    assert torch.equal(mask, expected)


def test_single_keyframe_window_and_known_weight():
    window = torch.zeros(2, dtype=torch.int64)
    frame = torch.zeros(2, dtype=torch.int64)
    boxes = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.3, 0.4, 0.5, 0.6]])  # centres 0.3, 0.4 apart
    mask, weights = build_graph(window, frame, boxes).to_dense()
    assert mask.all()
    assert weights[0, 1].item() == pytest.approx(math.exp(-0.5), abs=1e-6)


def test_empty_graph():
    graph = build_graph(
        torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4)
    )
    assert graph.num_nodes == 0
    h = torch.zeros(0, 2, 3)
    assert graph.attend(h, torch.zeros(0, 2), torch.zeros(0, 2)).shape == (0, 2, 3)


def test_layout_is_banded_for_32_windows():
    rng = np.random.default_rng(5)
    windows = [
        random_window(rng, 6, 4, 4, clip=i, actors_per_keyframe=2, objects_per_keyframe=36)
        for i in range(32)
    ]
    graph = build_batch_graph(collate(windows))
    assert graph.mask.shape == (32 * 6, 38, 3 * 38)  # linear in keyframes, not (N, N)
    assert graph.mask.sum().item() == 32 * (6 * 38 * 38 + 2 * 5 * 38 * 38)
