"""The ablation study, Tab. 1(c): one config per row.

  row            what changes                                  paper setting
  global         Gaussians offset in world axes                FFHQ 256², 4M images
  naive          per-triangle frames, no consecutive smoothing FFHQ 256², 4M images
  consecutive    the paper's consecutive local frames          FFHQ 256², 4M images
  baseline       a single UV generator: no G_m, no G_d; the    FFHQ 512², 25M images
                 expression conditions G (rerun per frame)
  gm             + G_m (mouth generator and blending ConvNet)  FFHQ 512², 25M images
  gm_gd          + G_m + G_d: the paper's model                FFHQ 512², 25M images

  python launch.py --config=configs/ablation.py:baseline --workdir=runs/ablation_baseline
  python launch.py --config=configs/ablation.py:baseline,demo --workdir=runs/demo_baseline

",demo" trains the row at the demo's size on the embedded synthetic data (CPU, minutes).
Each row's Dri FPS: `python experiments/benchmark.py --workdir=RUN` (or `--config=...
--random_init`); its FID/AED: `python experiments/evaluate.py --workdir=RUN`; the table:
`python experiments/ablation_table.py --runs=RUN,RUN,...`.
"""
from configs import demo, ffhq256, ffhq512

FRAME_ROWS = ("global", "naive", "consecutive")
MODULE_ROWS = {"baseline": (False, False), "gm": (True, False), "gm_gd": (True, True)}
ROWS = FRAME_ROWS + tuple(MODULE_ROWS)


def get_config(arg: str = "gm_gd"):
    row, _, scale = arg.partition(",")
    if row not in ROWS or scale not in ("", "demo"):
        raise ValueError(f"configs/ablation.py:{arg}: expected ROW or ROW,demo with ROW one of "
                         f"{ROWS}")
    if scale == "demo":
        c = demo.get_config()
    elif row in FRAME_ROWS:
        c = ffhq256.get_config()
    else:
        c = ffhq512.get_config()
    if row in FRAME_ROWS:
        c.head.frame_kind = row
    else:
        c.model.mouth_generator, c.model.dynamic_module = MODULE_ROWS[row]
    return c
