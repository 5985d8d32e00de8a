"""User study: site building, answer storage and validation, export, analysis, load."""

from __future__ import annotations

import csv
import http.client
import http.cookiejar
import io
import json
import random
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as sps

from userstudy import CRITERION_KEYS, CSV_COLUMNS
from userstudy.analyze import main as analyze_main
from userstudy.analyze import preference_table, table2_shares
from userstudy.build import build_site, load_side, normalise_prompt
from userstudy.build import main as build_main
from userstudy.server import StudyConfig, create_app, make_study_server

TOKEN = "s3cret-token"


def write_video(path: Path, seed: int, frames: int = 4, size: int = 16) -> None:
    """A tiny distinct mp4 (content differs per seed, so content-hash names differ)."""
    import imageio.v2 as iio

    rng = np.random.default_rng(seed)
    data = rng.integers(0, 255, size=(frames, size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.mimwrite(path, data, fps=4, macro_block_size=16)


def write_fake_video(path: Path, tag: str) -> None:
    """Distinct bytes named .mp4: enough where only copying and pairing are tested (fast)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(f"not a real mp4: {tag}".encode())


def write_run(root: Path, name: str, prompt: str, variant: str, seed: int, done: bool = True) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    # Hydra's own copy must not be taken for a run directory.
    decoy = {"prompt": "decoy", "variant": {"name": "x"}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(decoy))
    cfg = {"prompt": prompt, "seed": 0, "variant": {"name": variant}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    write_video(run / "renders" / "orbit.mp4", seed)
    if done:
        (run / "DONE").write_text("")
    return run


HTML_PROMPT = 'a cat <b>bold</b> & "dog"'


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    ours = root / "runs"
    write_run(ours, "r0", "A panda dancing.", "full", 1)
    write_run(ours, "r1", "A goat drinking beer.", "full", 2)
    write_run(ours, "r2", HTML_PROMPT, "full", 3)
    write_run(ours, "r3", "A space shuttle launching.", "full", 4, done=False)
    write_run(ours, "r4", "A bear driving a car.", "full", 5)
    mav3d = root / "mav3d"
    write_video(mav3d / "a_panda_dancing.mp4", 11)
    write_video(mav3d / "A_goat_drinking_beer.mp4", 12)
    # Not the run's prompt: "</b>" cannot be part of a file name.
    write_video(mav3d / 'a_cat_<b>bold<b>_&_"dog".mp4', 99)
    write_video(mav3d / "a_cat_<b>bold</b>_&_dog.mp4".replace("/", ""), 98)
    write_video(mav3d / "a_corgi_playing_with_a_ball.mp4", 14)
    # A second baseline as runs whose prompt text lacks the trailing period.
    abl = root / "ablation"
    write_run(abl, "a0", "a panda dancing", "no_vsd", 21)
    write_run(abl, "a1", HTML_PROMPT, "no_vsd", 23)
    return {"root": root, "ours": ours, "mav3d": mav3d, "ablation": abl}


@pytest.fixture(scope="module")
def site(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("site") / "site"
    ours = load_side(sources["ours"])
    manifest = build_site(ours, [load_side(sources["mav3d"]), load_side(sources["ablation"])], out, seed=7)
    return {"out": out, "manifest": manifest}


def test_normalise_prompt() -> None:
    assert normalise_prompt("A panda dancing.") == normalise_prompt("a  panda dancing") == "a panda dancing"
    assert normalise_prompt("a panda dancing .") == "a panda dancing"
    assert normalise_prompt("a panda dancing") != normalise_prompt("a panda")


def test_load_side_runs_and_videos(sources: dict[str, Path]) -> None:
    ours = load_side(sources["ours"])
    assert ours.kind == "runs" and ours.name == "full"
    assert sorted(v.prompt for v in ours.videos.values()) == sorted(
        ["A panda dancing.", "A goat drinking beer.", HTML_PROMPT, "A bear driving a car."])
    assert len(ours.skipped) == 1 and "r3" in ours.skipped[0] and "DONE" in ours.skipped[0]
    mav3d = load_side(sources["mav3d"], name="mav3d")
    assert mav3d.kind == "videos" and "a panda dancing" in mav3d.videos
    assert mav3d.videos["a goat drinking beer"].prompt == "A goat drinking beer"


def test_build_pairs_by_prompt_and_reports_unpaired(site: dict, sources: dict[str, Path]) -> None:
    manifest, out = site["manifest"], site["out"]
    comps = manifest["comparisons"]
    # full vs mav3d: panda, goat (the cat files differ from the run's prompt); full vs no_vsd: panda, cat.
    pairs = sorted((c["prompt"], tuple(sorted((c["left"]["method"], c["right"]["method"]))))
                   for c in comps.values())
    assert pairs == sorted([
        ("A panda dancing.", ("full", "mav3d")), ("A goat drinking beer.", ("full", "mav3d")),
        ("A panda dancing.", ("full", "no_vsd")), (HTML_PROMPT, ("full", "no_vsd")),
    ])
    un = manifest["unpaired"]["mav3d"]
    assert sorted(un["only_full"]) == ["A bear driving a car.", HTML_PROMPT]
    assert sorted(un["only_mav3d"]) == sorted(
        ['a cat <b>bold<b> & "dog"', "a cat <b>bold<b> & dog", "a corgi playing with a ball"])
    assert manifest["unpaired"]["no_vsd"] == {"only_full": ["A bear driving a car.", "A goat drinking beer."],
                                              "only_no_vsd": []}
    assert any("r3" in s for s in manifest["skipped_runs"]["full"])
    assert manifest["seed"] == 7
    # Videos are byte copies of the right sources, under names that do not reveal the method.
    for comp in comps.values():
        for side in ("left", "right"):
            src = Path(comp[side]["source"])
            src = src / "renders" / "orbit.mp4" if src.is_dir() else src
            copied = out / comp[side]["video"]
            assert copied.read_bytes() == src.read_bytes()
            assert comp[side]["method"] not in copied.name
    assert (out / "manifest.json").is_file() and json.loads((out / "manifest.json").read_text()) == manifest


def test_pages_escape_prompts_and_carry_the_questions(site: dict) -> None:
    out, comps = site["out"], site["manifest"]["comparisons"]
    index = (out / "index.html").read_text()
    assert "consent" in index and "Appearance Quality" in index and "Text Alignment" in index
    for n, (cid, comp) in enumerate(comps.items(), start=1):
        html = (out / comp["page"]).read_text()
        assert f'data-comparison-id="{cid}"' in html
        assert f"Comparison {n} of {len(comps)}" in html
        assert html.count("<video") == 2
        for attr in ("autoplay", "muted", "loop", "playsinline"):
            assert html.count(f" {attr}") >= 2, attr
        assert f'src="{comp["left"]["video"]}"' in html and f'src="{comp["right"]["video"]}"' in html
        assert html.index(comp["left"]["video"]) < html.index(comp["right"]["video"])
        for key in CRITERION_KEYS:
            assert f'name="{key}" value="left"' in html and f'name="{key}" value="right"' in html
        if comp["prompt"] == HTML_PROMPT:
            assert "<b>bold</b>" not in html
            assert "a cat &lt;b&gt;bold&lt;/b&gt; &amp; &#34;dog&#34;" in html
    assert (out / "static" / "study.js").is_file() and (out / "static" / "style.css").is_file()


def test_seed_fixes_order_and_sides(sources: dict[str, Path], tmp_path: Path) -> None:
    many = tmp_path / "many_ours"
    base = tmp_path / "many_base"
    for i in range(40):
        write_fake_video(many / f"prompt_{i}.mp4", f"a{i}")
        write_fake_video(base / f"Prompt_{i}.mp4", f"b{i}")

    def layout(seed: int, out: Path) -> list[tuple[str, str]]:
        m = build_site(load_side(many, "a"), [load_side(base, "b")], out, seed=seed)
        return [(c["prompt"], c["left"]["method"]) for c in m["comparisons"].values()]

    first = layout(3, tmp_path / "s1")
    assert first == layout(3, tmp_path / "s2")
    assert first != layout(4, tmp_path / "s3")
    lefts = [left for _, left in first]
    assert 0 < lefts.count("a") < 40  # both placements occur (all-one-side has probability 2^-39)
    assert [p for p, _ in first] != sorted(p for p, _ in first)  # order shuffled


def test_build_errors(sources: dict[str, Path], tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    write_run(mixed, "m0", "a", "full", 1)
    write_run(mixed, "m1", "b", "no_vsd", 2)
    with pytest.raises(ValueError, match="mixes variants"):
        load_side(mixed)
    assert len(load_side(mixed, variant="no_vsd").videos) == 1
    dup = tmp_path / "dup"
    write_run(dup, "d0", "A panda dancing.", "full", 1)
    write_run(dup, "d1", "a panda dancing", "full", 2)
    with pytest.raises(ValueError, match="two videos for prompt"):
        load_side(dup)
    ours = load_side(sources["ours"])
    with pytest.raises(ValueError, match="names must differ"):
        build_site(ours, [load_side(sources["mav3d"], name="full")], tmp_path / "x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        build_site(ours, [load_side(sources["mav3d"])], busy)
    with pytest.raises(ValueError, match="no site was built there"):
        build_site(ours, [load_side(sources["mav3d"])], busy, overwrite=True)
    assert (busy / "keep.txt").is_file()


def test_build_cli_reports_unpaired(sources: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc = build_main(["--ours", str(sources["ours"]), "--baseline", str(sources["mav3d"]), "--out",
                     str(tmp_path / "cli"), "--seed", "5", "--ours-name", "4dfy", "--baseline-name", "MAV3D"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "wrote 2 comparisons" in out
    assert "unpaired vs MAV3D: 2 prompt(s) only_4dfy" in out and "a corgi playing with a ball" in out
    assert "skipped run of 4dfy" in out
    rc = build_main(["--ours", str(sources["ours"]), "--baseline", str(sources["root"] / "nope"),
                     "--out", str(tmp_path / "cli2")])
    assert rc == 2 and "is not a folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Server (Flask test client)


@pytest.fixture()
def app_env(site: dict, tmp_path: Path) -> dict:
    db = tmp_path / "answers.sqlite"
    app = create_app(StudyConfig(site=site["out"], db=db, export_token=TOKEN, secret_key="test-key"))
    return {"app": app, "db": db, "manifest": site["manifest"], "out": site["out"]}


def rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT rater_id, comparison_id, criterion, choice, created_at, updated_at "
                            "FROM answers ORDER BY rater_id, comparison_id, criterion").fetchall()


def answers_for(choices: str) -> dict[str, str]:
    """'LRLRL' -> {AQ: left, SQ: right, ...} in CRITERION_KEYS order."""
    return {k: {"L": "left", "R": "right"}[c] for k, c in zip(CRITERION_KEYS, choices, strict=True)}


def test_submit_stores_one_row_per_criterion_and_resubmission_replaces(app_env: dict) -> None:
    client = app_env["app"].test_client()
    cid = next(iter(app_env["manifest"]["comparisons"]))
    r = client.post("/api/session", json={"rater_id": "rater_1"})
    assert r.status_code == 200 and r.get_json() == {"rater_id": "rater_1"}
    r = client.post("/api/answers", json={"rater_id": "rater_1", "comparison_id": cid,
                                          "answers": answers_for("LLRRL")})
    assert r.status_code == 200, r.get_json()
    first = rows(app_env["db"])
    assert [(a, b, c, d) for a, b, c, d, _, _ in first] == sorted(
        ("rater_1", cid, k, v) for k, v in answers_for("LLRRL").items())
    with sqlite3.connect(app_env["db"]) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    time.sleep(0.01)
    r = client.post("/api/answers", json={"rater_id": "rater_1", "comparison_id": cid,
                                          "answers": answers_for("RRRRR")})
    assert r.status_code == 200
    second = rows(app_env["db"])
    assert len(second) == 5 and {row[3] for row in second} == {"right"}
    for before, after in zip(first, second, strict=True):
        assert after[4] == before[4]  # created_at kept
        assert after[5] > before[5]  # updated_at moved


BAD_BODIES = [
    ("{not json", "malformed JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"rater_id": "r", "answers": {}}), "missing field(s): comparison_id"),
    (json.dumps({"rater_id": "r", "comparison_id": "c999", "answers": {}}), "unknown comparison_id"),
    (json.dumps({"rater_id": "r", "comparison_id": "C1", "answers": {"AQ": "left"}}), "missing criteria: SQ"),
    (json.dumps({"rater_id": "r", "comparison_id": "C1",
                 "answers": {**{k: "left" for k in CRITERION_KEYS}, "MQ": "both"}}), "must be one of"),
    (json.dumps({"rater_id": "r", "comparison_id": "C1",
                 "answers": {**{k: "left" for k in CRITERION_KEYS}, "XX": "left"}}), "unknown criteria: XX"),
    (json.dumps({"rater_id": "../r", "comparison_id": "C1",
                 "answers": {k: "left" for k in CRITERION_KEYS}}), "rater_id must be"),
    (json.dumps({"rater_id": "r", "comparison_id": "C1", "answers": ["left"] * 5}),
     "answers must be an object"),
    (json.dumps({"rater_id": "r\n", "comparison_id": "C1",  # `$` used to accept a trailing newline
                 "answers": {k: "left" for k in CRITERION_KEYS}}), "rater_id must be"),
    ('{"rater_id": "r", "comparison_id": ' + "9" * 5000 + "}", "malformed JSON"),  # int-digit limit: was 500
    ("[" * 5000 + "]" * 5000, "malformed JSON"),  # nesting past the parser's stack: was 500
]


@pytest.mark.parametrize("body,message", BAD_BODIES)
def test_invalid_submissions_are_400_and_store_nothing(app_env: dict, body: str, message: str) -> None:
    client = app_env["app"].test_client()
    cid = next(iter(app_env["manifest"]["comparisons"]))
    assert client.post("/api/session", json={"rater_id": "r"}).status_code == 200
    r = client.post("/api/answers", data=body.replace('"C1"', json.dumps(cid)),
                    content_type="application/json")
    assert r.status_code == 400
    assert message in r.get_json()["error"]
    assert rows(app_env["db"]) == []


def test_oversized_body_is_rejected(app_env: dict) -> None:
    client = app_env["app"].test_client()
    client.post("/api/session", json={"rater_id": "r"})
    r = client.post("/api/answers", data="x" * 100_000, content_type="application/json")
    assert r.status_code == 413 and "larger than" in r.get_json()["error"]
    assert rows(app_env["db"]) == []


def test_session_binds_one_rater(app_env: dict) -> None:
    client = app_env["app"].test_client()
    cid = next(iter(app_env["manifest"]["comparisons"]))
    body = {"rater_id": "alice", "comparison_id": cid, "answers": answers_for("LLLLL")}
    r = client.post("/api/answers", json=body)
    assert r.status_code == 403 and "consent" in r.get_json()["error"]  # no consent yet
    assert client.post("/api/session", json={"rater_id": "alice"}).status_code == 200
    assert client.post("/api/session", json={"rater_id": "bob"}).status_code == 409
    assert client.post("/api/session", json={}).get_json() == {"rater_id": "alice"}
    r = client.post("/api/answers", json={**body, "rater_id": "bob"})
    assert r.status_code == 409 and "alice" in r.get_json()["error"]
    assert client.post("/api/answers", json=body).status_code == 200
    assert {row[0] for row in rows(app_env["db"])} == {"alice"}
    # A fresh browser gets a random id when none is given.
    other = app_env["app"].test_client()
    rid = other.post("/api/session").get_json()["rater_id"]
    assert len(rid) == 32 and rid != "alice"


def test_a_failing_write_leaves_no_partial_comparison(app_env: dict) -> None:
    # A trigger makes the 4th row's INSERT fail; the three rows before it must be rolled back.
    client = app_env["app"].test_client()
    with sqlite3.connect(app_env["db"]) as conn:
        conn.execute("CREATE TRIGGER boom BEFORE INSERT ON answers WHEN NEW.criterion = 'TA' "
                     "BEGIN SELECT RAISE(ABORT, 'boom'); END")
    cid = next(iter(app_env["manifest"]["comparisons"]))
    client.post("/api/session", json={"rater_id": "carol"})
    r = client.post("/api/answers", json={"rater_id": "carol", "comparison_id": cid,
                                          "answers": answers_for("LRLRL")})
    assert r.status_code == 500
    assert rows(app_env["db"]) == []


TRAVERSALS = ["/../secret.txt", "/%2e%2e/secret.txt", "/..%2fsecret.txt", "/videos/..%2f..%2fsecret.txt",
              "/static/../../secret.txt", "/%2Fetc%2Fpasswd", "//etc/passwd", "/manifest.json",
              "/..%5csecret.txt"]


def test_files_come_only_from_the_site(app_env: dict) -> None:
    out: Path = app_env["out"]
    (out.parent / "secret.txt").write_text("TOP-SECRET")
    client = app_env["app"].test_client()
    assert client.get("/").status_code == 200
    comp = next(iter(app_env["manifest"]["comparisons"].values()))
    r = client.get("/" + comp["page"])
    assert r.status_code == 200 and b"comparison-form" in r.data
    r = client.get("/" + comp["left"]["video"])
    assert r.status_code == 200 and r.data == (out / comp["left"]["video"]).read_bytes()
    for path in TRAVERSALS:
        r = client.get(path)
        assert r.status_code in (400, 404), path
        assert b"TOP-SECRET" not in r.data and b"root:" not in r.data and b"comparisons" not in r.data


def test_export_requires_token_and_maps_methods(app_env: dict) -> None:
    client = app_env["app"].test_client()
    comps = app_env["manifest"]["comparisons"]
    ids = list(comps)[:2]
    client.post("/api/session", json={"rater_id": "dan"})
    for cid, choices in zip(ids, ("LLLLL", "RRLLR"), strict=True):
        r = client.post("/api/answers", json={"rater_id": "dan", "comparison_id": cid,
                                              "answers": answers_for(choices)})
        assert r.status_code == 200
    assert client.get("/export.csv").status_code == 403
    assert client.get("/export.csv?token=wrong").status_code == 403
    r = client.get(f"/export.csv?token={TOKEN}")
    assert r.status_code == 200 and r.mimetype == "text/csv"
    table = list(csv.reader(io.StringIO(r.get_data(as_text=True))))
    assert tuple(table[0]) == CSV_COLUMNS
    expected = []
    for cid, choices in zip(ids, ("LLLLL", "RRLLR"), strict=True):
        c = comps[cid]
        for key, choice in answers_for(choices).items():
            expected.append(["dan", cid, c["prompt"], c["left"]["method"], c["right"]["method"], key, choice])
    assert sorted(table[1:]) == sorted(expected)


# ------------------------------------------------------------------------------------------------
# Analysis


def hand_table() -> pd.DataFrame:
    """Two raters, three comparisons vs B (ours left in c1, right in c2, c3) and one vs C."""
    rows_: list[list[str]] = []
    plan = {  # comparison -> (left, right, {rater: choices})
        "c1": ("ours", "B", {"r1": "LLRLL", "r2": "LLRRL"}),
        "c2": ("B", "ours", {"r1": "RRLRR", "r2": "RLLLR"}),
        "c3": ("B", "ours", {"r1": "RRRRR", "r2": "RRLLL"}),
        "c4": ("C", "ours", {"r1": "LLLLL", "r2": "RLLLL"}),
    }
    for cid, (left, right, by_rater) in plan.items():
        for rater, choices in by_rater.items():
            for key, choice in answers_for(choices).items():
                rows_.append([rater, cid, f"prompt {cid}", left, right, key, choice])
    return pd.DataFrame(rows_, columns=list(CSV_COLUMNS))


def test_preference_table_against_hand_counts() -> None:
    res = preference_table(hand_table(), "ours")
    assert list(res.columns) == ["baseline", "criterion", "votes_for", "total", "share", "statistic",
                                 "p_value", "significant", "ci_low", "ci_high"]
    got = {(r.baseline, r.criterion): (r.votes_for, r.total) for r in res.itertuples()}
    # Votes for ours, counted by hand from `hand_table` (ours is left in c1, right in c2/c3/c4):
    # vs B: AQ c1 L,L (2) c2 R,R (2) c3 R,R (2) = 6; SQ: c1 2, c2 R,L 1, c3 2 = 5;
    #       MQ: c1 0, c2 0, c3 R,L 1 = 1; TA: c1 L,R 1, c2 R,L 1, c3 R,L 1 = 3;
    #       Overall: c1 2, c2 2, c3 R,L 1 = 5.  vs C: AQ r2 R = 1, others 0.
    assert got == {("B", "AQ"): (6, 6), ("B", "SQ"): (5, 6), ("B", "MQ"): (1, 6), ("B", "TA"): (3, 6),
                   ("B", "Overall"): (5, 6), ("C", "AQ"): (1, 2), ("C", "SQ"): (0, 2), ("C", "MQ"): (0, 2),
                   ("C", "TA"): (0, 2), ("C", "Overall"): (0, 2)}
    for r in res.itertuples():
        ref = sps.chisquare([r.votes_for, r.total - r.votes_for])
        assert r.statistic == pytest.approx(ref.statistic) and r.p_value == pytest.approx(ref.pvalue)
    assert list(res[res.baseline == "B"].criterion) == list(CRITERION_KEYS)
    wide = table2_shares(res)
    assert wide.loc["B", "AQ"] == pytest.approx(100.0) and wide.loc["B", "MQ"] == pytest.approx(100 / 6)
    # From B's side the shares are the complements.
    res_b = preference_table(hand_table(), "B")
    assert set(res_b.baseline) == {"ours"}
    assert list(res_b.votes_for) == [0, 1, 5, 3, 1]


def test_analysis_rejects_bad_input() -> None:
    t = hand_table()
    with pytest.raises(ValueError, match="appears in no comparison"):
        preference_table(t, "nobody")
    with pytest.raises(ValueError, match="duplicated"):
        preference_table(pd.concat([t, t.iloc[:1]]), "ours")
    bad = t.copy()
    bad.loc[0, "choice"] = "both"
    with pytest.raises(ValueError, match="choice must be one of"):
        preference_table(bad, "ours")
    with pytest.raises(ValueError, match="lack column"):
        preference_table(t.drop(columns="prompt"), "ours")


def test_export_then_analyze_end_to_end(app_env: dict, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    comps = app_env["manifest"]["comparisons"]
    rng = random.Random(0)
    expected: dict[tuple[str, str], list[int]] = {}
    for rater in ("u1", "u2", "u3"):
        client = app_env["app"].test_client()
        client.post("/api/session", json={"rater_id": rater})
        for cid, comp in comps.items():
            answers = {k: rng.choice(["left", "right"]) for k in CRITERION_KEYS}
            assert client.post("/api/answers", json={"rater_id": rater, "comparison_id": cid,
                                                     "answers": answers}).status_code == 200
            left, right = comp["left"]["method"], comp["right"]["method"]
            baseline = left if right == "full" else right
            for key, choice in answers.items():
                tally = expected.setdefault((baseline, key), [0, 0])
                tally[0] += comp[choice]["method"] == "full"
                tally[1] += 1
    csv_path = tmp_path / "answers.csv"
    csv_path.write_bytes(app_env["app"].test_client().get(f"/export.csv?token={TOKEN}").data)
    assert analyze_main([str(csv_path), "--method", "full", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    got = {(r["baseline"], r["criterion"]): [r["votes_for"], r["total"]] for r in data["results"]}
    assert got == expected
    assert analyze_main([str(csv_path), "--method", "full"]) == 0
    assert "Table 2" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Real server on loopback: raw-path traversal and concurrent raters


@pytest.fixture()
def live_server(site: dict, tmp_path: Path) -> Iterator[dict]:
    db = tmp_path / "live.sqlite"
    server = make_study_server(StudyConfig(site=site["out"], db=db, export_token=TOKEN, secret_key="k"),
                               "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"port": server.server_port, "db": db, "manifest": site["manifest"], "out": site["out"]}
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_raw_path_traversal_over_http(live_server: dict) -> None:
    (live_server["out"].parent / "secret.txt").write_text("TOP-SECRET")
    for path in TRAVERSALS + ["/static/%2e%2e/%2e%2e/secret.txt", "/videos/../../secret.txt"]:
        conn = http.client.HTTPConnection("127.0.0.1", live_server["port"], timeout=10)
        conn.putrequest("GET", path, skip_accept_encoding=True)  # sent as-is, no client-side normalising
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status in (400, 404), (path, resp.status)
        assert b"TOP-SECRET" not in body and b"root:" not in body


def _rater(port: int, rater: str, comparisons: list[str], failures: list[str]) -> None:
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    base = f"http://127.0.0.1:{port}"

    def post(path: str, body: dict) -> None:
        req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with opener.open(req, timeout=60) as resp:
                if resp.status != 200:
                    failures.append(f"{rater} {path}: {resp.status}")
        except (urllib.error.URLError, OSError) as exc:
            failures.append(f"{rater} {path}: {exc}")

    post("/api/session", {"rater_id": rater})
    for cid in comparisons:
        post("/api/answers", {"rater_id": rater, "comparison_id": cid,
                              "answers": {k: random.choice(["left", "right"]) for k in CRITERION_KEYS}})


def test_load_50_raters_10_comparisons(tmp_path: Path, sources: dict[str, Path]) -> None:
    many_a, many_b = tmp_path / "a", tmp_path / "b"
    for i in range(10):
        write_fake_video(many_a / f"p_{i}.mp4", f"a{i}")
        write_fake_video(many_b / f"p_{i}.mp4", f"b{i}")
    site_dir = tmp_path / "site10"
    manifest = build_site(load_side(many_a, "a"), [load_side(many_b, "b")], site_dir, seed=1)
    db = tmp_path / "load.sqlite"
    server = make_study_server(StudyConfig(site=site_dir, db=db, export_token=TOKEN, secret_key="k"),
                               "127.0.0.1", 0)
    serve = threading.Thread(target=server.serve_forever, daemon=True)
    serve.start()
    failures: list[str] = []
    try:
        start = time.monotonic()
        raters = [threading.Thread(target=_rater, args=(server.server_port, f"load{i:02d}",
                                                        list(manifest["comparisons"]), failures))
                  for i in range(50)]
        for t in raters:
            t.start()
        for t in raters:
            t.join(timeout=120)
        elapsed = time.monotonic() - start
    finally:
        server.shutdown()
        server.server_close()
        serve.join(timeout=10)
    assert not any(t.is_alive() for t in raters), "raters still running after 120 s"
    assert failures == []
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 50 * 10 * 5
        assert conn.execute("SELECT COUNT(DISTINCT rater_id) FROM answers").fetchone()[0] == 50
        per = conn.execute("SELECT COUNT(*) FROM answers GROUP BY rater_id, comparison_id").fetchall()
        assert {n for (n,) in per} == {5} and len(per) == 500
    assert elapsed < 120
