"""CLIP score of rendered videos, as the 4D-fy paper evaluates it (paper §4.1, Table 2).

Paper §4.1: "we render a video using the same camera trajectory as MAV3D, i.e. moving around the scene in
azimuth with a fixed elevation angle. Subsequently, we score each video frame with CLIP ViT-B/32 and
average the scores over all frames and text prompts". The score is "bound between 0 and 100".

Per frame we use CLIPScore's form, 100 * max(cos(image, text), 0) (the clamp keeps it in [0, 100] as the
paper states; weight 100 as in torchmetrics' CLIPScore, which the paper's [42] benchmark line follows).
A video's score is the mean over its frames; a set of prompts scores the mean over prompts.

Inputs: frames as a tensor/array [T, H, W, 3] (uint8, or float in [0, 1]) or a list of PIL images; a video
file (all frames, read with imageio); a folder of videos named by prompt (MAV3D's published videos,
`a_panda_dancing.mp4` -> "a panda dancing"); or a run directory (`config.yaml` with a top-level `prompt`,
and `renders/orbit.mp4`).

CLI: `python -m eval.clip_score PATH [--pretrained TAG|FILE|none] [--json]` (PATH: run dir, video or folder).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import imageio.v3 as iio
import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

# Paper §4.1: "CLIP ViT-B/32"; OpenAI's weights, the model CLIPScore [42]/torchmetrics use by default.
DEFAULT_MODEL_NAME = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"
# CLIPScore's weight: 100 * max(cos, 0) keeps the score in [0, 100] (paper §4.1: "bound between 0 and 100").
SCORE_SCALE = 100.0
# A run directory's orbit video (layout fixed by the lead: run_dir/renders/orbit.mp4).
RUN_VIDEO = Path("renders") / "orbit.mp4"
RUN_CONFIG = "config.yaml"
# Files `score_folder` treats as videos (MAV3D's published videos are .mp4).
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".avi", ".mkv")

Frames = torch.Tensor | np.ndarray | Sequence[Image.Image]


class CLIPWeightsError(RuntimeError):
    """The CLIP weights named by `pretrained` could not be loaded (e.g. offline with no cached copy)."""


@dataclass
class CLIPScoreConfig:
    """Settings of the CLIP scorer (paper §4.1: CLIP ViT-B/32)."""

    model_name: str = DEFAULT_MODEL_NAME
    """open_clip architecture name."""
    pretrained: str | None = DEFAULT_PRETRAINED
    """open_clip tag ("openai"), a local checkpoint file, or None for random weights (tests only)."""
    quick_gelu: bool | None = None
    """Use QuickGELU; None: from the tag's registry entry, True for a local file (as OpenAI's weights)."""
    device: str = "cpu"
    """Torch device that runs the model."""
    batch_size: int = 32
    """Frames per image-encoder batch (does not change the score)."""
    cache_dir: str | None = None
    """Where open_clip looks for / stores downloaded weights; None: the Hugging Face cache (HF_HOME)."""


class FolderScore(NamedTuple):
    """Scores of a folder of videos: one per prompt, and their mean (the paper's number)."""

    per_prompt: dict[str, float]
    mean: float


def prompt_from_filename(path: str | Path) -> str:
    """The prompt a video is named for: the file stem with `_` -> space (`a_panda_dancing.mp4`).

    MAV3D's published videos are named this way and 4D-fy's user-study script reads prompts from them the
    same way (it also upper-cases the first letter, which CLIP's lower-casing tokenizer ignores).
    """
    prompt = " ".join(Path(path).stem.replace("_", " ").split())
    if not prompt:
        raise ValueError(f"no prompt in the file name {str(path)!r}; name the video after its prompt")
    return prompt


def _is_local_file(pretrained: str) -> bool:
    return os.path.isfile(os.path.expanduser(pretrained))


def resolve_quick_gelu(model_name: str, pretrained: str | None, quick_gelu: bool | None) -> bool:
    """Whether the model must use QuickGELU.

    OpenAI's CLIP was trained with QuickGELU. open_clip 3.x builds `ViT-B-32` with exact GELU even for
    `pretrained="openai"` (it only warns), which changes the features; so we take the activation from the
    tag's registry entry. A local file cannot tell, and the paper's model is OpenAI's: default True.
    """
    if quick_gelu is not None:
        return quick_gelu
    if pretrained is None:
        return False
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if tag_cfg:
        return bool(tag_cfg.get("quick_gelu", False))
    return _is_local_file(pretrained)


def _offline_message(model_name: str, pretrained: str, cache_dir: str | None, cause: Exception) -> str:
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    hub = str(tag_cfg.get("hf_hub", "")).strip("/")
    cache = cache_dir or "the Hugging Face cache (HF_HOME, default ~/.cache/huggingface)"
    source = f" (Hugging Face repo {hub}, file open_clip_pytorch_model.bin)" if hub else ""
    return (
        f"CLIP weights for pretrained={pretrained!r} (model_name={model_name!r}) are not available: "
        f"no cached copy in {cache} and they cannot be downloaded here (offline, HF_HUB_OFFLINE=1 or no "
        "internet). "
        f'Fix, either: (1) on a machine with internet run once `python -c "import open_clip; '
        f"open_clip.create_model('{model_name}', pretrained='{pretrained}')\"` and copy its Hugging Face "
        f"cache to this machine; or (2) set `pretrained` (CLIPScorer argument / `--pretrained` on the CLI / "
        f"`pretrained` key of the eval config) to a local checkpoint file path{source}. Cause: {cause}"
    )


def _check_pretrained(model_name: str, pretrained: str | None) -> None:
    if model_name not in open_clip.list_models():
        raise ValueError(f"model_name={model_name!r} is not an open_clip model; the paper's is 'ViT-B-32'")
    if pretrained is None or open_clip.get_pretrained_cfg(model_name, pretrained):
        return
    if not _is_local_file(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(
            f"pretrained={pretrained!r} is neither an open_clip tag for {model_name!r} nor an existing file; "
            f"pass one of {tags} (the paper's: 'openai') or the path of a local checkpoint file"
        )


def _float_to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames [T, H, W, 3] in [0, 1] -> uint8 via round(x * 255).

    Why: open_clip's preprocess is defined on 8-bit PIL images (PIL's bicubic resize), and the videos the
    paper scores (ours and MAV3D's) are 8-bit. Rounding as an 8-bit writer does makes a render scored in
    memory score the same as the same frames stored losslessly, and float/uint8 inputs agree exactly.
    """
    if not np.isfinite(frames).all():
        raise ValueError("frames contain NaN or inf; float frames must be finite values in [0, 1]")
    lo, hi = float(frames.min()), float(frames.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"float frames must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]; "
            "pass uint8 frames or rescale the floats to [0, 1]"
        )
    return np.rint(frames.astype(np.float64) * 255.0).astype(np.uint8)


def frames_to_pil(frames: Frames) -> list[Image.Image]:
    """Frames -> PIL RGB images.

    frames: [T, H, W, 3] torch tensor or numpy array (uint8, or float in [0, 1]), or a list of PIL images.
    """
    if isinstance(frames, Image.Image):
        raise TypeError("frames must be several frames: pass [image] for a single PIL image")
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("frames is empty; pass at least one frame")
        if not all(isinstance(im, Image.Image) for im in frames):
            raise TypeError("a list of frames must hold PIL images; pass arrays as one [T, H, W, 3] array")
        return [im.convert("RGB") for im in frames]
    if isinstance(frames, torch.Tensor):
        array = frames.detach().cpu().numpy()
    elif isinstance(frames, np.ndarray):
        array = frames
    else:
        raise TypeError(
            f"frames must be a [T, H, W, 3] tensor/array or a list of PIL images, got {type(frames).__name__}"
        )
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(
            f"frames must have shape [T, H, W, 3], got {tuple(array.shape)}; add a leading axis for a single "
            "frame (frames[None]) or permute channels-first [T, 3, H, W] frames to channels-last"
        )
    if array.shape[0] == 0:
        raise ValueError("frames is empty; pass at least one frame")
    if array.dtype == np.uint8:
        uint8 = array
    elif np.issubdtype(array.dtype, np.floating):
        uint8 = _float_to_uint8(array)
    else:
        raise TypeError(f"frames must be uint8 or float in [0, 1], got dtype {array.dtype}")
    return [Image.fromarray(np.ascontiguousarray(frame)) for frame in uint8]


def read_video(path: str | Path) -> np.ndarray:
    """All frames of a video file: [T, H, W, 3] uint8 (imageio)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {str(path)!r} does not exist")
    frames = [np.asarray(frame) for frame in iio.imiter(path)]
    if not frames:
        raise ValueError(f"video {str(path)!r} has no frames")
    video = np.stack(frames)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video {str(path)!r} decodes to shape {video.shape}, expected [T, H, W, 3] RGB")
    return video


def read_run_prompt(run_dir: str | Path) -> str:
    """The top-level `prompt` of `run_dir/config.yaml`."""
    config_path = Path(run_dir) / RUN_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(config_path)!r} does not exist; run_dir must be a run directory")
    config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    prompt = config.get("prompt") if isinstance(config, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{str(config_path)!r} has no top-level string `prompt`; the run config must set it")
    return prompt


class CLIPScorer:
    """Scores frames against a text prompt with CLIP (paper §4.1), deterministically, without gradients.

    The model stays in eval mode in fp32; each prompt is encoded once (cache). `batch_size` may be changed
    between calls; it only splits the image-encoder work.
    """

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL_NAME,
        pretrained: str | None = DEFAULT_PRETRAINED,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        quick_gelu: bool | None = None,
        cache_dir: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        _check_pretrained(model_name, pretrained)
        self.model_name = model_name
        self.pretrained = pretrained
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.quick_gelu = resolve_quick_gelu(model_name, pretrained, quick_gelu)
        local = pretrained is not None and _is_local_file(pretrained)
        load_from = os.path.expanduser(pretrained) if local else pretrained
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name,
                pretrained=load_from,
                device=self.device,
                precision="fp32",
                force_quick_gelu=self.quick_gelu,
                cache_dir=cache_dir,
            )
        except RuntimeError as err:
            if pretrained is not None and open_clip.get_pretrained_cfg(model_name, pretrained):
                raise CLIPWeightsError(_offline_message(model_name, pretrained, cache_dir, err)) from err
            raise
        # create_model_and_transforms returns the model in training mode; scoring needs eval mode.
        self.model = model.eval()
        self.preprocess = preprocess  # open_clip's eval transform: resize, centre crop, normalise
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg: CLIPScoreConfig) -> CLIPScorer:
        """Build from a `CLIPScoreConfig`."""
        return cls(
            model_name=cfg.model_name,
            pretrained=cfg.pretrained,
            device=cfg.device,
            batch_size=cfg.batch_size,
            quick_gelu=cfg.quick_gelu,
            cache_dir=cfg.cache_dir,
        )

    @torch.no_grad()
    def text_features(self, prompt: str) -> torch.Tensor:
        """Unit-norm text embedding of `prompt`: [D] (cached per prompt)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        cached = self._text_cache.get(prompt)
        if cached is not None:
            return cached
        tokens = self.tokenizer([prompt])  # [1, 77]
        if isinstance(self.tokenizer, open_clip.tokenizer.SimpleTokenizer):
            n_tokens = len(self.tokenizer.encode(prompt)) + 2  # + start and end tokens
            if n_tokens > tokens.shape[-1]:
                # CLIP's text encoder reads 77 tokens; every CLIPScore implementation truncates the same way.
                message = f"prompt {prompt!r} has {n_tokens} tokens; CLIP reads only {tokens.shape[-1]}"
                warnings.warn(message, stacklevel=2)
        features = self.model.encode_text(tokens.to(self.device))[0].float()
        features = F.normalize(features, dim=-1)
        self._text_cache[prompt] = features
        return features

    @torch.no_grad()
    def image_features(self, frames: Frames) -> torch.Tensor:
        """Unit-norm image embeddings: frames [T, H, W, 3] (or T PIL images) -> [T, D]."""
        images = frames_to_pil(frames)
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[start : start + self.batch_size]])
            features = self.model.encode_image(batch.to(self.device)).float()  # [b, D]
            chunks.append(F.normalize(features, dim=-1))
        return torch.cat(chunks)

    def cosine(self, frames: Frames, prompt: str) -> torch.Tensor:
        """Cosine similarity of every frame with the prompt: [T], in [-1, 1]."""
        text = self.text_features(prompt)  # first: a bad prompt fails before the costly image encoding
        return self.image_features(frames) @ text

    def frame_scores(self, frames: Frames, prompt: str) -> torch.Tensor:
        """Per-frame CLIP score 100 * max(cos, 0): [T] (CPU), in [0, 100]."""
        return (SCORE_SCALE * self.cosine(frames, prompt).clamp(min=0.0)).cpu()

    def score(self, frames: Frames, prompt: str) -> float:
        """CLIP score of a video: mean over frames of 100 * max(cos(image, text), 0)."""
        return float(self.frame_scores(frames, prompt).double().mean())

    def score_video(self, path: str | Path, prompt: str) -> float:
        """CLIP score of every frame of the video file at `path` against `prompt`."""
        return self.score(read_video(path), prompt)

    def score_folder(self, folder: str | Path, prompts: Mapping[str, str] | None = None) -> FolderScore:
        """Score every video in `folder`, each against the prompt its file name spells.

        prompts: optional file stem -> prompt overrides (e.g. a file whose name carries a suffix such as
            MAV3D's `a_crocodile_playing_a_drum_set_depth_rgb.mp4`).
        Returns the score per prompt and their mean (the paper's number for a method).
        """
        return self.score_videos(folder_videos(folder, prompts))

    def score_run(self, run_dir: str | Path) -> float:
        """CLIP score of a run: `run_dir/renders/orbit.mp4` against the `prompt` of `run_dir/config.yaml`."""
        prompt, video = run_video(run_dir)
        return self.score_video(video, prompt)

    def score_videos(self, videos: Sequence[tuple[str, Path]]) -> FolderScore:
        """Score (prompt, video file) pairs (see :func:`videos_to_score`): per prompt, and their mean."""
        per_prompt = {prompt: self.score_video(video, prompt) for prompt, video in videos}
        return FolderScore(per_prompt, math.fsum(per_prompt.values()) / len(per_prompt))


def run_video(run_dir: str | Path) -> tuple[str, Path]:
    """(prompt, orbit video) of a run directory: config.yaml's `prompt` and renders/orbit.mp4, both checked."""
    prompt = read_run_prompt(run_dir)
    video = Path(run_dir) / RUN_VIDEO
    if not video.is_file():
        raise FileNotFoundError(f"{str(video)!r} does not exist; render the run's orbit video first")
    return prompt, video


def folder_videos(folder: str | Path, prompts: Mapping[str, str] | None = None) -> list[tuple[str, Path]]:
    """(prompt, video) for every video in `folder`, the prompt spelt by its file name (or `prompts`, file stem
    -> prompt); a folder without videos, an unused override or two videos of one prompt are ValueErrors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {str(folder)!r} is not a directory")
    videos = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise ValueError(f"folder {str(folder)!r} holds no videos ({', '.join(VIDEO_SUFFIXES)})")
    overrides = dict(prompts or {})
    unused = set(overrides) - {p.stem for p in videos}
    if unused:
        raise ValueError(f"prompts names file stems with no video in {str(folder)!r}: {sorted(unused)}")
    pairs: dict[str, Path] = {}
    for video in videos:
        prompt = overrides.get(video.stem) or prompt_from_filename(video)
        if prompt in pairs:
            raise ValueError(f"two videos in {str(folder)!r} map to the prompt {prompt!r}; keep one")
        pairs[prompt] = video
    return list(pairs.items())


def videos_to_score(path: str | Path, prompt: str | None = None) -> list[tuple[str, Path]]:
    """The (prompt, video) pairs :func:`score_path` scores for `path` (run directory, video file or folder of
    videos), found and checked without CLIP: a wrong path fails in a moment, before the model loads."""
    path = Path(path)
    if path.is_dir() and (path / RUN_CONFIG).is_file():
        if prompt is not None:
            raise ValueError("--prompt applies to a single video; a run's prompt comes from its config.yaml")
        return [run_video(path)]
    if path.is_file():
        return [(prompt or prompt_from_filename(path), path)]
    if path.is_dir():
        if prompt is not None:
            raise ValueError("--prompt applies to a single video; a folder's prompts come from file names")
        return folder_videos(path)
    raise FileNotFoundError(f"{str(path)!r} does not exist; pass a run directory, a video or a video folder")


def score_path(scorer: CLIPScorer, path: str | Path, prompt: str | None = None) -> FolderScore:
    """Score a run directory, a video file or a folder of videos; one entry per prompt and the mean."""
    return scorer.score_videos(videos_to_score(path, prompt))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.clip_score", description="CLIP score (paper §4.1) of a run, a video or a folder."
    )
    parser.add_argument("path", help="run directory (config.yaml + renders/orbit.mp4), video file, or folder")
    parser.add_argument(
        "--pretrained",
        default=DEFAULT_PRETRAINED,
        help="open_clip tag, local checkpoint file, or 'none' for random weights (smoke tests only)",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL_NAME, help="open_clip model name")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--batch-size", type=int, default=32, help="frames per image-encoder batch")
    parser.add_argument("--prompt", default=None, help="prompt of a single video (default: its file name)")
    parser.add_argument("--json", action="store_true", help="print JSON {per_prompt, mean}")
    args = parser.parse_args(argv)

    pretrained = None if args.pretrained.lower() == "none" else args.pretrained
    try:
        # The inputs first: a mistyped path is reported at once, not after seconds of loading CLIP (and not
        # hidden behind a missing-weights error when offline).
        videos = videos_to_score(args.path, args.prompt)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if pretrained is None:
            print("warning: --pretrained none uses random weights; the score is meaningless", file=sys.stderr)
        scorer = CLIPScorer(
            model_name=args.model, pretrained=pretrained, device=args.device, batch_size=args.batch_size
        )
        result = scorer.score_videos(videos)
    except (ValueError, TypeError, FileNotFoundError, CLIPWeightsError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)  # one line, no traceback: the message names the fix
        return 2
    if args.json:
        payload = {"path": str(args.path), "per_prompt": result.per_prompt, "mean": result.mean}
        print(json.dumps(payload, indent=2))
    else:
        for prompt, value in result.per_prompt.items():
            print(f"{value:8.3f}  {prompt}")
        print(f"{result.mean:8.3f}  mean over {len(result.per_prompt)} prompt(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
