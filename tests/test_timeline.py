"""fourdfy.timeline against values transcribed by hand from the authors' three stage configs (issue #15).

Sources (github.com/sherwinbahmani/4dfy, HEAD), file:line of each number:
  S1 = configs/fourdfy_stage_1.yaml, S2 = configs/fourdfy_stage_2.yaml, S3 = configs/fourdfy_stage_3.yaml
  lengths: S1:162 max_steps 10000, S2:164 25000, S3:186 100000 -> stage starts 0, 10000, 35000 (global)
  3d.render_size: S1:30 width [64, 256], S1:32 resolution_milestones [5000]; S2:30, S2:32 same; S3:39 [256, 256]
  3d.n_views: S1:27 batch_size [8,4]; S2:27 [4,4]; S3:37 [4,4]
  3d.t_min: S1:114 [0, 0.98, 0.02, 8000]; S2:114 [0, 0.02, 0.02, 8000]; S3:134 same
  3d.t_max: S1:115 [0, 0.98, 0.50, 8000]; S2:115 [0, 0.50, 0.50, 8000]; S3:135 [0, 0.5, 0.5, 8000]
  img.render_size: S2:11 single_view width [256, 256]; img.t_min S2:104 0.02;
  img.t_max: S2:105 0.98, S2:106 max_step_percent_annealed 0.5 after S2:107 anneal_start_step 5000
             (threestudio stable_diffusion_vsd_guidance.py: `global_step > anneal_start_step`); S3:125 0.5
  vid.render_size: S3:29 height_vid 160 (S3:28 width_vid 288); vid.n_views S3:25 num_frames 16
  p.3d: S1:8 prob_multi_view 1.0; S2:8 0.5; S3:8 0.5; p.img / p.vid in stage 3: S3:27 prob_single_view_video 0.5
        of the non-3D half (0.25 each)
  loss.sparsity: S1:141, S2:141, S3:161 lambda_sparsity 10.
  loss.opacity_entropy: S1:142, S2:142, S3:162 lambda_opaque [10000, 0.0, 1000.0, 10001] (stage-local step)
  loss.video: S3:157 lambda_sds_video 0.1
  lr.static: S2:153 geometry.encoding 0.01 (S1:153 likewise); S3:173 encoding.encoding 0.0001
  lr.dynamic: S3:175 encoding_time 0.01;  lr.heads: S2:155/157, S3:177/179 0.001
  blob_std: S2:58 density_blob_std 0.5; S3:84 max_anneal_step 50000, S3:86 end_val 5.0 (from stage-3 step 0)
  time.static: S1:22, S2:22 static: true -> time 0; S3:24 static: false -> frame times (absent)
"""

from __future__ import annotations

import json

import pytest

from fourdfy.config import compose_run_config
from fourdfy.timeline import Timeline, main

# (global iteration, stage, stage step, {name: value}) — every value from the table above, not from our code.
EXPECTED = [
    (0, 1, 0, {"3d.render_size": 64, "3d.n_views": 8, "3d.t_min": 0.98, "3d.t_max": 0.98, "p.3d": 1.0,
               "p.img": 0.0, "p.vid": 0.0, "loss.sparsity": 10.0, "loss.opacity_entropy": 0.0, "lr.static": 0.01,
               "lr.heads": 0.001, "blob_std": 0.5, "time.static": 0.0, "optimizer.reset": 0.0}),
    (4000, 1, 4000, {"3d.t_min": 0.98 + 0.5 * (0.02 - 0.98), "3d.t_max": 0.98 + 0.5 * (0.5 - 0.98)}),
    (4999, 1, 4999, {"3d.render_size": 64, "3d.n_views": 8}),
    (5000, 1, 5000, {"3d.render_size": 256, "3d.n_views": 4}),
    (8000, 1, 8000, {"3d.t_min": 0.02, "3d.t_max": 0.5}),
    (9999, 1, 9999, {"loss.opacity_entropy": 0.0}),  # stage 1 never reaches step 10001
    (10000, 2, 0, {"3d.render_size": 64, "3d.n_views": 4, "3d.t_min": 0.02, "3d.t_max": 0.5, "p.3d": 0.5,
                   "p.img": 0.5, "img.render_size": 256, "img.t_min": 0.02, "img.t_max": 0.98,
                   "loss.opacity_entropy": 0.0, "optimizer.reset": 1.0, "time.static": 0.0}),
    (14999, 2, 4999, {"3d.render_size": 64}),
    (15000, 2, 5000, {"3d.render_size": 256, "img.t_max": 0.98}),
    (15001, 2, 5001, {"img.t_max": 0.5}),
    (20000, 2, 10000, {"loss.opacity_entropy": 0.0}),
    (20001, 2, 10001, {"loss.opacity_entropy": 1000.0}),
    (35000, 3, 0, {"3d.render_size": 256, "3d.n_views": 4, "p.3d": 0.5, "p.img": 0.25, "p.vid": 0.25,
                   "vid.render_size": 160, "vid.render_width": 288, "vid.n_views": 16, "loss.video": 0.1,
                   "loss.opacity_entropy": 0.0, "lr.static": 0.0001, "lr.dynamic": 0.01, "lr.heads": 0.001,
                   "blob_std": 0.5, "optimizer.reset": 1.0, "img.t_max": 0.5}),
    (45000, 3, 10000, {"loss.opacity_entropy": 0.0}),
    (45001, 3, 10001, {"loss.opacity_entropy": 1000.0}),
    (60000, 3, 25000, {"blob_std": 0.5 + 0.5 * (5.0 - 0.5)}),
    (85000, 3, 50000, {"blob_std": 5.0}),
    (134999, 3, 99999, {"blob_std": 5.0, "loss.opacity_entropy": 1000.0}),
]


@pytest.fixture(scope="module")
def paper_rows() -> dict[int, dict]:
    rows = Timeline(compose_run_config(["preset=paper"])).rows([e[0] for e in EXPECTED])
    return {r["iteration"]: r for r in rows}


@pytest.mark.parametrize(("iteration", "stage", "stage_step", "values"), EXPECTED, ids=[str(e[0]) for e in EXPECTED])
def test_paper_timeline_matches_the_authors_stage_files(paper_rows, iteration, stage, stage_step, values):
    row = paper_rows[iteration]
    assert (row["stage"], row["stage_step"]) == (stage, stage_step)
    for name, expected in values.items():
        assert row["values"][name] == pytest.approx(expected, rel=1e-12), name


def test_stage_3_renders_frame_times(paper_rows):
    assert "time.static" not in paper_rows[35000]["values"]  # S3:24 static: false


def test_key_iterations_include_boundaries_and_milestones_plus_minus_one():
    timeline = Timeline(compose_run_config(["preset=paper"]))
    its = set(timeline.key_iterations([123]))
    assert {0, 9999, 10000, 34999, 35000, 134999, 123} <= its
    assert {4999, 5000, 5001, 7999, 8000, 8001} <= its  # stage-1 render size and t-range milestones
    assert {14999, 15000, 15001, 15002, 20000, 20001, 20002} <= its  # stage-2 size, VSD anneal, entropy
    assert {45000, 45001, 84999, 85000, 85001} <= its  # stage-3 entropy and end of blob annealing


def test_cli_json_lists_the_required_names(capsys):
    assert main(["preset=paper", "--at", "17000", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["iteration"] for r in rows] == sorted(r["iteration"] for r in rows)
    at = next(r for r in rows if r["iteration"] == 17000)
    assert (at["stage"], at["stage_step"]) == (2, 7000)
    required = {"loss.sparsity", "loss.opacity_entropy", "loss.video", "3d.render_size", "3d.n_views", "3d.t_min",
                "3d.t_max", "img.render_size", "vid.render_size", "p.3d", "p.img", "p.vid", "lr.static",
                "lr.dynamic", "lr.heads", "blob_std"}
    assert required <= set(at["values"])


def test_cli_table_and_bad_iterations(capsys):
    assert main(["preset=demo_cpu"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["iteration", "0", "399"]
    with pytest.raises(SystemExit):
        main(["preset=demo_cpu", "--at", "5000"])  # past the 1200-iteration demo
    assert "--at iterations must be in [0, 1200)" in capsys.readouterr().err


def test_no_image_guidance_timeline_is_stage_3_alone():
    rows = Timeline(compose_run_config(["preset=paper", "variant=no_image_guidance"])).rows([0, 10001, 99999])
    assert [(r["stage"], r["stage_step"]) for r in rows] == [(3, 0), (3, 10001), (3, 99999)]
    assert rows[0]["values"]["p.vid"] == 1.0 and rows[0]["values"]["lr.static"] == 0.0001
    assert rows[1]["values"]["loss.opacity_entropy"] == 1000.0


def test_videocrafter2_t_range_anneals_on_stage_3s_own_clock():
    # configs/fourdfy_stage_3_vc.yaml guidance_video.max_step_percent [0, 0.98, 0.5, 5000]; height_vid 80, width 128.
    rows = Timeline(compose_run_config(["preset=paper_vc"])).rows([35000, 36000, 40000])
    assert [r["values"]["vid.t_max"] for r in rows] == pytest.approx([0.98, 0.98 + 0.2 * (0.5 - 0.98), 0.5])
    assert (rows[0]["values"]["vid.render_size"], rows[0]["values"]["vid.render_width"]) == (80, 128)
