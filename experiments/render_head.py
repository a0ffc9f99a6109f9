"""Render the bound Gaussian head from a hand-made UV feature map (no training needed).

Builds the FLAME head (the embedded template, or real files via --flame_model/--flame_uv),
binds Gaussians to the face map and the mouth patch, decodes a deterministic feature map
(zero offsets, target-size flat discs, opaque, colours baked from a procedural texture:
skin shaded by the neutral head's normals, a faint UV grid, lips, eyes) and
renders it with `rasterizer.render` for a yaw sweep (columns) and a few FLAME expressions
and jaw openings (rows). Writes one PNG grid and prints the Gaussian count and timings.

  python experiments/render_head.py [--out=out/head.png] [--image_size=256] [--kind=consecutive]
"""
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from reta3d import cli  # noqa: E402

cli.define_flame_model_flags()
flags.DEFINE_string("out", "out/head.png", "Output PNG (the grid).")
flags.DEFINE_integer("image_size", 256, "Rendered image width = height (pixels).")
flags.DEFINE_integer("num_yaws", 5, "Number of cameras in the yaw sweep.")
flags.DEFINE_float("max_yaw", 0.8, "Largest |yaw| of the sweep (radians).")
flags.DEFINE_float("pitch", 0.0, "Camera pitch (radians).")
flags.DEFINE_enum("kind", "consecutive", ["consecutive", "naive", "global"], "Frame kind.")
flags.DEFINE_enum("backend", "auto", ["auto", "jax", "triton"], "Rasterizer backend.")
flags.DEFINE_integer("face_resolution", 256, "Face UV map resolution.")
flags.DEFINE_integer("mouth_resolution", 64, "Mouth patch resolution.")
flags.DEFINE_float("disc_scale", 1.0,
                   "Tangent-plane scale of each Gaussian in units of γs (the target scale).")
FLAGS = flags.FLAGS

# (label, FLAME parameters) for each row of the grid; deterministic.
EXPRESSIONS = (
    ("neutral", {}),
    ("jaw open", {"jaw_pose": [0.25, 0.0, 0.0]}),
    ("expression +", {"expression": [2.0, -1.0, 1.0], "jaw_pose": [0.08, 0.0, 0.0]}),
    ("expression -, neck", {"expression": [-2.0, 1.5, -1.0], "neck_pose": [0.0, 0.2, 0.05]}),
)


PARAM_WIDTHS = {"shape": 1, "expression": 3, "global_pose": 3, "neck_pose": 3,
                "jaw_pose": 3, "eye_pose": 6}


def row_params(values):
    """Every FLAME parameter as a (1, width) float32 array, so all rows share one jit."""
    import numpy as np

    params = {}
    for name, width in PARAM_WIDTHS.items():
        row = np.zeros((1, width), np.float32)
        given = np.asarray(values.get(name, []), np.float32)
        row[0, :given.size] = given
        params[name] = row
    return params


SKIN_RGB = (0.93, 0.72, 0.60)
LIP_RGB = (0.78, 0.33, 0.35)
SCLERA_RGB = (0.95, 0.95, 0.93)
IRIS_RGB = (0.30, 0.20, 0.12)
PUPIL_RGB = (0.03, 0.03, 0.03)


def procedural_texture(model, binding, normals, grid_period):
    """(M, 3) colours in (0, 1) for the binding's texels, from UV position and geometry.

    Skin, reddened towards the centre of `model.mouth_rect` (lips and mouth cavity); the
    eyeballs (vertices skinned to the eye joints) white with an iris and pupil where their
    rest normal looks forward (+z); Lambertian shading baked from the neutral head's
    normals; thin dark UV grid lines every `grid_period`, so deformations show.
    """
    import numpy as np

    corners = np.asarray(model.faces)[binding.face_index]                   # (M, 3)
    n = np.einsum("mk,mkd->md", binding.bary, normals[corners])
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    uv = binding.texel_uv()

    u0, v0, u1, v1 = model.mouth_rect
    centre = np.array([(u0 + u1) / 2, (v0 + v1) / 2])
    half = np.array([(u1 - u0) / 2, (v1 - v0) / 2])
    lip = np.exp(-np.sum(((uv - centre) / (0.45 * half)) ** 2, axis=-1))[:, None]
    rgb = (1 - lip) * np.asarray(SKIN_RGB) + lip * np.asarray(LIP_RGB)

    eye_weight = np.asarray(model.weights)[:, 3:5].sum(-1)                  # eye joints
    eye = np.einsum("mk,mk->m", binding.bary, eye_weight[corners]) > 0.5
    rest_normals = np.asarray(_rest_normals(model))
    rest_n = np.einsum("mk,mkd->md", binding.bary, rest_normals[corners])
    rest_n /= np.maximum(np.linalg.norm(rest_n, axis=-1, keepdims=True), 1e-12)
    eye_rgb = np.where(rest_n[:, 2:3] > 0.97, PUPIL_RGB,
                       np.where(rest_n[:, 2:3] > 0.88, IRIS_RGB, SCLERA_RGB))
    rgb = np.where(eye[:, None], eye_rgb, rgb)

    light = np.array([0.3, 0.5, 0.8]) / np.linalg.norm([0.3, 0.5, 0.8])
    shade = 0.35 + 0.65 * np.clip(n @ light, 0.0, 1.0)
    frac = np.abs((uv / grid_period + 0.5) % 1.0 - 0.5)
    line = np.any(frac < 0.06, axis=-1) & ~eye
    rgb = rgb * shade[:, None] * np.where(line, 0.6, 1.0)[:, None]
    return np.clip(rgb, 0.02, 0.98)


def _rest_normals(model):
    from reta3d import flame

    return flame.vertex_normals(model.v_template[None], model.faces)[0]


def procedural_features(model, head_binding, disc_scale):
    """Hand-made face (1, R, R, 14) and mouth (1, Rm, Rm, 14) feature maps (numpy).

    Offsets 0 (on the surface); scales: log of disc_scale along the tangent axes (local y,
    z) and a quarter of that along the normal (local x), so each Gaussian is a flat disc
    (with consecutive frames the disc lies in the surface); identity rotation; opacity
    logit 5; colour = logit of `procedural_texture`. Face and mouth Gaussians at the same
    UV point get the same colour (the mouth patch re-samples the face's surface).
    """
    import numpy as np

    from reta3d import flame

    neutral = np.asarray(model.to_world(model.forward(**row_params({}))))
    normals = np.asarray(flame.vertex_normals(neutral, model.faces))[0]

    def feature_map(binding, grid_period):
        rgb = procedural_texture(model, binding, normals, grid_period)
        r = binding.resolution
        values = np.zeros((binding.num_texels, 14), np.float32)
        log_scale = np.log(disc_scale)
        values[:, 3:6] = [log_scale + np.log(0.25), log_scale, log_scale]
        values[:, 6] = 1.0
        values[:, 10:13] = np.log(rgb / (1 - rgb))
        values[:, 13] = 5.0
        grid = np.zeros((1, r * r, 14), np.float32)
        grid[0, binding.flat_index] = values
        return grid.reshape(1, r, r, 14)

    return (feature_map(head_binding.face, 1.0 / 16),
            feature_map(head_binding.mouth, 1.0 / 16))


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    from PIL import Image

    import rasterizer
    from rasterizer.types import Camera, look_at_eg3d_label
    from reta3d import binding, flame

    start = time.perf_counter()
    model = flame.load(FLAGS.flame_model, FLAGS.flame_uv)
    head_binding = binding.HeadBinding.from_model(model, FLAGS.face_resolution,
                                                  FLAGS.mouth_resolution)
    setup_seconds = time.perf_counter() - start
    face, mouth = procedural_features(model, head_binding, FLAGS.disc_scale)

    yaws = np.linspace(-FLAGS.max_yaw, FLAGS.max_yaw, FLAGS.num_yaws)
    labels = np.stack([look_at_eg3d_label(float(y), FLAGS.pitch) for y in yaws])
    cameras = Camera.from_eg3d(jnp.asarray(labels), FLAGS.image_size)

    @jax.jit
    def render_row(face, mouth, params):
        gaussians, _ = binding.head_gaussians(model, head_binding, face, mouth, params,
                                              kind=FLAGS.kind)
        # One (unbatched) head is broadcast against the num_views cameras by the renderer.
        gaussians = jax.tree_util.tree_map(lambda x: x[0], gaussians)
        out = rasterizer.render(gaussians, cameras, background=jnp.ones((3,)),
                                backend=FLAGS.backend)
        return out.color, out.overflow

    rows, timings = [], []
    for label, params in EXPRESSIONS:
        params = row_params(params)
        start = time.perf_counter()
        images, overflow = jax.block_until_ready(render_row(face, mouth, params))
        timings.append({"row": label, "seconds": time.perf_counter() - start,
                        "dropped_tile_intersections": int(np.sum(overflow))})
        if not np.all(np.isfinite(np.asarray(images))):
            raise RuntimeError(f"non-finite pixels rendering row {label!r}")
        rows.append(np.concatenate(list(np.asarray(images)), axis=1))
    grid = np.clip(np.concatenate(rows, axis=0), 0.0, 1.0)

    out = pathlib.Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid * 255 + 0.5).astype(np.uint8)).save(out)
    print(json.dumps({
        "out": str(out),
        "device": jax.devices()[0].device_kind,
        "kind": FLAGS.kind,
        "backend": FLAGS.backend,
        "num_gaussians": {"face": head_binding.num_face, "mouth": head_binding.num_mouth,
                          "total": head_binding.num_gaussians},
        "image_size": FLAGS.image_size,
        "yaws": [float(y) for y in yaws],
        "rows": [label for label, _ in EXPRESSIONS],
        "model_and_binding_s": setup_seconds,
        "row_seconds (first includes compilation)": timings,
    }, indent=2))


if __name__ == "__main__":
    cli.run(main)
