"""An interactive viewer in the browser: a generated head, driven live by FLAME controls and
rendered by the per-frame path from the browser's camera (viser serves the page).

  python experiments/viewer.py --workdir=runs/demo                   # http://127.0.0.1:8080
  python experiments/viewer.py --config=configs/demo.py --random_init --port=8081
  python experiments/viewer.py --workdir=runs/ffhq512 --resolution=256 --backend=triton

From a laptop, tunnel the port of the machine that runs it, then open http://localhost:8080:

  ssh -L 8080:localhost:8080 server

The server listens on 127.0.0.1 only (--host=0.0.0.0 exposes it to the network, without any
authentication: prefer the tunnel).

Controls: seed and truncation psi (the static generator runs once per identity), G_d on/off,
jaw opening, the head model's expression components (the template head's named ones; the
first 10 of a real FLAME), neck and head yaw/pitch/roll, eye gaze; a FLAME sequence player
(built-ins, or an .npz such as experiments/track_video.py writes) with play/pause and a frame
scrubber; buttons that download the image (.png), the Gaussians (.ply) and the FLAME
parameters (one-frame .npz). Orbit (left drag), pan (right drag) and zoom (wheel) move the
camera; the head is re-rendered from it. The page shows the frame kind, the number of
Gaussians and the measured time per frame. Only the latest state is rendered: bursts of
slider or camera events are coalesced (reta3d/viewer.py).

--benchmark_frames=N: no server; renders N frames of builtin:talk as the viewer does and
prints the median frame time and FPS as JSON.
"""
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from reta3d import cli  # noqa: E402

FLAGS = flags.FLAGS
cli.define_generator_flags(psi=True)
cli.define_render_flags()
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (127.0.0.1: this machine only; "
                                         "reach it through an SSH tunnel).")
flags.DEFINE_integer("port", 8080, "Port of the page.")
flags.DEFINE_integer("seed", 0, "Initial identity seed.")
cli.define_identity_flag("the seeds")
flags.DEFINE_string("flame_sequence", None,
                    "Initial FLAME sequence: builtin:talk|blink|nod|smile or an .npz.")
flags.DEFINE_bool("warmup", True, "Compile the static generator and both per-frame functions "
                                  "(G_d on and off) before serving.")
flags.DEFINE_integer("benchmark_frames", 0, "Measure the frame time over N frames and exit.")


def main(argv):
    cli.start(argv)
    from reta3d import inference, viewer

    config, generator, g_vars = cli.load_generator_from_flags()
    renderer = viewer.Renderer(config, generator, g_vars, identity=FLAGS.identity,
                               **cli.render_options())
    if FLAGS.benchmark_frames:
        result = viewer.benchmark(renderer, FLAGS.benchmark_frames)
        cli.print_json(dict(result, **inference.device_description()))
        return
    initial = viewer.ViewerState(seed=FLAGS.seed, psi=FLAGS.psi, sequence=FLAGS.flame_sequence)
    if FLAGS.flame_sequence:
        renderer.sequence(FLAGS.flame_sequence)           # a bad file fails here, clearly
    if FLAGS.warmup:
        print("compiling (once per run; the compilation cache makes the next run faster)...",
              flush=True)
        timings = renderer.warm_up(initial)
        labels = {"static_ms": "identity (static part)", "compile_ms_gd_on": "frame with G_d",
                  "compile_ms_gd_off": "frame without G_d"}
        print("ready, first calls (compilation included): " + ", ".join(
            f"{labels.get(k, k)} {v / 1e3:.1f} s" for k, v in timings.items()), flush=True)
    viewer_app = viewer.Viewer(renderer, host=FLAGS.host, port=FLAGS.port, initial=initial)
    viewer_app.start()
    print(f"RETA3D viewer on {viewer_app.url} ({renderer.num_gaussians} Gaussians, "
          f"{renderer.resolution}² {renderer.backend}); from another machine: "
          f"ssh -L {viewer_app.port}:localhost:{viewer_app.port} <this host>, then open "
          f"http://localhost:{viewer_app.port}. Ctrl-C stops.", flush=True)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        viewer_app.stop()


if __name__ == "__main__":
    cli.run(main)
