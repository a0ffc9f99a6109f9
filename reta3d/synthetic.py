"""The embedded synthetic dataset: procedurally textured template heads, rendered by this
project's own head model and rasterizer, written in the FFHQ-style folder layout
(`reta3d.data.folder`), so the same builder and loader serve it and real FFHQ.

Each image is a different identity and condition:
- texture: skin tone (a palette spanning light to dark, jittered), a hair cap (colour and
  hairline height), eyes (sclera, iris colour, pupil), lips (colour), and baked Lambertian
  shading from a random key light;
- FLAME: random shape, expression, jaw opening, neck pose and eye gaze;
- camera: EG3D's look-at sampler around (0, 0, 0.2) at radius 2.7 with FFHQ's intrinsics,
  random yaw and pitch; global_pose is zero (the camera carries the head rotation, as in
  EG3D's FFHQ labels).
The Gaussians sit on the surface (zero offsets), flattened along the normal, sized to the
local texel spacing so the surface is closed, nearly opaque.
"""
from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import rasterizer
from rasterizer.types import look_at_eg3d_label
from reta3d import binding as binding_lib
from reta3d import errors
from reta3d import flame as flame_lib
from reta3d.data import folder as folder_lib

SKIN_TONES = np.array([[0.96, 0.80, 0.69], [0.90, 0.72, 0.58], [0.80, 0.60, 0.46],
                       [0.66, 0.46, 0.34], [0.50, 0.34, 0.24], [0.36, 0.24, 0.17]], np.float32)
HAIR_COLOURS = np.array([[0.08, 0.06, 0.05], [0.25, 0.16, 0.09], [0.45, 0.30, 0.16],
                         [0.78, 0.62, 0.38], [0.55, 0.22, 0.10], [0.60, 0.60, 0.60]], np.float32)
IRIS_COLOURS = np.array([[0.30, 0.18, 0.08], [0.20, 0.35, 0.55], [0.25, 0.40, 0.25],
                         [0.12, 0.08, 0.05]], np.float32)


def _logit(p):
    p = np.clip(p, 1e-3, 1 - 1e-3)
    return np.log(p / (1 - p))


def texel_geometry(model, head_binding):
    """Rest-pose facts per Gaussian (face texels then mouth texels), numpy:
    points (N,3) FLAME coords, normals (N,3), on_eye (N,) bool, spacing (N,) world units."""
    v = jnp.asarray(model.v_template)[None]
    normals_v = flame_lib.vertex_normals(v, model.faces)
    points, normals, eye, spacing = [], [], [], []
    eye_weight = np.asarray(model.weights)[:, 3:5].sum(axis=1)
    faces = np.asarray(model.faces)
    for tb in (head_binding.face, head_binding.mouth):
        p = np.array(binding_lib.texel_points(v, model.faces, tb))[0]
        n = np.array(binding_lib.texel_points(normals_v, model.faces, tb))[0]
        n /= np.linalg.norm(n, axis=-1, keepdims=True) + 1e-12
        corner_eye = eye_weight[faces[tb.face_index]].mean(axis=1)
        # Texel spacing on the surface: distance to the right/lower neighbour texel, robustly.
        grid = np.full((tb.resolution, tb.resolution, 3), np.nan, np.float32)
        grid[tb.texel_rc[:, 0], tb.texel_rc[:, 1]] = p
        d = []
        for axis in (0, 1):
            diff = np.linalg.norm(np.diff(grid, axis=axis), axis=-1)
            pad = [(0, 0), (0, 0)]
            pad[axis] = (0, 1)
            d.append(np.pad(diff, pad, constant_values=np.nan))
        both = np.stack(d)
        # Texels with no valid right/lower neighbour get the median spacing below.
        local = np.where(np.isnan(both).all(axis=0), np.inf,
                         np.fmin(both[0], both[1]))[tb.texel_rc[:, 0], tb.texel_rc[:, 1]]
        fallback = np.median(local[np.isfinite(local)])
        local = np.where(np.isfinite(local), local, fallback)
        local = np.minimum(local, 4 * fallback)  # UV seams give long jumps
        points.append(p)
        normals.append(n)
        eye.append(corner_eye > 0.5)
        spacing.append(local * model.world_scale)
    return (np.concatenate(points), np.concatenate(normals), np.concatenate(eye),
            np.concatenate(spacing))


def random_textures(rng, geometry, model, count):
    """(count, N, 3) colours in [0,1] for `count` random identities."""
    points, normals, on_eye, _ = geometry
    v = np.asarray(model.v_template)
    body = v[np.asarray(model.weights)[:, 3:5].sum(axis=1) < 0.5]
    lo, hi = body.min(axis=0), body.max(axis=0)
    rel = (points - lo) / (hi - lo)  # 0..1 box coordinates of the head
    out = np.empty((count,) + points.shape, np.float32)
    for i in range(count):
        skin = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.9, 1.08, 3)
        hair = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] * rng.uniform(0.85, 1.15, 3)
        iris = IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))]
        lips = np.array([0.70, 0.32, 0.32]) * rng.uniform(0.8, 1.1, 3)
        colour = np.broadcast_to(skin, points.shape).copy()
        # Hair cap: above a hairline that rises toward the face, and the back of the head.
        hairline = rng.uniform(0.72, 0.86)
        front = rel[:, 2]
        hair_mask = (rel[:, 1] > hairline + 0.18 * np.clip(front - 0.55, 0, 1)) | \
                    ((front < 0.35) & (rel[:, 1] > rng.uniform(0.35, 0.5)))
        colour[hair_mask] = hair
        # Lips: a band around the mouth opening (front of the face, low, central).
        lip_mask = (np.abs(rel[:, 0] - 0.5) < 0.16) & (np.abs(rel[:, 1] - 0.43) < 0.045) & \
                   (front > 0.8) & ~on_eye
        colour[lip_mask] = lips
        # Eyes: white sclera, coloured iris and a dark pupil on the front cap of each eyeball.
        if on_eye.any():
            facing = normals[:, 2]
            colour[on_eye] = [0.92, 0.92, 0.90]
            colour[on_eye & (facing > 0.85)] = iris
            colour[on_eye & (facing > 0.96)] = [0.03, 0.03, 0.03]
        # Baked Lambertian shading from a random key light plus ambient.
        light = np.array([rng.uniform(-0.6, 0.6), rng.uniform(0.1, 0.7), 1.0])
        light /= np.linalg.norm(light)
        shade = 0.55 + 0.45 * np.clip(normals @ light, 0, 1)
        out[i] = np.clip(colour * shade[:, None], 0, 1)
    return out


def _features(colours, geometry, head_binding):
    """UV feature maps (face (B,R,R,14), mouth (B,Rm,Rm,14)) that decode to the given colours:
    zero offsets, scales = texel spacing (thin along the normal), opacity 0.98."""
    _, _, _, spacing = geometry
    count, num = colours.shape[:2]
    feats = np.zeros((count, num, 14), np.float32)
    # Raw scales relative to the binding's own γs, so they decode to these world sizes.
    tangent = np.log(np.maximum(spacing, 1e-6) * 0.75) - head_binding.log_gamma_s[None]
    feats[:, :, 3] = tangent - math.log(3.0)  # local x = normal: flatter
    feats[:, :, 4] = tangent
    feats[:, :, 5] = tangent
    feats[:, :, 6] = 1.0                      # identity quaternion (w=1) in the local frame
    feats[:, :, 10:13] = _logit(colours)
    feats[:, :, 13] = _logit(0.98)
    nf = head_binding.num_face
    face = binding_lib.scatter_texels(jnp.asarray(feats[:, :nf]), head_binding.face)
    mouth = binding_lib.scatter_texels(jnp.asarray(feats[:, nf:]), head_binding.mouth)
    return face, mouth


def random_flame(rng, model, count):
    """FLAME parameters (count, k) within the model's sizes."""
    s = model.num_shape
    e = model.num_expression
    return {
        "shape": (rng.standard_normal((count, s)) * 0.8).astype(np.float32),
        "expression": (rng.standard_normal((count, e)) * 0.6).astype(np.float32),
        "global_pose": np.zeros((count, 3), np.float32),
        "neck_pose": (rng.standard_normal((count, 3)) * [0.08, 0.1, 0.04]).astype(np.float32),
        "jaw_pose": np.stack([rng.uniform(0.0, 0.35, count), np.zeros(count),
                              np.zeros(count)], 1).astype(np.float32),
        "eye_pose": (rng.standard_normal((count, 6)) * 0.08).astype(np.float32),
    }


def random_cameras(rng, count):
    return np.stack([look_at_eg3d_label(rng.uniform(-0.6, 0.6), rng.uniform(-0.25, 0.25))
                     for _ in range(count)])


def make_synthetic_dataset(path, num_images: int, resolution: int, seed: int = 0,
                           background: float = 1.0, flame_model=None, batch: int = 16,
                           uv_resolution: int = 128, mouth_resolution: int = 32):
    """Renders `num_images` random heads at `resolution`² and writes the dataset folder, with
    its recipe (RECIPE_FILE, `recipe`; a FLAME model's name under "head_model").

    With background 1.0 (white, the default) the images are RGBA PNGs with straight alpha (the
    rendered colour over black divided by alpha): the folder reader's composite over white
    (`folder.flatten_alpha`) gives the white-background render to within rounding, and the
    matte is there for a discriminator that sees alpha (`config.disc.alpha_channel`). With
    any other background they are RGB, rendered over it, without a matte.

    Returns the folder path. Deterministic for a seed. Replaces an earlier synthetic dataset
    at `path`; raises `errors.InputError` for a folder holding anything else
    (`check_replaceable`).
    """
    if num_images <= 0:
        raise ValueError(f"num_images must be positive, got {num_images}")
    check_replaceable(path)
    model = flame_lib.load() if flame_model is None else flame_model
    hb = binding_lib.HeadBinding.from_model(model, uv_resolution, mouth_resolution)
    geometry = texel_geometry(model, hb)
    rng = np.random.default_rng(seed)
    straight_alpha = writes_matte(background)

    @jax.jit
    def render_batch(face, mouth, flame, cameras25):
        gaussians, _ = binding_lib.head_gaussians(model, hb, face, mouth, flame, "consecutive")
        camera = rasterizer.Camera.from_eg3d(cameras25, resolution)
        out = rasterizer.render(gaussians, camera, background=jnp.full((3,), background),
                                backend="jax")
        if not straight_alpha:
            return out.color
        # The render over black is the premultiplied colour: divide by alpha for PNG's
        # straight alpha (where alpha is 0 the colour does not matter).
        premultiplied = out.color - (1.0 - out.alpha[..., None]) * background
        colour = premultiplied / jnp.maximum(out.alpha[..., None], 1e-6)
        return jnp.concatenate([jnp.clip(colour, 0.0, 1.0), out.alpha[..., None]], -1)

    images, labels, flames = [], [], []
    for start in range(0, num_images, batch):
        n = min(batch, num_images - start)
        colours = random_textures(rng, geometry, model, n)
        flame = random_flame(rng, model, n)
        cameras = random_cameras(rng, n)
        face, mouth = _features(colours, geometry, hb)
        pad = batch - n  # keep one compiled shape
        padded = lambda x: np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x
        color = render_batch(padded(np.asarray(face)), padded(np.asarray(mouth)),
                             {k: padded(v) for k, v in flame.items()}, padded(cameras))
        images.append(np.clip(np.round(np.asarray(color)[:n] * 255), 0, 255).astype(np.uint8))
        labels.append(cameras)
        flames.append(flame)
    flame_all = {k: np.concatenate([f[k] for f in flames]) for k in flames[0]}
    # The folder stores NUM_SHAPE / NUM_EXPRESSION coefficients: zero-pad the template's.
    flame_all["shape"] = np.pad(flame_all["shape"],
                                ((0, 0), (0, folder_lib.NUM_SHAPE - flame_all["shape"].shape[1])))
    flame_all["expression"] = np.pad(
        flame_all["expression"],
        ((0, 0), (0, folder_lib.NUM_EXPRESSION - flame_all["expression"].shape[1])))
    made = recipe(num_images, resolution, seed, background, uv_resolution, mouth_resolution)
    if model.name != TEMPLATE:
        made["head_model"] = model.name
    # The recipe goes in with the images (one rename): a folder with images always has one.
    return folder_lib.write_folder(path, np.concatenate(images), np.concatenate(labels),
                                   flame_all, overwrite=True,
                                   extra_files={RECIPE_FILE: json.dumps(made, indent=1)})


# Bumped whenever what the synthetic heads look like changes (cameras, γs, textures), so that
# a dataset built by an older version is rebuilt instead of silently trained on.
# 2: EG3D's exact look-at cameras (radius around the world origin); measured γs.
# 3: RGBA images (straight alpha) over a white background: the matte for config.disc.alpha_channel.
RECIPE_VERSION = 3
RECIPE_FILE = "synthetic.json"
TEMPLATE = "template_head"   # flame.load()'s name for the embedded head


def writes_matte(background: float) -> bool:
    """Whether `make_synthetic_dataset` with this background writes RGBA images with their
    matte (white, 1.0: the folder reader composites over white) or RGB over it."""
    return background == 1.0


def recipe(num_images: int, resolution: int, seed: int = 0, background: float = 1.0,
           uv_resolution: int = 128, mouth_resolution: int = 32) -> dict:
    """What `make_synthetic_dataset` was asked for, with the recipe version (a JSON dict)."""
    return {"version": RECIPE_VERSION, "num_images": int(num_images),
            "resolution": int(resolution), "seed": int(seed), "background": float(background),
            "uv_resolution": int(uv_resolution), "mouth_resolution": int(mouth_resolution)}


def check_replaceable(path) -> None:
    """Raises `errors.InputError` when `path` holds anything but a synthetic dataset written by
    `make_synthetic_dataset` (its RECIPE_FILE), so that building one there never deletes a
    user's photos or dataset. A missing or empty folder is fine."""
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise errors.InputError(f"{path} is a file, not a dataset folder")
    if path.is_dir() and any(path.iterdir()) and not (path / RECIPE_FILE).is_file():
        raise errors.InputError(
            f"{path} holds files that make_synthetic_dataset did not write (no {RECIPE_FILE}), "
            "which it never replaces")


def rebuild_reason(path, wanted: dict):
    """Why the synthetic dataset at `path` must be (re)built for `wanted` (a `recipe`), or None
    if it is up to date: missing, built by an older recipe version, or with other settings.
    Raises `errors.InputError` (`check_replaceable`) for a folder that is not a synthetic
    dataset."""
    path = pathlib.Path(path)
    check_replaceable(path)
    if not (path / folder_lib.LABELS_FILE).is_file():
        return "missing"
    try:
        have = json.loads((path / RECIPE_FILE).read_text())
    except (OSError, ValueError):
        return f"unreadable {RECIPE_FILE}"
    if have.get("version") != wanted["version"]:
        return f"recipe version {have.get('version')} -> {wanted['version']}"
    changed = sorted(k for k in wanted if have.get(k) != wanted[k])
    if have.get("head_model", TEMPLATE) != wanted.get("head_model", TEMPLATE):
        changed.append("head_model")
    return f"settings changed: {', '.join(changed)}" if changed else None


def _render(colours, flame, cameras25, resolution, uv_resolution, mouth_resolution,
            background, model):
    """The synthetic heads of `colours` (B, N, 3), or of one grey if None, rendered as
    `make_synthetic_dataset` builds them (4x the default capacity: no tile is dropped)."""
    hb = binding_lib.HeadBinding.from_model(model, uv_resolution, mouth_resolution)
    if colours is None:
        colours = np.full((np.asarray(cameras25).shape[0], hb.num_gaussians, 3), 0.5)
    face, mouth = _features(np.asarray(colours, np.float32), texel_geometry(model, hb), hb)
    gaussians, _ = binding_lib.head_gaussians(
        model, hb, face, mouth, {k: jnp.asarray(v) for k, v in flame.items()}, "consecutive")
    camera = rasterizer.Camera.from_eg3d(jnp.asarray(cameras25, jnp.float32), resolution)
    capacity = rasterizer.binning.default_capacity(hb.num_gaussians, resolution, resolution)
    return rasterizer.render(gaussians, camera, background=jnp.full((3,), background),
                             backend="jax", capacity=4 * capacity)


def render_heads(colours, flame, cameras25, resolution: int, uv_resolution: int = 128,
                 mouth_resolution: int = 32, background: float = 1.0, flame_model=None
                 ) -> np.ndarray:
    """The synthetic dataset's heads rendered anywhere: uint8 (B, R, R, 3) images of the
    identities `colours` (B, N, 3) in [0, 1] (`random_textures` with the same binding's
    `texel_geometry`) under FLAME parameters (B, k) and EG3D cameras (B, 25), built as
    `make_synthetic_dataset` builds its images. For references measured on the data itself,
    e.g. how far apart a face descriptor puts two renders of one synthetic identity."""
    model = flame_lib.load() if flame_model is None else flame_model
    out = _render(colours, flame, cameras25, resolution, uv_resolution, mouth_resolution,
                  background, model)
    return np.clip(np.round(np.asarray(out.color) * 255), 0, 255).astype(np.uint8)


def reference_alpha(flame, cameras25, resolution: int, uv_resolution: int = 128,
                    mouth_resolution: int = 32, flame_model=None) -> np.ndarray:
    """Alpha (B, R, R) float32 of the synthetic dataset's heads (the same Gaussians as
    `make_synthetic_dataset`: texel-spaced, opacity 0.98) for FLAME parameters (B, k) and EG3D
    cameras (B, 25). Alpha does not depend on the texture, so any colours do. Used to compare
    how solid a trained model's heads are with the data it learnt from."""
    model = flame_lib.load() if flame_model is None else flame_model
    out = _render(None, flame, cameras25, resolution, uv_resolution, mouth_resolution, 0.0,
                  model)
    return np.asarray(out.alpha)
