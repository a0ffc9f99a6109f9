"""One-shot reconstruction: one portrait photo in, an animatable 3D Gaussian head out.

GAN inversion of a trained RETA3D generator (reta3d/inversion.py, module docstring): the photo
is cropped and fitted (FLAME + camera) exactly as the dataset preprocessor does, the latent
(--space=w or w+) is optimised so that the render under the fitted camera and FLAME matches the
crop, optionally followed by pivotal tuning of the static generator (--pti_steps).

  python experiments/invert.py --image=me.jpg --workdir=runs/ffhq512 --out=out/me
  python experiments/invert.py --image=me.jpg --workdir=runs/demo --out=out/me \\
      --space=w --steps=500 --pti_steps=200 --sequence=builtin:smile
  # then, with the identity instead of a seed:
  python experiments/animate.py --workdir=runs/demo --identity=out/me/identity.npz \\
      --flame_sequence=builtin:talk --out=out/me_talk.mp4
  python experiments/sample.py --workdir=runs/demo --identity=out/me/identity.npz --out=out/me_views
  python experiments/export_ply.py --workdir=runs/demo --identity=out/me/identity.npz \\
      --out=out/me.ply

Needs the face extras (`pip install -r requirements-faces.txt`). Writes into OUT, only when the
whole run succeeded (staged in OUT/.partial-PID meanwhile; its loss_log.jsonl can be followed
there): identity.npz [+ tuned_params.msgpack], input_crop.png, reconstruction.png,
comparison.png, novel_views.png, animation.mp4 (+ animation_timing.json), head.ply,
loss_log.jsonl and metrics.json (PSNR / SSIM / masked PSNR [/ LPIPS], before and after PTI,
timing, device); metrics.json is also printed. Errors (unreadable photo, no face, no
checkpoint) exit with status 1 and leave no result file.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from reta3d import cli  # noqa: E402

FLAGS = flags.FLAGS
cli.define_generator_flags()
cli.define_landmark_flags()
flags.DEFINE_string("image", None, "The portrait photo (any format Pillow reads).")
flags.DEFINE_string("out", None, "Output folder (created; results replaced on success).")
flags.DEFINE_enum("space", "w+", ["w", "w+"],
                  "Latent space: one w for all layers, or one per layer.")
flags.DEFINE_integer("steps", 300, "Latent optimisation steps.", lower_bound=1)
flags.DEFINE_integer("pti_steps", 0, "Pivotal tuning steps after the inversion (0 = none).",
                     lower_bound=0)
flags.DEFINE_string("sequence", "builtin:talk",
                    "FLAME sequence of the animation: builtin:talk|blink|nod|smile or an .npz "
                    "(e.g. from experiments/track_video.py).")
flags.DEFINE_integer("frames", None, "Animation length (builtins; default 120) / frames kept.")
flags.DEFINE_string("vgg16", None, "VGG16 of the perceptual loss: a converted .npz or 'random' "
                                   "(default: the config's loss.vgg16).")
flags.DEFINE_enum("mask", "head", ["head", "none"],
                  "Loss region: the fitted head's silhouette (dilated) or every pixel.")
flags.DEFINE_float("lr", 0.3, "Adam learning rate (in W standard deviations per step).")
flags.DEFINE_float("w_reg", 1e-3, "Weight of mean(((w - w_avg) / w_std)^2).")
flags.DEFINE_float("l2", 1.0, "Weight of the pixel L2 loss.")
flags.DEFINE_float("l1", 0.0, "Weight of the pixel L1 loss.")
flags.DEFINE_float("perceptual", 1.0, "Weight of the VGG16 perceptual loss.")
flags.DEFINE_float("noise", 0.0, "Initial latent noise (StyleGAN2 projector: 0.05).")
flags.DEFINE_float("w_plus_tied", 0.5,
                   "--space=w+: fraction of the steps run as one shared w first.")
flags.DEFINE_float("w_plus_lr_scale", 0.3, "--space=w+: learning rate of the per-layer phase "
                                           "(x --lr).")
flags.DEFINE_float("pti_lr", 3e-4, "PTI Adam learning rate.")
flags.DEFINE_float("pti_locality", 0.1, "PTI locality regulariser weight (0 = off).")
flags.DEFINE_integer("num_w_samples", 10000, "Random z mapped for w_avg / w_std.", lower_bound=2)
flags.DEFINE_integer("fit_resolution", 512, "Crop size for the landmark fit (then resized to "
                                            "the render resolution).", lower_bound=16)
flags.DEFINE_integer("fit_steps", 300, "L-BFGS steps of the FLAME / camera fit.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the W statistics and of PTI's random latents.")
flags.DEFINE_bool("progress", True, "Progress bars with ETA on stderr.")
flags.mark_flags_as_required(["image", "out"])


def main(argv):
    cli.start(argv)
    from reta3d import inversion
    from reta3d.fitting import media, preprocess

    photo = media.load_image(FLAGS.image)     # a bad photo fails before the model loads
    preprocess.require_face(photo, FLAGS.image)
    settings = inversion.InversionSettings(
        space=FLAGS.space, num_steps=FLAGS.steps, pti_steps=FLAGS.pti_steps,
        learning_rate=FLAGS.lr, w_reg_weight=FLAGS.w_reg, l2_weight=FLAGS.l2,
        l1_weight=FLAGS.l1, perceptual_weight=FLAGS.perceptual, initial_noise=FLAGS.noise,
        w_plus_tied=FLAGS.w_plus_tied, w_plus_lr_scale=FLAGS.w_plus_lr_scale,
        mask=FLAGS.mask, pti_learning_rate=FLAGS.pti_lr,
        pti_locality_weight=FLAGS.pti_locality, num_w_samples=FLAGS.num_w_samples,
        seed=FLAGS.seed)
    config, generator, g_vars = cli.load_generator_from_flags()
    _, embedding = cli.load_head_and_landmarks(model=generator.flame_model)
    metrics = inversion.invert_photo(
        config, generator, g_vars, photo, FLAGS.out, settings, embedding=embedding,
        vgg16=FLAGS.vgg16, sequence=FLAGS.sequence, num_frames=FLAGS.frames,
        fit_resolution=FLAGS.fit_resolution, fit_steps=FLAGS.fit_steps,
        source=FLAGS.image,
        generator_source=(FLAGS.workdir
                          or f"random init (--config, --init_seed={FLAGS.init_seed})"),
        progress=FLAGS.progress)
    cli.print_json(metrics)
    cli.warn_overflow(metrics["rasterizer_overflow"])


if __name__ == "__main__":
    cli.run(main)
