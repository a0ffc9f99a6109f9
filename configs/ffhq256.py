"""The ablation setting (Tab. 1c): 256^2 renders, 4M images, frame type selectable.

  python launch.py --config=configs/ffhq256.py --workdir=runs/ffhq256_naive \
      --config.head.frame_kind=naive        # global | naive | consecutive
"""
from configs import default


def get_config():
    c = default.get_config()
    c.data.path = "data/ffhq256"
    c.render.resolution = 256
    c.disc.channel_base = 16384
    c.train.total_kimg = 4000.0
    return c
