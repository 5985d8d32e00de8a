"""Algorithm 1 as a schedule: stage frequencies, what each update trains, learning rates, ablations."""

from __future__ import annotations

import pytest
import torch

from fourdfy.clock import Clock, LinearRamp, Scheduled
from fourdfy.hybrid import HybridSchedule, ScheduleConfig

N_DRAWS = 20_000


def _frequencies(schedule: HybridSchedule, iteration: int, seed: int = 0) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    counts = {"3d": 0, "img": 0, "vid": 0}
    for _ in range(N_DRAWS):
        counts[schedule.kind(iteration, gen)] += 1
    return {k: v / N_DRAWS for k, v in counts.items()}


# (config overrides, expected P per stage) — the probabilities written out by hand from the paper's
# Algorithm 1 with the authors' stage-3 split (3D 0.5, IMG 0.25, VID 0.25).
CASES = {
    "full": ({}, [(1, 0, 0), (0.5, 0.5, 0), (0.5, 0.25, 0.25)]),
    "no_3d": ({"p_3d": 0.0}, [(0, 1, 0), (0, 1, 0), (0, 0.5, 0.5)]),
    "no_vsd": ({"p_img": 0.0}, [(1, 0, 0), (1, 0, 0), (0.5, 0, 0.5)]),
    "no_hybrid": ({"stage3_video_only": True}, [(1, 0, 0), (0.5, 0.5, 0), (0, 0, 1)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_stage_frequencies_match_probabilities(name):
    overrides, expected = CASES[name]
    schedule = HybridSchedule(ScheduleConfig(stage_lengths=[10, 10, 10], **overrides))
    for stage, iteration in zip((1, 2, 3), (0, 10, 20), strict=True):
        freq = _frequencies(schedule, iteration, seed=stage)
        for kind, p in zip(("3d", "img", "vid"), expected[stage - 1], strict=True):
            assert abs(freq[kind] - p) < 0.01, (name, stage, kind, freq)


def test_no_image_guidance_is_video_only_for_the_same_length():
    cfg = ScheduleConfig(stage_lengths=[10, 20, 30], p_3d=0.0, p_img=0.0, skip_stages_1_2=True)
    schedule = HybridSchedule(cfg)
    assert schedule.total_iterations == 60
    assert [schedule.stage(i) for i in (0, 59)] == [3, 3]
    assert _frequencies(schedule, 0)["vid"] == 1.0


def test_only_video_updates_train_the_dynamic_grid():
    assert HybridSchedule.trainable("vid") == {"static": True, "dynamic": True, "heads": True}
    for kind in ("3d", "img"):
        assert HybridSchedule.trainable(kind) == {"static": True, "dynamic": False, "heads": True}
    with pytest.raises(ValueError, match="audio"):
        HybridSchedule.trainable("audio")


def test_static_learning_rate_drops_in_stage_3():
    schedule = HybridSchedule(ScheduleConfig(stage_lengths=[5, 5, 5]))
    assert schedule.lr(9) == {"static": 0.01, "dynamic": 0.01, "heads": 1e-3}
    assert schedule.lr(10)["static"] == 1e-4
    assert schedule.stage(4) == 1 and schedule.stage(5) == 2 and schedule.stage(10) == 3
    with pytest.raises(ValueError, match="past the schedule"):
        schedule.stage(15)


def test_blob_std_anneals_linearly_in_stage_3_only():
    schedule = HybridSchedule(ScheduleConfig(stage_lengths=[5, 5, 100], blob_anneal_steps=50))
    ramp = schedule.blob_std_ramp(0.5)
    assert ramp.at(0) == ramp.at(10) == 0.5  # iteration 10 is stage 3's first: still the start value
    assert ramp.at(35) == pytest.approx(0.5 + 25 / 50 * 4.5)
    assert ramp.at(60) == ramp.at(90) == 5.0
    assert HybridSchedule(ScheduleConfig(stage_lengths=[5, 5, 100], blob_anneal_steps=0)).blob_std_ramp(0.5).at(11) \
        == 5.0


def test_a_scheduled_quantity_follows_the_clock():
    clock = Clock()
    blob = Scheduled(LinearRamp(start_value=1.0, end_value=3.0, start_iteration=4, n_steps=4), clock)
    values = []
    for it in (0, 4, 5, 6, 8, 100):
        clock.iteration = it
        values.append(blob.value())
    assert values == [1.0, 1.0, 1.5, 2.0, 3.0, 3.0]


@pytest.mark.parametrize(("overrides", "used"), [
    ({}, {"3d", "img", "vid"}),
    ({"p_img": 0.0}, {"3d", "vid"}),
    ({"stage_lengths": [5, 5, 0]}, {"3d", "img"}),
    ({"p_3d": 0.0, "p_img": 0.0, "skip_stages_1_2": True}, {"vid"}),
    ({"stage3_video_only": True, "stage_lengths": [0, 0, 5]}, {"vid"}),
])
def test_kinds_used_are_the_kinds_drawn_in_some_stage(overrides, used):
    assert HybridSchedule(ScheduleConfig(**{"stage_lengths": [5, 5, 5], **overrides})).kinds_used() == used


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"p_3d": 1.5}, "schedule.p_3d"),
        ({"p_img": -0.1}, "schedule.p_img"),
        ({"stage_lengths": [10, -1, 10]}, "schedule.stage_lengths"),
        ({"stage_lengths": [10, 10]}, "schedule.stage_lengths"),
        ({"p_3d": 0.0, "p_img": 0.0}, "schedule.p_3d"),
        ({"lr_static": -1.0}, "schedule.lr_static"),
    ],
)
def test_bad_schedules_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        HybridSchedule(ScheduleConfig(**overrides))
