"""Properties of the clip-window training sampler and the inference window planner."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from stage_dist.data.sampler import (
    ClipWindowSampler,
    clip_windows,
    plan_inference_windows,
    rank_slice,
)
from stage_dist.store.window import InferenceWindow, WindowSpec

WORLD_SIZES = range(1, 9)
# Mixed clips: AVA-length, shorter than W, exactly W, W + 1, a single keyframe, an empty clip.
CLIPS = [897, 3, 6, 7, 1, 0, 40, 13, 25, 2]


def all_rank_steps(clips, world_size, epoch=0, **kwargs) -> list[list[list[WindowSpec]]]:
    """Every rank's steps for one epoch."""
    out = []
    for rank in range(world_size):
        sampler = ClipWindowSampler(clips, rank=rank, world_size=world_size, **kwargs)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def keyframe_coverage(clips, windows) -> list[np.ndarray]:
    counts = [np.zeros(n, dtype=np.int64) for n in clips]
    for clip, start, length in windows:
        counts[clip][start : start + length] += 1
    return counts


# --- windows of one epoch -----------------------------------------------------------------


def test_clip_windows_offset_head_and_remainder():
    windows = clip_windows([15, 4, 12], window=6, offsets=np.array([2, 3, 0]))
    assert windows.tolist() == [
        [0, 0, 2], [0, 2, 6], [0, 8, 6], [0, 14, 1],  # head before the offset, remainder
        [1, 0, 4],  # shorter than W: the whole clip, offset ignored
        [2, 0, 6], [2, 6, 6],  # offset 0: no head window
    ]


@pytest.mark.parametrize("window", [1, 4, 6, 9])
@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_every_keyframe_in_exactly_one_window_per_epoch(window, epoch):
    sampler = ClipWindowSampler(CLIPS, window=window, seed=3)
    windows = sampler.epoch_windows(epoch)
    for clip, start, length in windows:
        assert 1 <= length <= window
        assert 0 <= start and start + length <= CLIPS[clip], "a window crosses its clip's end"
    for counts in keyframe_coverage(CLIPS, windows):
        assert (counts == 1).all()
    assert len(windows) == len(set(windows))


def test_short_clips_give_one_whole_clip_window():
    sampler = ClipWindowSampler([3, 6, 1, 5], window=6)
    for epoch in range(5):
        assert sorted(sampler.epoch_windows(epoch)) == [
            WindowSpec(0, 0, 3), WindowSpec(1, 0, 6), WindowSpec(2, 0, 1), WindowSpec(3, 0, 5)
        ]


def test_window_boundaries_move_between_epochs():
    sampler = ClipWindowSampler([897] * 50, window=6, seed=11)
    offsets_per_epoch = []
    for epoch in range(6):
        full = [w for w in sampler.epoch_windows(epoch) if w.length == 6]
        offsets = {clip: start % 6 for clip, start, _ in full}
        offsets_per_epoch.append([offsets[c] for c in range(50)])
    phases = np.array(offsets_per_epoch)  # (epochs, clips)
    # every clip's boundaries move over 6 epochs, and all 6 phases occur
    assert all(len(set(phases[:, c])) > 1 for c in range(50))
    assert set(phases.ravel().tolist()) == set(range(6))


def test_shuffle_is_seeded_by_seed_plus_epoch():
    a = ClipWindowSampler(CLIPS, seed=5)
    b = ClipWindowSampler(CLIPS, seed=4)
    assert a.epoch_windows(0) == b.epoch_windows(1)  # 5 + 0 == 4 + 1
    assert a.epoch_windows(0) != a.epoch_windows(1)
    clip_order = [w.clip for w in a.epoch_windows(0)]
    assert clip_order != sorted(clip_order), "windows are not shuffled across clips"


# --- splitting across ranks ---------------------------------------------------------------


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("windows_per_step", [1, 3])
def test_equal_steps_and_padding(world_size, windows_per_step):
    kwargs = dict(window=6, windows_per_step=windows_per_step, seed=7)
    steps = all_rank_steps(CLIPS, world_size, epoch=2, **kwargs)
    sampler = ClipWindowSampler(CLIPS, world_size=world_size, **kwargs)
    sampler.set_epoch(2)
    shuffled = sampler.epoch_windows()
    per_step = world_size * windows_per_step
    expected_steps = -(-len(shuffled) // per_step)

    assert len(sampler) == sampler.steps_for_epoch(2) == expected_steps
    for rank_steps in steps:
        assert len(rank_steps) == expected_steps  # DDP needs the same count on every rank
        assert all(len(step) == windows_per_step for step in rank_steps)

    used = Counter(w for rank_steps in steps for step in rank_steps for w in step)
    assert set(used) == set(shuffled), "every window is used"
    repeated = sum(used.values()) - len(shuffled)
    assert repeated == expected_steps * per_step - len(shuffled) <= per_step - 1
    padding = Counter(shuffled[i % len(shuffled)] for i in range(repeated))
    assert used - Counter(shuffled) == padding, "padding repeats the start of the shuffled list"
    assert sampler.padded_windows(2) == repeated


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("windows_per_step", [1, 2])
def test_global_step_takes_consecutive_shuffled_windows(world_size, windows_per_step):
    steps = all_rank_steps(CLIPS, world_size, windows_per_step=windows_per_step, seed=1)
    shuffled = ClipWindowSampler(CLIPS, seed=1).epoch_windows(0)
    interleaved = [
        w for s in range(len(steps[0])) for rank in range(world_size) for w in steps[rank][s]
    ]
    assert interleaved == [shuffled[i % len(shuffled)] for i in range(len(interleaved))]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_each_keyframe_used_about_once(world_size):
    steps = all_rank_steps(CLIPS, world_size, windows_per_step=2, seed=9)
    windows = [w for rank_steps in steps for step in rank_steps for w in step]
    counts = np.concatenate(keyframe_coverage(CLIPS, windows))
    assert counts.min() == 1
    extra = int(counts.sum()) - sum(CLIPS)
    assert extra <= (2 * world_size - 1) * 6  # at most per_step - 1 repeated windows of <= W


def test_tiny_dataset_pads_by_cycling():
    steps = all_rank_steps([2], world_size=4, windows_per_step=2)
    assert [len(s) for s in steps] == [1, 1, 1, 1]
    assert all(step == [WindowSpec(0, 0, 2)] * 2 for rank_steps in steps for step in rank_steps)


def test_empty_dataset():
    sampler = ClipWindowSampler([0, 0])
    assert len(sampler) == 0 and list(sampler) == []


def test_deterministic_and_seed_dependent():
    a = all_rank_steps(CLIPS, 3, epoch=4, seed=2)
    assert a == all_rank_steps(CLIPS, 3, epoch=4, seed=2)
    assert a != all_rank_steps(CLIPS, 3, epoch=4, seed=3)
    assert a != all_rank_steps(CLIPS, 3, epoch=5, seed=2)


def test_steps_for_epoch_matches_len_without_changing_state():
    sampler = ClipWindowSampler([897] * 20 + [10] * 7, world_size=3, seed=4)
    planned = [sampler.steps_for_epoch(e) for e in range(6)]
    assert sampler.epoch == 0
    actual = []
    for epoch in range(6):
        sampler.set_epoch(epoch)
        actual.append(len(sampler))
        assert len(list(sampler)) == len(sampler)
    assert planned == actual


# --- resume -------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 3, 8])
def test_resume_mid_epoch_yields_exactly_the_remaining_steps(world_size):
    for rank in range(world_size):
        full = ClipWindowSampler(CLIPS, rank=rank, world_size=world_size, seed=6)
        full.set_epoch(3)
        reference = list(full)
        for stop in range(len(reference) + 1):
            first = ClipWindowSampler(CLIPS, rank=rank, world_size=world_size, seed=6)
            first.set_epoch(3)
            iterator = iter(first)
            consumed = [next(iterator) for _ in range(stop)]
            state = first.state_dict(stop)
            assert state == {"epoch": 3, "step": stop}

            resumed = ClipWindowSampler(CLIPS, rank=rank, world_size=world_size, seed=6)
            resumed.load_state_dict(state)
            resumed.set_epoch(3)  # the trainer's loop calls set_epoch for the resumed epoch
            assert len(resumed) == len(reference)
            assert consumed + list(resumed) == reference
            assert list(resumed) == reference, "only the first iteration resumes"


class _SpecDataset(torch.utils.data.Dataset):
    """A dataset indexed by WindowSpec that returns the spec itself."""

    def __getitem__(self, spec: WindowSpec) -> WindowSpec:
        return spec


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_resumed_dataloader_with_workers_starts_at_the_saved_step(workers):
    """A DataLoader with workers calls ``iter(batch_sampler)`` twice on its first iteration: the
    resume step must survive the first, unused iterator."""
    full = ClipWindowSampler(CLIPS, seed=6)
    full.set_epoch(2)
    reference = list(full)
    resumed = ClipWindowSampler(CLIPS, seed=6)
    resumed.load_state_dict({"epoch": 2, "step": 5})
    resumed.set_epoch(2)
    loader = DataLoader(_SpecDataset(), batch_sampler=resumed, collate_fn=list, num_workers=workers)
    assert list(loader) == reference[5:]


def test_resume_state_for_another_epoch_is_cleared_by_set_epoch():
    sampler = ClipWindowSampler(CLIPS, seed=0)
    sampler.load_state_dict({"epoch": 1, "step": 5})
    sampler.set_epoch(2)
    reference = ClipWindowSampler(CLIPS, seed=0)
    reference.set_epoch(2)
    assert list(sampler) == list(reference)


def test_state_dict_is_loadable_with_weights_only(tmp_path):
    sampler = ClipWindowSampler(CLIPS)
    torch.save(sampler.state_dict(0), tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True) == {"epoch": 0, "step": 0}


@pytest.mark.parametrize("state", [{"epoch": 1}, {"epoch": "x", "step": 0}, {"epoch": 0, "step": -1}])
def test_bad_state_is_rejected(state):
    with pytest.raises(ValueError, match="step|epoch"):
        ClipWindowSampler(CLIPS).load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs",
    [dict(window=0), dict(windows_per_step=0), dict(rank=2, world_size=2), dict(world_size=0)],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ClipWindowSampler(CLIPS, **kwargs)


def test_negative_clip_length_is_rejected():
    with pytest.raises(ValueError, match="clip 1"):
        ClipWindowSampler([3, -1])


def test_works_as_a_dataloader_batch_sampler():
    class Specs(torch.utils.data.Dataset):
        def __getitem__(self, spec: WindowSpec) -> torch.Tensor:
            return torch.tensor(spec)

        def __len__(self) -> int:
            return 0

    sampler = ClipWindowSampler(CLIPS, windows_per_step=3, world_size=2, rank=1)
    loader = DataLoader(Specs(), batch_sampler=sampler)
    batches = list(loader)
    assert len(loader) == len(sampler) == len(batches)
    assert [b.tolist() for b in batches] == [[list(w) for w in step] for step in sampler]


# --- inference windows --------------------------------------------------------------------

INFER_CLIPS = [0, 1, 2, 5, 6, 7, 12, 13, 897]


@pytest.mark.parametrize("window", [1, 2, 6, 8])
@pytest.mark.parametrize("context", [0, 2, 3])
def test_inference_windows_own_every_keyframe_once(window, context):
    plan = plan_inference_windows(INFER_CLIPS, window, context)
    owned = [np.zeros(n, dtype=np.int64) for n in INFER_CLIPS]
    for w in plan:
        clip, start, length = w.spec
        assert 0 <= start and start + length <= INFER_CLIPS[clip]
        assert 0 <= w.keep_start < w.keep_stop <= length
        assert w.keep_stop - w.keep_start <= window
        own = w.owned
        assert own.start - start == w.keep_start
        assert start == max(own.start - context, 0)  # context clipped at the clip's start
        assert start + length == min(own.stop + context, INFER_CLIPS[clip])  # ... and end
        owned[clip][own.start : own.stop] += 1
    assert all((counts == 1).all() for counts in owned)
    keys = [(w.spec.clip, w.owned.start) for w in plan]
    assert keys == sorted(keys), "plan is in store order"


def test_inference_window_fields():
    plan = plan_inference_windows([10], window=4, context=2)
    assert plan == [
        InferenceWindow(WindowSpec(0, 0, 6), 0, 4),
        InferenceWindow(WindowSpec(0, 2, 8), 2, 6),
        InferenceWindow(WindowSpec(0, 6, 4), 2, 4),
    ]


def two_hop_model(features: np.ndarray) -> np.ndarray:
    """Stand-in for two one-hop graph layers over a window: each layer mixes neighbours +/-1."""
    x = features
    for layer in range(2):
        padded = np.pad(x, 1)
        mask = np.pad(np.ones_like(x), 1)
        x = np.tanh(
            (1.3 + layer) * padded[:-2] * mask[:-2] + 0.7 * x + (0.4 - layer) * padded[2:] * mask[2:]
        )
    return x


@pytest.mark.parametrize("context,exact", [(2, True), (1, False)])
def test_context_two_makes_scores_independent_of_window_size(context, exact):
    rng = np.random.default_rng(0)
    clips = [1, 4, 30, 17]
    features = [rng.normal(size=n) for n in clips]
    reference = [two_hop_model(f) for f in features]  # the whole clip in one window
    for window in (1, 3, 6, 11):
        scores = [np.full(n, np.nan) for n in clips]
        for w in plan_inference_windows(clips, window, context):
            clip, start, length = w.spec
            out = two_hop_model(features[clip][start : start + length])
            scores[clip][w.owned.start : w.owned.stop] = out[w.keep_start : w.keep_stop]
        same = all(np.array_equal(s, r) for s, r in zip(scores, reference))
        assert same == exact or window >= max(clips)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("n", [0, 1, 5, 8, 13, 64])
def test_shard_for_rank_is_contiguous_balanced_and_exact(world_size, n):
    items = list(range(n))
    shards = [rank_slice(items, rank, world_size) for rank in range(world_size)]
    assert [x for shard in shards for x in shard] == items
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert shards == [rank_slice(items, rank, world_size) for rank in range(world_size)]


def test_shard_for_rank_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        rank_slice([1, 2], 2, 2)
