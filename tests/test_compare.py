"""ablations.compare: two configurations of a runs.csv on matched (prompt, seed) pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from ablations import compare

PROMPTS = ("a ball", "a cube", "a pendulum")
TAG = "field.hexplane.resolutions=[37,74,148]"


def _runs() -> pd.DataFrame:
    """full, and a tagged hexplane worse by 0.01 + 0.001·k on every (prompt, seed); hexplane has an extra seed 3
    without a full partner, and one failed run that must be ignored."""
    rows = []
    for i, prompt in enumerate(PROMPTS):
        for seed in (0, 1, 2):
            k = 3 * i + seed
            rows.append(("demo_cpu", "full", "default", prompt, seed, "finished", 0.1 + 0.01 * k))
            rows.append(("demo_cpu", "hexplane", TAG, prompt, seed, "finished", 0.1 + 0.01 * k + 0.01 + 0.001 * k))
    rows.append(("demo_cpu", "hexplane", TAG, "a ball", 3, "finished", 0.5))
    rows.append(("demo_cpu", "hexplane", TAG, "a cube", 4, "failed", float("nan")))
    return pd.DataFrame(rows, columns=["preset", "variant", "tag", "prompt", "seed", "status", "gt_error"])


def test_all_nine_pairs_worse_gives_the_exact_smallest_p() -> None:
    got = compare.compare(_runs(), compare.Configuration.parse(f"hexplane[{TAG}]"),
                          compare.Configuration.parse("full"), "gt_error")
    # Independently: differences 0.01 + 0.001 k for k = 0..8, mean 0.014; all one sign, so 2 of 2^9 patterns.
    assert got["diff"] == pytest.approx(0.014, abs=1e-12)
    assert got["p"] == 2 / 512 and got["n_pairs"] == 9 and got["exact"]
    assert got["unmatched"] == 1  # hexplane's seed 3; the failed run is not a run to pair
    assert got["low"] > 0.0


def test_seeds_restrict_the_pairs() -> None:
    got = compare.compare(_runs(), compare.Configuration.parse(f"demo_cpu/hexplane[{TAG}]"),
                          compare.Configuration.parse("demo_cpu/full"), "gt_error", seeds=[0, 1])
    diffs = [0.01 + 0.001 * (3 * i + s) for i in range(3) for s in (0, 1)]
    assert got["n_pairs"] == 6 and got["p"] == 2 / 64
    assert got["diff"] == pytest.approx(sum(diffs) / 6, abs=1e-12)


def test_configuration_parsing() -> None:
    assert compare.Configuration.parse("no_hybrid") == compare.Configuration(None, "no_hybrid", "default")
    assert compare.Configuration.parse(f"demo_cpu/hexplane[{TAG}]") == compare.Configuration(
        "demo_cpu", "hexplane", TAG)
    assert str(compare.Configuration("demo_cpu", "hexplane", TAG)) == f"demo_cpu/hexplane[{TAG}]"


def test_unknown_configuration_lists_what_the_file_has() -> None:
    with pytest.raises(ValueError, match=r"no finished runs of hexplane; the file has: full, hexplane\[field"):
        compare.compare(_runs(), compare.Configuration.parse("hexplane"), compare.Configuration.parse("full"),
                        "gt_error")


def test_cli_prints_one_json_line_per_metric(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "runs.csv"
    _runs().to_csv(path, index=False)
    assert compare.main([str(path), f"hexplane[{TAG}]", "full"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["metric"] for line in lines] == ["gt_error"] and lines[0]["p"] == 2 / 512
    assert compare.main([str(path), "no_3d", "full"]) == 2
    assert "no finished runs of no_3d" in capsys.readouterr().err
