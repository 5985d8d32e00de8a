"""Algorithm 1 as a schedule: stage frequencies, what each update trains, learning rates, ablations."""

from __future__ import annotations

import pytest
import torch

from fourdfy.clock import Clock, LinearRamp, Moment, Scheduled, Stages, StageSchedule
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


def test_no_image_guidance_is_stage_3_alone_for_stage_3s_length():
    # Issue #15 row 11 / paper §4.3: "skips the first two stages": stage 3's recipe, stage 3's length, on
    # stage 3's own clock (its first iteration is stage-local step 0).
    cfg = ScheduleConfig(stage_lengths=[10, 20, 30], p_3d=0.0, p_img=0.0, skip_stages_1_2=True)
    schedule = HybridSchedule(cfg)
    assert schedule.total_iterations == 30
    assert [schedule.stage(i) for i in (0, 29)] == [3, 3]
    assert schedule.moment(7) == Moment(7, 3, 7)
    assert schedule.lr(schedule.stage(0))["static"] == cfg.lr_static_stage3
    assert _frequencies(schedule, 0)["vid"] == 1.0
    with pytest.raises(ValueError, match=r"schedule.skip_stages_1_2 .*stage_lengths\[2\] is 0"):
        ScheduleConfig(stage_lengths=[10, 20, 0], p_3d=0.0, p_img=0.0, skip_stages_1_2=True).validate()


def test_only_video_updates_train_the_dynamic_grid():
    schedule = HybridSchedule(ScheduleConfig())
    for stage in (1, 2, 3):
        assert schedule.trainable("vid", stage) == {"static": True, "dynamic": True, "heads": True}
        for kind in ("3d", "img"):
            assert schedule.trainable(kind, stage) == {"static": True, "dynamic": False, "heads": True}
    with pytest.raises(ValueError, match="audio"):
        schedule.trainable("audio", 1)


def test_freeze_static_modules_trains_only_the_dynamic_part_in_stage_3_on_every_kind():
    # threestudio/systems/fourdfy.py: on_fit_start freezes everything, set_temp_param_grad(True) in both branches.
    schedule = HybridSchedule(ScheduleConfig(freeze_static_modules=True))
    for kind in ("3d", "img", "vid"):
        assert schedule.trainable(kind, 3) == {"static": False, "dynamic": True, "heads": False}
    assert schedule.trainable("3d", 2) == {"static": True, "dynamic": False, "heads": True}


def test_static_learning_rate_drops_in_stage_3():
    schedule = HybridSchedule(ScheduleConfig(stage_lengths=[5, 5, 5]))
    assert schedule.lr(schedule.stage(9)) == {"static": 0.01, "dynamic": 0.01, "heads": 1e-3}
    assert schedule.lr(schedule.stage(10))["static"] == 1e-4
    assert schedule.stage(4) == 1 and schedule.stage(5) == 2 and schedule.stage(10) == 3
    with pytest.raises(ValueError, match="past the schedule"):
        schedule.stage(15)


def test_blob_std_anneals_linearly_in_stage_3_only():
    schedule = HybridSchedule(ScheduleConfig(stage_lengths=[5, 5, 100], blob_anneal_steps=50))
    blob = schedule.blob_std_schedule(0.5)
    at = lambda it: blob.at(schedule.moment(it))  # noqa: E731
    assert at(0) == at(10) == 0.5  # iteration 10 is stage 3's first: still the start value
    assert at(35) == pytest.approx(0.5 + 25 / 50 * 4.5)
    assert at(60) == at(90) == 5.0
    zero = HybridSchedule(ScheduleConfig(stage_lengths=[5, 5, 100], blob_anneal_steps=0))
    assert zero.blob_std_schedule(0.5).at(zero.moment(11)) == 5.0


def test_a_scheduled_quantity_follows_the_clock():
    clock = Clock(Stages([3, 0, 200]))
    ramp = LinearRamp(start_value=1.0, end_value=3.0, start_iteration=4, n_steps=4)
    blob = Scheduled(StageSchedule((LinearRamp.constant(-1.0), LinearRamp.constant(-2.0), ramp)), clock)
    values = []
    for it in (0, 2, 3, 7, 8, 9, 11, 103):  # stage 3 starts at 3: its steps are it - 3
        clock.iteration = it
        values.append(blob.value())
    assert values == [-1.0, -1.0, 1.0, 1.0, 1.5, 2.0, 3.0, 3.0]


@pytest.mark.parametrize(("spec", "stage", "step", "value"), [
    (10.0, 1, 0, 10.0),
    ([10000, 0.0, 1000.0, 10001], 2, 10000, 0.0),  # threestudio C(): start_value up to start_step
    ([10000, 0.0, 1000.0, 10001], 2, 10001, 1000.0),
    ([10000, 0.0, 1000.0, 10001], 3, 10001, 1000.0),
    ([[0, 0.98, 0.02, 8000], 0.02, 0.02], 1, 4000, 0.98 + 0.5 * (0.02 - 0.98)),
    ([[0, 0.98, 0.02, 8000], 0.02, 0.02], 1, 9000, 0.02),
    ([[0, 0.98, 0.02, 8000], 0.02, 0.02], 2, 0, 0.02),
    ([0.0, 200.0, 200.0], 1, 5, 0.0),
    ([0.0, 200.0, 200.0], 2, 0, 200.0),
])
def test_stage_schedules_read_the_stage_local_step(spec, stage, step, value):
    assert StageSchedule.parse(spec, "k").at(Moment(123456, stage, step)) == pytest.approx(value, rel=1e-15)


@pytest.mark.parametrize("spec", ["x", [1, 2], [[1, 2], 3, 4], [5, 0.0, 1.0, 5], [0.5, 0, 1, 2.5]])
def test_bad_stage_schedules_name_the_key(spec):
    with pytest.raises(ValueError, match="trainer.lambda_x"):
        StageSchedule.parse(spec, "trainer.lambda_x")


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
