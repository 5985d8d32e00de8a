"""Videos and image grids of a field: writers, captions, depth colours, and the paper's Fig. 1 grid.

The camera paths (orbit, static orbit, fixed view) are fourdfy/render/trajectories.py's and frames are
rendered by fourdfy/render/views.py's render_views. Depth frames are coloured with a matplotlib colour map
over the camera's span of the scene sphere.
Captions (the prompt on a white band above the frames) are for people; ``renders/orbit.mp4`` stays
caption-free because CLIP scoring and the user study read it, and rendered text would leak into both.

Every file is written through :func:`atomic_output` (fourdfy/atomic.py's atomic_path after a check that
the folder is writable), so an interrupted export never leaves a truncated file under the final name.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, features

from fourdfy.atomic import atomic_path
from fourdfy.render.trajectories import orbit_cameras
from fourdfy.render.views import WHITE, render_views
from fourdfy.render.volume import Background, Field, Renderer

# Captions: frames narrower than this are enlarged (nearest neighbour, integer factor) before the band
# is added, so that the prompt stays legible on toy-sized (16–64 px) renders.
CAPTION_MIN_WIDTH = 256
CAPTION_FONT_SIZE = 12  # Pillow's default font (Aileron) at this size
CAPTION_MARGIN = 4  # pixels around the caption text


class OutputFolderError(OSError):
    """An export folder that cannot be created or written to."""


# ----------------------------------------------------------------------------------------------
# Atomic files


def _not_writable(folder: Path, err: OSError) -> OutputFolderError:
    return OutputFolderError(
        f"output folder {folder} is not writable ({err.strerror or err}); choose a writable folder "
        "(`fourdfy export RUN_DIR --out DIR`) or fix its permissions"
    )


def ensure_writable_dir(folder: Path) -> Path:
    """Create ``folder`` if needed and check that a file can be written in it (a real probe, which also
    catches read-only mounts where permission bits say yes). Raises OutputFolderError naming the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise _not_writable(folder, err) from err
    return folder


def check_writable_dir(folder: Path) -> None:
    """Check, creating nothing, that ``folder`` could be created and written to: the same probe as
    :func:`ensure_writable_dir` in the folder or, when it does not exist yet, in its nearest existing parent
    (which must be a folder). For checks before any work: a refused export leaves no empty folder behind."""
    folder = Path(folder)
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(existing))
        with tempfile.TemporaryFile(dir=existing):  # removed on close: nothing is left behind
            pass
    except OSError as err:
        raise _not_writable(folder, err) from err


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """:func:`fourdfy.atomic.atomic_path` for an export: first create the folder and check that it is writable
    (:func:`ensure_writable_dir`), so an unwritable folder is reported by name rather than as a failed write.
    """
    path = Path(path)
    ensure_writable_dir(path.parent)
    with atomic_path(path) as tmp:
        yield tmp


def _to_uint8(rgb: torch.Tensor | np.ndarray) -> np.ndarray:
    """[..., 3] in [0,1] -> uint8 numpy (values outside [0,1] are clipped to the displayable range)."""
    rgb = torch.as_tensor(rgb)
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


# ----------------------------------------------------------------------------------------------
# The views×time grid


@torch.no_grad()
def render_views_by_time(
    field: Field, renderer: Renderer, n_views: int, n_times: int, size: int, background: Background | None,
) -> torch.Tensor:
    """Paper Fig. 1: rows are viewpoints around the object (azimuths 360°/n_views apart), columns are
    time steps linspace(0, 1, n_times). Returns [V, T, H, W, 3]."""
    if not isinstance(n_times, int) or n_times < 1:
        raise ValueError(f"n_times must be a positive int, got {n_times!r}")
    cams = orbit_cameras(n_views)
    times = torch.linspace(0.0, 1.0, n_times)
    rows = []
    for v in range(n_views):
        rows.append(render_views(field, renderer, cams[[v] * n_times], times, size, background)["rgb"])
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------
# Depth colouring and captions


def colorize_depth(
    depth: torch.Tensor, opacity: torch.Tensor, near: float, far: float, colormap: str = "turbo",
    background: torch.Tensor | tuple[float, float, float] = WHITE,
) -> torch.Tensor:
    """Depth frames [..., H, W] as colours [..., H, W, 3] in [0,1].

    The colour map runs from ``near`` (its top end) to ``far`` (its bottom end), fixed for the whole video
    so colours do not flicker; each pixel is blended over ``background`` by its opacity, so empty space
    looks like the rgb renders' background. Depths beyond [near, far] take the end colours.
    """
    import matplotlib

    if not far > near:
        raise ValueError(f"far must be > near for the depth colour map, got near={near}, far={far}")
    if depth.shape != opacity.shape:
        raise ValueError(f"depth and opacity must have the same shape, got {tuple(depth.shape)} and "
                         f"{tuple(opacity.shape)}")
    try:
        cmap = matplotlib.colormaps[colormap]
    except KeyError as err:
        raise ValueError(f"unknown matplotlib colour map {colormap!r} (eval.depth_colormap); try 'turbo', "
                         "'viridis', 'magma' or 'gray'") from err
    closeness = ((far - depth.double()) / (far - near)).clamp(0.0, 1.0).cpu().numpy()
    colours = torch.from_numpy(cmap(closeness)[..., :3]).float()
    alpha = opacity.float().clamp(0.0, 1.0).cpu()[..., None]
    return alpha * colours + (1.0 - alpha) * torch.as_tensor(background, dtype=torch.float32).cpu()


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's default font; sizable only when Pillow has FreeType (the bitmap fallback has one size).
    return ImageFont.load_default(size) if features.check("freetype2") else ImageFont.load_default()


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to lines of at most ``width`` pixels; a word longer than a line is split."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if draw.textlength(candidate, font=font) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for ch in word:  # a word wider than the frame: break it between characters
            if line and draw.textlength(line + ch, font=font) > width:
                lines.append(line)
                line = ""
            line += ch
    if line:
        lines.append(line)
    return lines or [""]


def caption_band(text: str, width: int, font_size: int = CAPTION_FONT_SIZE) -> np.ndarray:
    """The prompt drawn in black on a white band ``width`` pixels wide: uint8 [h, width, 3]."""
    font = _font(font_size)
    lines = _wrap(text, font, max(1, width - 2 * CAPTION_MARGIN))
    ascent, descent = font.getmetrics()
    line_height = ascent + descent + 2
    height = 2 * CAPTION_MARGIN + line_height * len(lines)
    band = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        x = max(0.0, (width - draw.textlength(line, font=font)) / 2)  # centred
        draw.text((x, CAPTION_MARGIN + i * line_height), line, fill=(0, 0, 0), font=font)
    return np.asarray(band)


def add_caption(
    frames: torch.Tensor | np.ndarray, text: str, min_width: int = CAPTION_MIN_WIDTH
) -> np.ndarray:
    """Frames [T, H, W, 3] (float in [0,1] or uint8) with ``text`` on a white band above them.

    Frames narrower than ``min_width`` are first enlarged by the smallest integer factor that reaches it
    (nearest neighbour: pixels stay sharp), so the caption is legible. Returns uint8 [T, k·H + band, k·W, 3].
    """
    array = np.asarray(frames) if isinstance(frames, np.ndarray) else _to_uint8(frames)
    if array.dtype != np.uint8:
        array = _to_uint8(torch.from_numpy(array))
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {tuple(array.shape)}")
    factor = max(1, math.ceil(min_width / array.shape[2]))
    if factor > 1:
        array = array.repeat(factor, axis=1).repeat(factor, axis=2)
    band = caption_band(text, array.shape[2])
    return np.concatenate([np.broadcast_to(band, (array.shape[0], *band.shape)), array], axis=1)


# ----------------------------------------------------------------------------------------------
# Writers


def _pad_even(array: np.ndarray) -> np.ndarray:
    """Pad [T, H, W, 3] with white to even H and W: libx264's yuv420p stores chroma per 2×2 block."""
    pad_h, pad_w = array.shape[1] % 2, array.shape[2] % 2
    if pad_h == 0 and pad_w == 0:
        return array
    return np.pad(array, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), constant_values=255)


def write_video(
    frames: torch.Tensor | np.ndarray, path: Path, fps: float = 15, caption: str | None = None
) -> Path:
    """Write frames [T,H,W,3] (float in [0,1] or uint8) as mp4 (libx264, imageio-ffmpeg) or gif, atomically.

    caption: text drawn above the frames (see :func:`add_caption`); None writes the frames as they are.
    """
    path = Path(path)
    if path.suffix not in (".mp4", ".gif"):
        raise ValueError(f"video path must end in .mp4 or .gif, got {path.name!r}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if caption is not None:
        array = add_caption(frames, caption)
    else:
        array = frames if isinstance(frames, np.ndarray) else _to_uint8(frames)
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] < 1:
        raise ValueError(f"frames must be [T, H, W, 3] with T >= 1, got {tuple(array.shape)}")
    with atomic_output(path) as tmp:
        if path.suffix == ".gif":
            # GIF stores delays in 1/100 s; loop=0 repeats forever.
            iio.imwrite(tmp, array, duration=1000 / fps, loop=0)
        else:
            # macro_block_size=1 keeps small toy frames at their size instead of padding to 16.
            iio.imwrite(tmp, _pad_even(array), fps=fps, codec="libx264", macro_block_size=1)
    return path


def tile_grid(grid: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Tile [V, T, H, W, 3] into one image [V·(H+pad)+pad, T·(W+pad)+pad, 3] with white gutters."""
    if grid.ndim != 5 or grid.shape[-1] != 3:
        raise ValueError(f"grid must be [V, T, H, W, 3], got {tuple(grid.shape)}")
    v, t, h, w, _ = grid.shape
    canvas = torch.ones(v * (h + pad) + pad, t * (w + pad) + pad, 3)
    for i in range(v):
        for j in range(t):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = grid[i, j].cpu()
    return canvas


def write_grid(grid: torch.Tensor, path: Path, pad: int = 2, caption: str | None = None) -> Path:
    """Tile a [V,T,H,W,3] grid (rows: views, columns: times) into one PNG, atomically; caption above it."""
    canvas = tile_grid(grid, pad)
    image = add_caption(canvas[None], caption)[0] if caption is not None else _to_uint8(canvas)
    with atomic_output(Path(path)) as tmp:
        iio.imwrite(tmp, image)
    return Path(path)
