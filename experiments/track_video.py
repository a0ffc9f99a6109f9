"""A video of a face → a FLAME sequence .npz that animate.py reads (and an overlay video).

  python experiments/track_video.py --video=clip.mp4 --out=out/clip.npz --overlay=out/clip_overlay.mp4
  python experiments/animate.py --workdir=runs/demo --flame_sequence=out/clip.npz --out=out/driven.mp4

Needs the face extras (`pip install -r requirements-faces.txt`). Per frame: the largest face,
its 68 landmarks, an EG3D-style crop; then one fit of FLAME (shape shared by the clip;
expression, jaw, neck and head pose per frame, smoothed over time) and the cameras. Frames
without a face are interpolated from their neighbours and flagged (face_found = 0 in the file,
a warning in the log, a red border in the overlay). The .npz holds expression, jaw_pose,
neck_pose, global_pose (the head's rotation relative to the camera), eye_pose, shape, fps, and
the extras camera_labels (T, 25: the same pose as EG3D cameras with global_pose 0),
face_found (T,), yaw_pitch_roll_deg (T, 3). Fit the generator's own head model:
--flame_model/--landmark_embedding for a real FLAME (default: the embedded template head).
Pipeline: reta3d/fitting/tracking.py. Prints a JSON summary.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402

from reta3d import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("video", None, "Input video (.mp4, .mov, .avi, .gif, ...).")
flags.DEFINE_string("out", None, "Output FLAME sequence (.npz).")
flags.DEFINE_string("overlay", None, "Optional overlay video (.mp4 or .gif): landmarks drawn.")
flags.DEFINE_integer("resolution", 512, "Crop size the camera labels are for.", lower_bound=16)
flags.DEFINE_float("temporal_weight", 1.0, "Smoothness of the fit across frames (0: none).")
flags.DEFINE_integer("num_steps", 400, "L-BFGS steps of the fit.", lower_bound=1)
flags.DEFINE_float("min_score", 0.5, "Ignore dlib detections scoring lower.")
cli.define_flame_model_flags()
cli.define_landmark_flags()
flags.mark_flags_as_required(["video", "out"])


def main(argv):
    cli.start(argv)
    from reta3d import video
    from reta3d.fitting import media, tracking
    out = pathlib.Path(FLAGS.out)
    if out.suffix.lower() != ".npz":
        raise app.UsageError(f"--out must end in .npz, got {out}")
    if FLAGS.overlay:
        video.check_output_suffix(FLAGS.overlay, "--overlay")
    if not pathlib.Path(FLAGS.video).is_file():
        raise app.UsageError(f"--video: no such file: {FLAGS.video}")
    model, embedding = cli.load_head_and_landmarks()
    result = tracking.track_video(FLAGS.video, model, embedding, resolution=FLAGS.resolution,
                                  temporal_weight=FLAGS.temporal_weight,
                                  num_steps=FLAGS.num_steps, min_score=FLAGS.min_score)
    result.save(out)
    summary = dict(tracking.summary(result), out=str(out))
    if FLAGS.overlay:
        frames, fps, _ = media.read_video(FLAGS.video)
        import numpy as np
        pictures = np.stack(list(tracking.overlay_frames(frames, result)))
        video.write_video(FLAGS.overlay, pictures, fps)
        summary["overlay"] = FLAGS.overlay
    cli.print_json(summary)


if __name__ == "__main__":
    cli.run(main)
