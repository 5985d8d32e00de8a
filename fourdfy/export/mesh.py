"""Meshes of a 4D field: marching cubes of the density at T times, a PLY/OBJ sequence and one animated .glb.

For each time t_k = k/(T−1) (k = 0..T−1; t = 0 when T = 1) the density is sampled on a
resolution³ grid spanning the scene box [−r, r]³, padded with one layer of zeros (the field is empty
outside the box, and the padding closes surfaces that touch the box), and the iso-surface at
``threshold`` is extracted with scikit-image's marching cubes (Lewiner). Vertex colours are the colour
head evaluated at the vertices at t_k. Triangles wind counter-clockwise seen from outside.

The animated .glb holds one node per frame under a root node that turns the z-up world into glTF's
y-up; each frame node's scale is animated with STEP interpolation at key times k/fps (k = 0..T):
frame k has scale 1 on [k/fps, (k+1)/fps) and 0 otherwise, so viewers play the T meshes in order and
loop after T/fps seconds.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fourdfy.errors import import_extra
from fourdfy.export.video import atomic_output, ensure_writable_dir
from fourdfy.render.views import field_device
from fourdfy.render.volume import Field

MESH_FORMATS = ("ply", "obj")
_FRAME_NAME = re.compile(r"^frame_(\d{3,})\.(ply|obj)$")
# A z-up world seen in glTF's y-up frame: −90° about x maps (x, y, z) to (x, z, −y); quaternion (x, y, z, w).
_Z_UP_TO_Y_UP = [-math.sqrt(0.5), 0.0, 0.0, math.sqrt(0.5)]


class EmptyMeshError(ValueError):
    """The density never crosses the threshold: marching cubes would give no surface."""


@dataclass
class TriMesh:
    """A coloured triangle mesh of the field at one time."""

    vertices: np.ndarray  # [V, 3] float32 world coordinates (z-up)
    faces: np.ndarray  # [F, 3] int64 vertex indices, counter-clockwise seen from outside
    colors: np.ndarray  # [V, 3] uint8 vertex colours from the colour head
    time: float  # t in [0, 1]


def mesh_times(n_frames: int) -> list[float]:
    """The T times meshed: linspace(0, 1, T) (just [0.0] when T = 1)."""
    if not isinstance(n_frames, int) or isinstance(n_frames, bool) or n_frames < 1:
        raise ValueError(f"the number of mesh frames must be a positive int, got {n_frames!r}")
    return torch.linspace(0.0, 1.0, n_frames).tolist() if n_frames > 1 else [0.0]


def _check_grid_args(resolution: int, box_radius: float) -> None:
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 2:
        raise ValueError(f"mesh resolution must be an int >= 2 (grid points per side), got {resolution!r}")
    if not box_radius > 0:
        raise ValueError(f"box_radius must be > 0 (the scene box is [-r, r]^3), got {box_radius}")


def _check_threshold(threshold: float) -> None:
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"mesh threshold must be a finite density > 0 (density is >= 0 and 0 outside the "
                         f"object), got {threshold}")


@torch.no_grad()
def _query(field: Field, points: torch.Tensor, t: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """field at points [N, 3] and time t, chunk points per call. Returns CPU (density [N], rgb [N, 3])."""
    device = field_device(field)
    densities, colours = [], []
    for start in range(0, points.shape[0], chunk):
        x = points[start : start + chunk].to(device)
        density, rgb = field(x, torch.full((x.shape[0],), float(t), device=device))
        densities.append(density.float().cpu())
        colours.append(rgb.float().cpu())
    return torch.cat(densities), torch.cat(colours)


def density_grid(
    field: Field, t: float, resolution: int, box_radius: float, chunk: int = 1 << 16
) -> np.ndarray:
    """Density at time t on resolution³ points spanning [−r, r]³ (ends included): float32 [R, R, R],
    indexed [ix, iy, iz] (x varies along the first axis)."""
    _check_grid_args(resolution, box_radius)
    axis = torch.linspace(-box_radius, box_radius, resolution)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    density, _ = _query(field, points, t, chunk)
    return density.reshape(resolution, resolution, resolution).numpy()


def extract_mesh(
    field: Field, t: float, resolution: int, threshold: float, box_radius: float, chunk: int = 1 << 16,
) -> TriMesh:
    """The iso-surface density = threshold of ``field`` at time t (see the module docstring).

    Raises EmptyMeshError, naming the density range found, when the density never reaches the threshold.
    """
    from skimage.measure import marching_cubes

    _check_threshold(threshold)
    volume = density_grid(field, t, resolution, box_radius, chunk)
    peak = float(volume.max())
    if not peak > threshold:
        raise EmptyMeshError(
            f"no surface at t={t:.3f}: the density peaks at {peak:.4g}, below the mesh threshold "
            f"{threshold:g} (grid {resolution}^3); lower the threshold (e.g. --threshold {peak / 2:.3g})"
        )
    spacing = 2.0 * box_radius / (resolution - 1)
    padded = np.pad(volume, 1, constant_values=0.0)  # index 0 of padded sits at −r − spacing
    verts, faces, _, _ = marching_cubes(padded, level=threshold, spacing=(spacing,) * 3,
                                        allow_degenerate=False)
    vertices = (verts - (box_radius + spacing)).astype(np.float32)
    # For a density (object above the level) indexed [ix, iy, iz], scikit-image's triangles wind clockwise
    # seen from outside (signed volume < 0); reversed, they face outwards as glTF and trimesh expect.
    faces = np.ascontiguousarray(faces[:, ::-1]).astype(np.int64)
    _, rgb = _query(field, torch.from_numpy(vertices), t, chunk)
    colors = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return TriMesh(vertices=vertices, faces=faces, colors=colors, time=float(t))


def check_mesh_settings(n_frames: int, resolution: int, threshold: float, box_radius: float) -> None:
    """ValueError naming the setting, for what extract_mesh_sequence would refuse; checked before any work."""
    _check_threshold(threshold)
    _check_grid_args(resolution, box_radius)
    mesh_times(n_frames)


def extract_mesh_sequence(
    field: Field, n_frames: int, resolution: int, threshold: float, box_radius: float, chunk: int = 1 << 16,
) -> list[TriMesh]:
    """Meshes at mesh_times(n_frames). All frames are extracted before anything is written, and the first
    empty frame raises EmptyMeshError, so a bad threshold never leaves a partial or empty set of files."""
    check_mesh_settings(n_frames, resolution, threshold, box_radius)
    meshes = []
    for k, t in enumerate(mesh_times(n_frames)):
        try:
            meshes.append(extract_mesh(field, t, resolution, threshold, box_radius, chunk))
        except EmptyMeshError as err:
            raise EmptyMeshError(
                f"mesh frame {k} of {n_frames} is empty, so nothing was written: {err}"
            ) from None
    return meshes


# ----------------------------------------------------------------------------------------------
# Files


def _trimesh(mesh: TriMesh):  # -> trimesh.Trimesh (imported lazily: an optional dependency)
    trimesh = import_extra("trimesh", "writing PLY/OBJ meshes")
    rgba = np.concatenate([mesh.colors, np.full((len(mesh.colors), 1), 255, np.uint8)], axis=1)
    # process=False: keep the vertices exactly as extracted (no merging), so counts match the .glb.
    return trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, vertex_colors=rgba, process=False)


def write_mesh(mesh: TriMesh, path: Path) -> Path:
    """One mesh with vertex colours as .ply (binary) or .obj (colours as `v x y z r g b`), atomically."""
    path = Path(path)
    kind = path.suffix.lstrip(".")
    if kind not in MESH_FORMATS:
        raise ValueError(f"mesh path must end in one of {['.' + f for f in MESH_FORMATS]}, got {path.name!r}")
    data = _trimesh(mesh).export(file_type=kind)
    with atomic_output(path) as tmp:
        tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def check_mesh_formats(formats: list[str] | tuple[str, ...]) -> None:
    """Raise ValueError unless ``formats`` is a non-empty subset of MESH_FORMATS (eval.mesh_formats)."""
    if not formats or any(f not in MESH_FORMATS for f in formats):
        raise ValueError(
            f"mesh formats (eval.mesh_formats) must be a non-empty subset of {list(MESH_FORMATS)}, "
            f"got {list(formats)}"
        )


def check_fps(fps: float) -> None:
    """Raise ValueError unless fps is a finite rate > 0 (eval.mesh_fps)."""
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"mesh fps (eval.mesh_fps) must be > 0, got {fps}")


def write_mesh_sequence(meshes: list[TriMesh], folder: Path, formats: list[str] | tuple[str, ...] = ("ply",),
                        **info: float | int) -> list[Path]:
    """Write frame_000.<fmt>, frame_001.<fmt>, ... and frames.json (times and ``info``, e.g. the threshold)
    in ``folder``; frames of those formats left from an earlier, longer export are removed."""
    check_mesh_formats(formats)
    if not meshes:
        raise ValueError("no meshes to write")
    folder = ensure_writable_dir(Path(folder))
    paths = [write_mesh(m, folder / f"frame_{k:03d}.{fmt}") for fmt in formats for k, m in enumerate(meshes)]
    for old in folder.iterdir():
        match = _FRAME_NAME.match(old.name)
        if match and match.group(2) in formats and int(match.group(1)) >= len(meshes):
            old.unlink()
    index = {"times": [m.time for m in meshes], "n_vertices": [len(m.vertices) for m in meshes], **info}
    with atomic_output(folder / "frames.json") as tmp:
        tmp.write_text(json.dumps(index, indent=2))
    return paths


def _pad4(blob: bytearray) -> None:
    blob.extend(b"\x00" * (-len(blob) % 4))  # glTF: every accessor starts on a 4-byte boundary


def build_animated_gltf(meshes: list[TriMesh], fps: float):  # -> pygltflib.GLTF2
    """The glTF document of :func:`write_animated_glb` (binary blob attached)."""
    g = import_extra("pygltflib", "writing mesh.glb")  # an optional dependency

    if not meshes:
        raise ValueError("no meshes to animate")
    check_fps(fps)
    blob = bytearray()
    gltf = g.GLTF2(
        asset=g.Asset(generator="fourdfy"),
        scene=0,
        extensionsUsed=["KHR_materials_unlit"],
        # Unlit: vertex colours are the field's radiance (already shaded); lighting them again would darken.
        materials=[g.Material(
            pbrMetallicRoughness=g.PbrMetallicRoughness(
                baseColorFactor=[1.0, 1.0, 1.0, 1.0], metallicFactor=0.0, roughnessFactor=1.0
            ),
            doubleSided=True, extensions={"KHR_materials_unlit": {}}, name="vertex_colors",
        )],
    )

    def add_accessor(array: np.ndarray, kind: str, component: int, target: int | None, bounds: bool) -> int:
        _pad4(blob)
        gltf.bufferViews.append(
            g.BufferView(buffer=0, byteOffset=len(blob), byteLength=array.nbytes, target=target)
        )
        blob.extend(array.tobytes())
        accessor = g.Accessor(bufferView=len(gltf.bufferViews) - 1, componentType=component, count=len(array),
                              type=kind)
        if bounds:  # required for POSITION and animation inputs
            flat = array.reshape(len(array), -1)
            accessor.min = flat.min(axis=0).astype(float).tolist()
            accessor.max = flat.max(axis=0).astype(float).tolist()
        gltf.accessors.append(accessor)
        return len(gltf.accessors) - 1

    frame_nodes = []
    for k, mesh in enumerate(meshes):
        position = add_accessor(mesh.vertices.astype(np.float32), g.VEC3, g.FLOAT, g.ARRAY_BUFFER, True)
        color = add_accessor((mesh.colors.astype(np.float32) / 255.0), g.VEC3, g.FLOAT, g.ARRAY_BUFFER, False)
        indices = add_accessor(mesh.faces.astype(np.uint32).reshape(-1), g.SCALAR, g.UNSIGNED_INT,
                               g.ELEMENT_ARRAY_BUFFER, False)
        gltf.meshes.append(g.Mesh(name=f"frame_{k:03d}", primitives=[g.Primitive(
            attributes=g.Attributes(POSITION=position, COLOR_0=color), indices=indices, material=0,
        )]))
        # Only frame 0 shows in viewers that ignore animations.
        scale = [1.0, 1.0, 1.0] if k == 0 else [0.0, 0.0, 0.0]
        gltf.nodes.append(g.Node(mesh=k, name=f"frame_{k:03d}", scale=scale, extras={"time": mesh.time}))
        frame_nodes.append(k)
    root = len(gltf.nodes)
    gltf.nodes.append(g.Node(name="fourdfy_z_up", rotation=_Z_UP_TO_Y_UP, children=frame_nodes))
    gltf.scenes.append(g.Scene(nodes=[root]))

    n = len(meshes)
    key_times = np.arange(n + 1, dtype=np.float32) / np.float32(fps)
    times_accessor = add_accessor(key_times, g.SCALAR, g.FLOAT, None, True)
    animation = g.Animation(name="frames")
    for k in range(n):
        visible = np.zeros((n + 1, 3), np.float32)
        visible[k] = 1.0
        if k == n - 1:
            visible[n] = 1.0  # the last key closes the loop with the last frame still shown
        output = add_accessor(visible, g.VEC3, g.FLOAT, None, False)
        animation.samplers.append(g.AnimationSampler(input=times_accessor, output=output,
                                                     interpolation=g.ANIM_STEP))
        animation.channels.append(g.AnimationChannel(sampler=k, target=g.AnimationChannelTarget(node=k,
                                                                                               path=g.SCALE)))
    gltf.animations.append(animation)
    _pad4(blob)
    gltf.buffers.append(g.Buffer(byteLength=len(blob)))
    gltf.set_binary_blob(bytes(blob))
    return gltf


def write_animated_glb(meshes: list[TriMesh], path: Path, fps: float) -> Path:
    """One binary glTF that plays ``meshes`` in order at ``fps`` frames per second, atomically."""
    path = Path(path)
    if path.suffix != ".glb":
        raise ValueError(f"animated mesh path must end in .glb, got {path.name!r}")
    data = b"".join(build_animated_gltf(meshes, fps).save_to_bytes())
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return path
