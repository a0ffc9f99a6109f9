"""Animate generated heads with a FLAME sequence: a video with one frame per FLAME frame.

The paper's inference split (Sec. 2.3): the static generator (mapping → G → G_m → blending)
runs ONCE per identity; every frame runs one jitted function — FLAME, the dynamic module G_d,
the texel binding and the rasterizer. Several identities (--seeds) are rendered side by side.

  python experiments/animate.py --workdir=runs/demo --flame_sequence=builtin:talk --out=out/talk.mp4
  python experiments/animate.py --config=configs/demo.py --random_init \\
      --flame_sequence=my_sequence.npz --frames=240 --seeds=0-2 --camera=orbit --out=out/a.gif
  python experiments/animate.py --workdir=runs/ffhq512 --flame_sequence=builtin:blink --realtime
  # an inverted photo (experiments/invert.py) instead of seeds, with its own fitted head shape
  python experiments/animate.py --workdir=runs/demo --identity=out/me/identity.npz --out=out/me.mp4

--flame_sequence: `builtin:talk`, `builtin:blink`, `builtin:nod`, `builtin:smile` (procedural;
--frames sets their length, default 120 at 30 fps), or an `.npz` with per-frame arrays
    expression (T, E), jaw_pose (T, 3), neck_pose (T, 3), global_pose (T, 3), eye_pose (T, 6)
    [optional: shape (S,) or (T, S), fps ()]
(missing arrays are zeros; all T equal; finite). --frames keeps the first N frames of a file.
Only the motion is transferred: each identity keeps its own head shape (neutral for a seed, the
fitted one for --identity), as reenact.py does; --sequence_shape applies the file's shape
instead (e.g. the tracked subject's head from track_video.py).
The builtins drive the embedded template head's named expression components (blink, smile, ...);
for a real FLAME model they fall back to pose (jaw, neck, eyes); name FLAME components with
--expression_components=smile=K,... to drive them too (reta3d/sequences.py:builtin_sequence).

Writes OUT (.mp4 or .gif) and OUT_timing.json (per-frame times; with --realtime the sustained
FPS of the per-frame path: all frames dispatched back to back, one block at the end; and
"rasterizer_overflow": tile intersections dropped beyond --capacity, with a warning line on
stderr when any were).
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402

from reta3d import cli  # noqa: E402

FLAGS = flags.FLAGS
cli.define_generator_flags(psi=True)
cli.define_render_flags()
flags.DEFINE_string("flame_sequence", "builtin:talk",
                    "builtin:talk|blink|nod|smile or a FLAME sequence .npz.")
flags.DEFINE_integer("frames", None, "Length of a builtin / most frames kept of a file.")
flags.DEFINE_integer("seed", None, "One identity seed (shorthand for --seeds=N).")
flags.DEFINE_string("seeds", "0", "Identity seeds side by side: ranges and lists, e.g. 0-2.")
flags.DEFINE_enum("camera", "fixed", ["fixed", "orbit"], "Frontal camera, or one orbit per clip.")
flags.DEFINE_bool("realtime", False, "Measure sustained FPS (no per-frame host sync).")
flags.DEFINE_float("fps", None, "Video frame rate (default: the sequence's fps, or 30).")
flags.DEFINE_string("expression_components", None,
                    "Name FLAME expression components for the builtins, e.g. smile=1,blink=7.")
flags.DEFINE_string("out", "out/animation.mp4", "Output video (.mp4 or .gif).")
flags.DEFINE_bool("sequence_shape", False,
                  "Apply the FLAME shape stored in --flame_sequence (e.g. a tracked subject's "
                  "head) instead of each identity's own.")
cli.define_identity_flag("--seed/--seeds")


def main(argv):
    cli.start(argv)
    import numpy as np

    from reta3d import inference, sequences, video

    video.check_output_suffix(FLAGS.out, "--out")   # before the model loads
    seeds = [FLAGS.seed] if FLAGS.seed is not None else cli.parse_seeds(FLAGS.seeds)
    names = cli.parse_expression_components(FLAGS.expression_components) or None
    try:
        sequences.check_spec(FLAGS.flame_sequence)   # before the model loads
    except (ValueError, FileNotFoundError) as error:
        raise app.UsageError(f"--flame_sequence: {error}") from None
    config, generator, g_vars = cli.load_generator_from_flags()
    if names is not None:
        names = {**sequences.template_expression_index(generator.flame_model), **names}
    static = None
    # The identity's own shape replaces the sequence's (neutral for seeds).
    shape = None if FLAGS.sequence_shape else np.zeros(generator.flame_model.num_shape, np.float32)
    if FLAGS.identity is not None:
        if FLAGS.sequence_shape:
            raise app.UsageError("--sequence_shape and --identity both set the head's shape")
        g_vars, static, identity = cli.load_identity_from_flags(
            generator, g_vars, FLAGS.seed is not None or FLAGS["seeds"].present or FLAGS.psi != 1.0)
        shape = identity.shape
    timing = inference.animate_to_video(
        config, generator, g_vars, seeds, FLAGS.flame_sequence, FLAGS.out,
        num_frames=FLAGS.frames, camera=FLAGS.camera, realtime=FLAGS.realtime,
        truncation_psi=FLAGS.psi, fps=FLAGS.fps, expression_index=names,
        static=static, shape=shape, identity=FLAGS.identity, **cli.render_options())
    summary = {k: v for k, v in timing.items() if k != "frame_ms"}
    summary["timing_json"] = str(video.timing_path(FLAGS.out))
    cli.print_json(summary)
    cli.warn_overflow(timing["rasterizer_overflow"])


if __name__ == "__main__":
    cli.run(main)
