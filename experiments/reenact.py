"""Video-driven reenactment (the paper's Fig. 3): a real clip drives generated heads.

  python experiments/reenact.py --video=clip.mp4 --workdir=runs/demo --seeds=0,1 --out=out/reenact.mp4
  python experiments/reenact.py --video=clip.mp4 --config=configs/demo.py --random_init --out=out/r.mp4

Tracks the clip with the generator's own head model (reta3d/fitting/tracking.py; needs
`pip install -r requirements-faces.txt`), then drives each identity: the static generator once
per identity, the real-time per-frame path (FLAME, G_d, binding, rasterizer) once per frame.
Writes OUT (the driving face and the heads side by side, one output frame per input frame, at
the clip's frame rate), OUT_sequence.npz (the tracked FLAME sequence: reuse it with animate.py)
and OUT_timing.json. A generator trained on a real FLAME model needs --landmark_embedding.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402

from reta3d import cli  # noqa: E402

FLAGS = flags.FLAGS
cli.define_generator_flags(psi=True)
cli.define_render_flags()
cli.define_landmark_flags()
flags.DEFINE_string("video", None, "Driving video (.mp4, .mov, .gif, ...).")
flags.DEFINE_string("seeds", "0", "Identity seeds side by side: ranges and lists, e.g. 0-2.")
flags.DEFINE_float("temporal_weight", 1.0, "Smoothness of the tracking fit across frames.")
flags.DEFINE_integer("num_steps", 400, "L-BFGS steps of the tracking fit.", lower_bound=1)
flags.DEFINE_string("out", "out/reenact.mp4", "Output video (.mp4 or .gif).")
flags.mark_flags_as_required(["video"])


def main(argv):
    cli.start(argv)
    from reta3d import reenactment, video
    video.check_output_suffix(FLAGS.out, "--out")
    if not pathlib.Path(FLAGS.video).is_file():
        raise app.UsageError(f"--video: no such file: {FLAGS.video}")
    seeds = cli.parse_seeds(FLAGS.seeds)
    config, generator, g_vars = cli.load_generator_from_flags()
    _, embedding = cli.load_head_and_landmarks(model=generator.flame_model)
    summary = reenactment.reenact_video(
        config, generator, g_vars, FLAGS.video, seeds, FLAGS.out,
        embedding=embedding, truncation_psi=FLAGS.psi, temporal_weight=FLAGS.temporal_weight,
        num_steps=FLAGS.num_steps, **cli.render_options())
    # As animate.py prints it: the timing JSON's content and where it is.
    cli.print_json(dict(summary, timing_json=str(video.timing_path(FLAGS.out))))
    cli.warn_overflow(summary["rasterizer_overflow"])


if __name__ == "__main__":
    cli.run(main)
