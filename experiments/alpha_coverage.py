"""How solid are the generated heads? Mean alpha inside the head's silhouette, model vs data.

    python experiments/alpha_coverage.py --workdir=runs/demo [--num=32] [--overlay=alpha.png]

For a model trained on the synthetic dataset (the demo): the "data" here is always that
dataset's head, re-rendered, never the images of a run's dataset folder. Draws `num` FLAME
parameters and cameras from the synthetic dataset's distribution (`--seed`), renders the
synthetic dataset's own heads there (`reta3d.synthetic.reference_alpha`: the data's alpha) and
the model's heads for random latents (the mapping conditioned on the same camera, as in SWD).
Two silhouettes, two measures (`coverage_report`):

- the data's: where the data's alpha exceeds 0.5, and its interior, that silhouette eroded by
  2 pixels. The model's mean alpha there also drops where its head's outline differs from the
  data's (a narrower head), so it mixes shape with see-through surface.
- each head's own (`own_silhouette`): where its alpha exceeds 0.5, closed by 2 pixels and with
  its holes filled, so a see-through patch inside the head still counts as inside; and its
  interior, 2 pixels in. The mean alpha there measures see-through surface alone, for the model
  and the data alike.

The interiors treat the image frame as an edge (a head cut by the frame loses its last 2 rows
there). Prints JSON: the mean alpha inside each for the data and for the model, the share of
interior pixels below 0.9, the alpha outside the data's silhouette (floaters), the IoU of the
two silhouettes, and the map's ln γs (the generator's target scale, for reference). A model
whose Gaussians are too small for their spacing, or too transparent, leaves holes: its mean
alpha stays well below the data's.

--overlay writes a picture of the first 8 heads (`overlay`): the data's alpha, the model's
alpha with its see-through pixels in red and the outline it misses in blue, and the model's
colour over white.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from reta3d import cli, errors  # noqa: E402

FLAGS = flags.FLAGS
cli.define_generator_flags()
flags.DEFINE_integer("num", 32, "Heads to compare.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the FLAME parameters, cameras and latents (not the "
                     "training seed).")
flags.DEFINE_string("overlay", None, "Also write a PNG of the first 8 heads (see `overlay`).")
flags.DEFINE_integer("overlay_scale", 2, "Pixel repeat of the overlay.", lower_bound=1)


def eroded(masks, pixels: int):
    """(B, H, W) bool → each mask eroded by `pixels` (a 3×3 cross, repeated); the image frame
    counts as outside (scipy's default)."""
    import numpy as np
    from scipy import ndimage

    return np.stack([ndimage.binary_erosion(m, iterations=pixels) if pixels else m
                     for m in np.asarray(masks)])


def own_silhouette(alpha, erode: int = 0):
    """(B, H, W) float alpha → (B, H, W) bool: each image's silhouette, alpha > 0.5 closed by
    2 pixels (a binary closing with a 3×3 cross, twice) with its enclosed holes filled, then
    eroded by `erode` pixels. A hole in the middle of a head is inside its silhouette; a notch
    in its outline wider than 4 pixels is not. The closing runs on the mask padded by its edge
    values, so it does not eat into a neck cut by the frame; the erosion (`eroded`) treats the
    frame as outside."""
    import numpy as np
    from scipy import ndimage

    out = []
    for a in np.asarray(alpha):
        padded = np.pad(a > 0.5, 3, mode="edge")
        out.append(ndimage.binary_fill_holes(
            ndimage.binary_closing(padded, iterations=2)[3:-3, 3:-3]))
    return eroded(np.stack(out), erode)


def coverage_report(data_alpha, alpha) -> dict:
    """The measures of the module docstring. data_alpha, alpha (B, H, W) float in [0, 1]: the
    data's and the model's alpha for the same FLAME parameters and cameras → {name: float}."""
    import numpy as np

    data_alpha, alpha = np.asarray(data_alpha), np.asarray(alpha)
    if data_alpha.shape != alpha.shape or data_alpha.ndim != 3:
        raise ValueError(f"need two (B, H, W) alphas of one shape, got {data_alpha.shape} and "
                         f"{alpha.shape}")
    inside = data_alpha > 0.5
    model_inside = alpha > 0.5
    # The data silhouette's interior (2 px in): where a head that matches the data's outline
    # but is slightly smaller or larger does not count.
    interior = eroded(inside, 2)
    own = {}
    for name, a in (("data", data_alpha), ("model", alpha)):
        silhouette = own_silhouette(a)
        own[name] = (silhouette, eroded(silhouette, 2))
    return {
        "data_alpha_in_silhouette": float(data_alpha[inside].mean()),
        "model_alpha_in_silhouette": float(alpha[inside].mean()),
        "data_alpha_in_interior": float(data_alpha[interior].mean()),
        "model_alpha_in_interior": float(alpha[interior].mean()),
        "model_interior_fraction_below_0.9": float((alpha[interior] < 0.9).mean()),
        "data_alpha_in_own_silhouette": float(data_alpha[own["data"][0]].mean()),
        "model_alpha_in_own_silhouette": float(alpha[own["model"][0]].mean()),
        "data_alpha_in_own_interior": float(data_alpha[own["data"][1]].mean()),
        "model_alpha_in_own_interior": float(alpha[own["model"][1]].mean()),
        "model_own_interior_fraction_below_0.9": float((alpha[own["model"][1]] < 0.9).mean()),
        "model_alpha_outside_silhouette": float(alpha[~inside].mean()),
        "silhouette_iou": float((inside & model_inside).sum()
                                / max((inside | model_inside).sum(), 1)),
    }


def overlay(data_alpha, alpha, color, scale: int = 2):
    """A picture of where heads are see-through. data_alpha, alpha (B, H, W) float in [0, 1]:
    the data's and the model's; color (B, H, W, 3) float in [0, 1]: the model's render over
    white. → (3·H·scale, B·W·scale, 3) uint8, one column per head, rows:
    1. the data's alpha (grey);
    2. the model's alpha (grey); red: pixels 2 px inside the model's own silhouette whose alpha
       is below 0.9 (see-through surface); blue: pixels inside the data's silhouette but
       outside the model's own (outline: a narrower head);
    3. the model's colour over white."""
    import numpy as np

    grey = lambda a: np.repeat(np.clip(a, 0, 1)[..., None], 3, axis=-1)
    model = grey(alpha)
    silhouette = own_silhouette(alpha)
    see_through = eroded(silhouette, 2) & (alpha < 0.9)
    missed = (data_alpha > 0.5) & ~silhouette
    model[see_through] = (1.0, 0.0, 0.0)
    model[missed] = (0.2, 0.4, 1.0)
    rows = np.stack([grey(data_alpha), model, np.clip(color, 0, 1)])       # (3, B, H, W, 3)
    r, b, h, w, _ = rows.shape
    picture = rows.transpose(0, 2, 1, 3, 4).reshape(r * h, b * w, 3)
    picture = picture.repeat(scale, axis=0).repeat(scale, axis=1)
    return np.round(picture * 255).astype(np.uint8)


def alpha_coverage(config, generator, g_vars, num: int, seed: int = 0, overlay_path=None,
                   overlay_scale: int = 2):
    """Renders `num` heads of the model and of the synthetic data → `coverage_report` with
    num, resolution and ln γs; with overlay_path, also writes `overlay` of the first 8 heads
    there (PNG, atomically)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import rasterizer
    from reta3d import synthetic, train

    rng = np.random.default_rng(seed)
    model = generator.flame_model
    flame = synthetic.random_flame(rng, model, num)
    cameras = synthetic.random_cameras(rng, num).astype(np.float32)
    res = config.render.resolution
    data_alpha = synthetic.reference_alpha(
        flame, cameras, res, uv_resolution=config.data.get("synthetic_uv_resolution", 128),
        flame_model=model)
    z = rng.standard_normal((num, config.model.z_dim)).astype(np.float32)

    @jax.jit
    def model_render(g_vars, z, cameras, flame):
        static = generator.generate_static(g_vars, z, cameras)
        gaussians, _ = generator.animate(g_vars, static, flame)
        camera = rasterizer.Camera.from_eg3d(cameras, res)
        out = rasterizer.render(gaussians, camera, background=jnp.ones(3),
                                backend=config.render.backend,
                                capacity=train.render_capacity(config, generator.num_gaussians))
        return out.alpha, out.color

    alpha, color = (np.asarray(x) for x in model_render(
        g_vars, jnp.asarray(z), jnp.asarray(cameras),
        {k: jnp.asarray(v) for k, v in flame.items()}))
    if overlay_path is not None:
        from reta3d import atomic_files
        atomic_files.save_png(overlay_path, overlay(data_alpha[:8], alpha[:8], color[:8],
                                                    overlay_scale))
        print(f"Overlay of {min(num, 8)} heads written to {overlay_path}", file=sys.stderr)
    return {"num": num, "resolution": res, **coverage_report(data_alpha, alpha),
            "log_gamma_s": {"face": generator.head_binding.face_log_gamma_s,
                            "mouth": generator.head_binding.mouth_log_gamma_s}}


def main(argv):
    cli.start(argv)
    if FLAGS.overlay is not None and pathlib.Path(FLAGS.overlay).is_dir():
        raise errors.InputError(f"--overlay {FLAGS.overlay} is a folder: give a file name, "
                                "e.g. alpha.png")
    config, generator, g_vars = cli.load_generator_from_flags()
    cli.print_json(alpha_coverage(config, generator, g_vars, FLAGS.num, FLAGS.seed,
                                  FLAGS.overlay, FLAGS.overlay_scale))


if __name__ == "__main__":
    cli.run(main)
