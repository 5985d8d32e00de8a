"""Tests of eval/clip_score.py with a random-weight open_clip ViT-B-32 (no downloads).

The reference values are computed here independently: our own PIL preprocessing (resize shortest side,
centre crop, OpenAI mean/std), `model.encode_image` / `model.encode_text`, normalisation and cosine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import huggingface_hub.constants
import imageio.v3 as iio
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from eval import clip_score
from eval.clip_score import CLIPScorer, CLIPWeightsError, prompt_from_filename, resolve_quick_gelu

# CLIP's image normalisation (OpenAI CLIP `clip/clip.py` _transform), typed in, independent of open_clip.
OPENAI_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
OPENAI_STD = np.array([0.26862954, 0.26130258, 0.27577711])
H, W = 32, 48  # 224 / 32 = 7 exactly: resize to 224 x 336, then crop columns 56..280
PROMPTS = [
    "a panda dancing",
    "a goat drinking beer",
    "a dog riding a skateboard",
    "a space shuttle launching",
    "an alien playing the piano",
    "a red cube",
    "an octopus is underwater",
]


@pytest.fixture(scope="module")
def scorer() -> CLIPScorer:
    torch.manual_seed(0)  # random weights: fixed so the sign pattern of the cosines is reproducible
    return CLIPScorer(pretrained=None, batch_size=4)


@pytest.fixture(scope="module")
def frames_u8() -> np.ndarray:
    """[8, 32, 48, 3] uint8 in [1, 255]: noise, flat colours and gradients (varied CLIP features)."""
    rng = np.random.default_rng(0)
    y = np.linspace(0.0, 1.0, H)[:, None, None]
    x = np.linspace(0.0, 1.0, W)[None, :, None]
    frames = []
    for k in range(8):
        if k % 3 == 0:
            frame = rng.integers(1, 256, (H, W, 3))
        elif k % 3 == 1:
            frame = np.broadcast_to(rng.integers(1, 256, (1, 1, 3)), (H, W, 3))
        else:
            frame = 1 + 254 * (y * rng.random((1, 1, 3)) + x * rng.random((1, 1, 3))) / 2
        frames.append(np.rint(frame))
    return np.stack(frames).astype(np.uint8)


def reference_image_features(model: torch.nn.Module, frames: np.ndarray) -> torch.Tensor:
    """Unit-norm image features, preprocessing by hand: frames [T, 32, 48, 3] uint8 -> [T, D] float64."""
    images = []
    for frame in frames:
        image = Image.fromarray(frame).resize((336, 224), Image.Resampling.BICUBIC)  # shortest side -> 224
        image = image.crop((56, 0, 280, 224))  # centre 224 x 224
        pixels = (np.asarray(image, dtype=np.float64) / 255.0 - OPENAI_MEAN) / OPENAI_STD
        images.append(torch.from_numpy(pixels).permute(2, 0, 1).float())
    with torch.no_grad():
        features = model.encode_image(torch.stack(images)).double()
    return features / features.norm(dim=-1, keepdim=True)


def reference_cosines(model: torch.nn.Module, image_features: torch.Tensor, prompt: str) -> np.ndarray:
    """cos(image, text) per frame: image_features [T, D] -> [T]."""
    with torch.no_grad():
        text = model.encode_text(open_clip.tokenize([prompt]))[0].double()
    return (image_features @ (text / text.norm())).numpy()


def reference_score(model: torch.nn.Module, frames: np.ndarray, prompt: str) -> float:
    cos = reference_cosines(model, reference_image_features(model, frames), prompt)
    return float(100.0 * np.maximum(cos, 0.0).mean())


@pytest.fixture(scope="module")
def reference(scorer: CLIPScorer, frames_u8: np.ndarray) -> torch.Tensor:
    """Independently computed unit image features of `frames_u8`: [8, D]."""
    return reference_image_features(scorer.model, frames_u8)


def test_matches_independent_computation(
    scorer: CLIPScorer, frames_u8: np.ndarray, reference: torch.Tensor
) -> None:
    prompt = "an alien playing the piano"
    cos = reference_cosines(scorer.model, reference, prompt)
    assert (cos > 1e-3).sum() >= 2  # some frames score above zero, so the comparison has content
    assert scorer.score(frames_u8, prompt) == pytest.approx(100.0 * np.maximum(cos, 0.0).mean(), abs=1e-4)
    assert not scorer.model.training


def test_clamp_at_zero(scorer: CLIPScorer, frames_u8: np.ndarray, reference: torch.Tensor) -> None:
    # Random weights give cosines of both signs; choose the prompts from the independent cosines (text
    # encodes are cheap) so the case stays honest if the random initialisation changes.
    cosines = {prompt: reference_cosines(scorer.model, reference, prompt) for prompt in PROMPTS}
    mixed = [p for p, c in cosines.items() if (c < -1e-3).sum() >= 2 and (c > 1e-3).sum() >= 2]
    negative = [p for p, c in cosines.items() if (c[:2] < -1e-3).all()]
    assert mixed and negative, f"no prompt with mixed / negative cosines: {cosines}"
    cos_all = cosines[mixed[0]]
    # Two frames of each sign (4 encodes instead of 8).
    pick = np.concatenate([np.flatnonzero(cos_all < -1e-3)[:2], np.flatnonzero(cos_all > 1e-3)[:2]])
    cos = cos_all[pick]
    frame_scores = scorer.frame_scores(frames_u8[pick], mixed[0]).numpy()
    np.testing.assert_allclose(frame_scores, 100.0 * np.maximum(cos, 0.0), atol=1e-4)
    assert (frame_scores[:2] == 0.0).all() and (frame_scores[2:] > 0.1).all()
    # The clamp moves the mean by far more than the tolerance.
    assert abs(100.0 * np.maximum(cos, 0.0).mean() - 100.0 * cos.mean()) > 0.1
    # Frames whose cosines are all negative score exactly 0 (not a negative number).
    assert scorer.score(frames_u8[:2], negative[0]) == 0.0


def test_batch_size_does_not_change_score(
    scorer: CLIPScorer, frames_u8: np.ndarray, reference: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = "an alien playing the piano"
    expected = 100.0 * np.maximum(reference_cosines(scorer.model, reference, prompt), 0.0)
    scores = {}
    for batch_size in (1, 7):  # 8 frames: 8 batches of 1, or 7 + 1
        monkeypatch.setattr(scorer, "batch_size", batch_size)
        scores[batch_size] = scorer.frame_scores(frames_u8, prompt).numpy()
    np.testing.assert_allclose(scores[1], scores[7], atol=1e-4)
    np.testing.assert_allclose(scores[7], expected, atol=1e-4)


def test_float_frames_equal_uint8_frames(
    scorer: CLIPScorer, frames_u8: np.ndarray, reference: torch.Tensor
) -> None:
    prompt = "an alien playing the piano"
    positive = np.flatnonzero(reference_cosines(scorer.model, reference, prompt) > 1e-3)[:1]
    assert len(positive) == 1, "need a frame with positive cosine"
    frames = frames_u8[positive]
    cos = reference_cosines(scorer.model, reference[positive], prompt)
    expected = scorer.score(frames, prompt)
    assert expected == pytest.approx(100.0 * cos.mean(), abs=1e-4)
    as_float = torch.from_numpy(frames).float() / 255.0
    # 0.4 below each level: round(x * 255) gives the level back; truncation would give level - 1.
    below = (torch.from_numpy(frames).double() - 0.4) / 255.0
    assert (np.floor(below.numpy() * 255.0).astype(np.uint8) != frames).all()
    pil = [Image.fromarray(frame) for frame in frames]
    for variant in (as_float, below, below.numpy(), pil):
        assert scorer.score(variant, prompt) == pytest.approx(expected, abs=1e-6)


def test_bad_frames_are_rejected(scorer: CLIPScorer, frames_u8: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        scorer.score(torch.full((2, H, W, 3), 1.5), "a panda")
    with pytest.raises(ValueError, match="NaN"):
        scorer.score(torch.full((2, H, W, 3), float("nan")), "a panda")
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        scorer.score(frames_u8[0], "a panda")
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        scorer.score(torch.zeros(2, 3, H, W), "a panda")
    with pytest.raises(TypeError, match="dtype"):
        scorer.score(frames_u8.astype(np.int32), "a panda")
    with pytest.raises(ValueError, match="prompt"):
        scorer.score(frames_u8, "  ")


def test_text_encoded_once_per_prompt(
    scorer: CLIPScorer, frames_u8: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    encode_text = scorer.model.encode_text

    def counting(tokens: torch.Tensor) -> torch.Tensor:
        calls.append(tokens.shape)
        return encode_text(tokens)

    monkeypatch.setattr(scorer.model, "encode_text", counting)
    first = scorer.score(frames_u8[:1], "a squirrel playing the saxophone")
    second = scorer.score(frames_u8[:1], "a squirrel playing the saxophone")
    assert len(calls) == 1
    assert first == second


def _write_video(path: Path, frames: np.ndarray) -> None:
    iio.imwrite(path, frames, fps=15)


def test_score_video_reads_all_frames(scorer: CLIPScorer, frames_u8: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    _write_video(path, frames_u8[[2, 7]])
    decoded = iio.imread(path)  # [T, H, W, 3] as decoded (mp4 is lossy)
    assert decoded.shape == (2, H, W, 3)
    prompt = "an alien playing the piano"
    expected = reference_score(scorer.model, decoded, prompt)
    assert scorer.score_video(path, prompt) == pytest.approx(expected, abs=1e-4)


def test_prompt_from_filename() -> None:
    assert prompt_from_filename("videos/a_panda_dancing.mp4") == "a panda dancing"
    assert prompt_from_filename("Dog_riding_a_skateboard.mp4") == "Dog riding a skateboard"
    with pytest.raises(ValueError, match="file name"):
        prompt_from_filename("___.mp4")


def test_score_folder_maps_file_names_to_prompts(
    scorer: CLIPScorer, frames_u8: np.ndarray, tmp_path: Path
) -> None:
    _write_video(tmp_path / "a_panda_dancing.mp4", frames_u8[2:3])
    _write_video(tmp_path / "an_alien_playing_the_piano.mp4", frames_u8[7:8])
    _write_video(tmp_path / "a_crocodile_playing_a_drum_set_depth_rgb.mp4", frames_u8[5:6])
    (tmp_path / "notes.txt").write_text("not a video")
    result = scorer.score_folder(
        tmp_path, prompts={"a_crocodile_playing_a_drum_set_depth_rgb": "a crocodile playing a drum set"}
    )
    assert set(result.per_prompt) == {
        "a panda dancing",
        "an alien playing the piano",
        "a crocodile playing a drum set",
    }
    for prompt, value in result.per_prompt.items():
        stem = {"a crocodile playing a drum set": "a_crocodile_playing_a_drum_set_depth_rgb"}.get(
            prompt, prompt.replace(" ", "_")
        )
        expected = reference_score(scorer.model, iio.imread(tmp_path / f"{stem}.mp4"), prompt)
        assert value == pytest.approx(expected, abs=1e-4)
    assert result.mean == pytest.approx(np.mean(list(result.per_prompt.values())), abs=1e-12)
    per_prompt, mean = result  # also unpacks as (dict, mean)
    assert mean == result.mean and per_prompt is result.per_prompt


def test_score_folder_errors(scorer: CLIPScorer, frames_u8: np.ndarray, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no videos"):
        scorer.score_folder(tmp_path)
    _write_video(tmp_path / "a_panda.mp4", frames_u8[:1])
    with pytest.raises(ValueError, match="prompts"):
        scorer.score_folder(tmp_path, prompts={"missing_file": "x"})
    _write_video(tmp_path / "a panda.mp4", frames_u8[:1])
    with pytest.raises(ValueError, match="two videos"):
        scorer.score_folder(tmp_path)


def _make_run(run_dir: Path, frames: np.ndarray, prompt: str) -> None:
    (run_dir / "renders").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f'prompt: "{prompt}"\nseed: 0\nvariant:\n  name: full\n')
    _write_video(run_dir / "renders" / "orbit.mp4", frames)


def test_score_run(scorer: CLIPScorer, frames_u8: np.ndarray, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _make_run(run_dir, frames_u8[6:8], "an alien playing the piano")
    expected = scorer.score_video(run_dir / "renders" / "orbit.mp4", "an alien playing the piano")
    assert expected > 0.1
    assert scorer.score_run(run_dir) == pytest.approx(expected, abs=1e-9)
    (run_dir / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(ValueError, match="prompt"):
        scorer.score_run(run_dir)
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        scorer.score_run(tmp_path)


def test_cli_run_video_and_folder(
    scorer: CLIPScorer,
    frames_u8: np.ndarray,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    built = []

    def fake_scorer(**kwargs: object) -> CLIPScorer:
        built.append(kwargs)
        return scorer  # reuse the module's random-weight model instead of building another

    monkeypatch.setattr(clip_score, "CLIPScorer", fake_scorer)
    run_dir = tmp_path / "run"
    _make_run(run_dir, frames_u8[7:8], "a goat drinking beer")
    folder = tmp_path / "videos"
    folder.mkdir()
    _write_video(folder / "a_panda_dancing.mp4", frames_u8[:1])
    _write_video(folder / "a_dog_riding_a_skateboard.mp4", frames_u8[1:2])

    assert clip_score.main([str(run_dir), "--pretrained", "none", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["per_prompt"] == {"a goat drinking beer": pytest.approx(scorer.score_run(run_dir))}
    assert built[-1]["pretrained"] is None

    assert clip_score.main([str(folder / "a_panda_dancing.mp4"), "--json", "--pretrained", "x.pt"]) == 0
    by_video = json.loads(capsys.readouterr().out)["per_prompt"]
    assert list(by_video) == ["a panda dancing"]
    assert built[-1]["pretrained"] == "x.pt"

    assert clip_score.main([str(folder), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["per_prompt"]) == {"a panda dancing", "a dog riding a skateboard"}
    assert out["mean"] == pytest.approx(np.mean(list(out["per_prompt"].values())))
    assert out["per_prompt"]["a panda dancing"] == pytest.approx(by_video["a panda dancing"], abs=1e-9)
    assert built[-1]["pretrained"] == "openai" and built[-1]["model_name"] == "ViT-B-32"

    assert clip_score.main([str(folder / "a_dog_riding_a_skateboard.mp4"), "--prompt", "a dog"]) == 0
    assert "a dog\n" in capsys.readouterr().out
    assert clip_score.main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_checks_the_path_before_loading_clip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong path is one line and exit status 2 at once: CLIP is never built (offline, its missing weights
    would otherwise be all the user hears about)."""

    def must_not_load(**kwargs: object) -> CLIPScorer:
        raise AssertionError("CLIP was loaded before the path was checked")

    monkeypatch.setattr(clip_score, "CLIPScorer", must_not_load)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text('prompt: "a panda dancing"\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv, message in (
        ([str(tmp_path / "missing.mp4")], "missing.mp4' does not exist; pass a run directory, a video or a video"),
        ([str(run_dir)], "orbit.mp4' does not exist; render the run's orbit video first"),
        ([str(empty)], "holds no videos"),
        ([str(run_dir), "--prompt", "a dog"], "--prompt applies to a single video"),
    ):
        assert clip_score.main(argv) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("python -m eval.clip_score: error: ") and message in captured.err, captured
        assert captured.err.count("\n") == 1 and captured.out == ""
    _write_video(empty / "a_cat.mp4", np.zeros((1, 8, 8, 3), np.uint8))
    assert clip_score.main([str(empty), "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err


def test_offline_without_cache_names_pretrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Offline mode is read from this constant at call time; an empty cache_dir rules out a cached copy.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(CLIPWeightsError) as info:
        CLIPScorer(pretrained="openai", cache_dir=str(tmp_path))
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"offline failure took {elapsed:.1f} s"
    message = str(info.value)
    assert "pretrained='openai'" in message
    assert "`pretrained`" in message and "local checkpoint file" in message
    assert "internet" in message
    assert isinstance(info.value, RuntimeError)


def test_unknown_pretrained_or_model_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pretrained='not_a_tag'"):
        CLIPScorer(pretrained="not_a_tag")
    with pytest.raises(ValueError, match="pretrained="):
        CLIPScorer(pretrained=str(tmp_path / "missing.bin"))
    with pytest.raises(ValueError, match="model_name="):
        CLIPScorer(model_name="ViT-Nope", pretrained=None)
    with pytest.raises(ValueError, match="batch_size"):
        CLIPScorer(pretrained=None, batch_size=0)


def test_quick_gelu_follows_the_weights(tmp_path: Path) -> None:
    # OpenAI's ViT-B/32 was trained with QuickGELU; LAION-2B's ViT-B-32 with GELU (open_clip registry).
    assert resolve_quick_gelu("ViT-B-32", "openai", None) is True
    assert resolve_quick_gelu("ViT-B-32", "laion2b_s34b_b79k", None) is False
    assert resolve_quick_gelu("ViT-B-32", None, None) is False
    checkpoint = tmp_path / "weights.bin"
    checkpoint.write_bytes(b"")
    assert resolve_quick_gelu("ViT-B-32", str(checkpoint), None) is True
    assert resolve_quick_gelu("ViT-B-32", "openai", False) is False


@pytest.mark.slow  # builds a second model and writes a 600 MB checkpoint (~15 s)
def test_local_checkpoint_file(scorer: CLIPScorer, frames_u8: np.ndarray, tmp_path: Path) -> None:
    checkpoint = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(scorer.model.state_dict(), checkpoint)
    loaded = CLIPScorer(pretrained=str(checkpoint), quick_gelu=False, batch_size=9)
    assert loaded.quick_gelu is False
    for prompt in PROMPTS[:2]:
        expected = scorer.score(frames_u8[:2], prompt)
        assert loaded.score(frames_u8[:2], prompt) == pytest.approx(expected, abs=1e-4)
