"""A small RETA3D that trains on a CPU in minutes, on the embedded synthetic dataset.

Same model and losses as the paper, scaled down: 64² renders, a 64² UV map and a 32² mouth
patch over the embedded template head, narrow networks, batch 8, 300 steps, a fixed random
VGG16 for L_ID. One departure from the paper's model: D sees the alpha as a 4th channel
(`disc.alpha_channel`, as GGHead); without it the 300 steps end on see-through heads.
`--config.disc.alpha_channel=False` gives the paper's RGB D.

  python launch.py --config=configs/demo.py --workdir=runs/demo
"""
from configs import default


def get_config():
    c = default.get_config()
    c.data.path = "data/synthetic64"
    c.data.synthetic = True
    c.data.synthetic_num_images = 256
    c.data.worker_count = 0

    c.model.z_dim = 64
    c.model.w_dim = 64
    c.model.mapping_layers = 2
    c.model.uv_resolution = 64
    c.model.mouth_resolution = 32
    c.model.channel_base = 512
    c.model.channel_max = 32
    c.model.mouth_channel_base = 256
    c.model.mouth_channel_max = 32
    c.model.gd_channels = 8
    c.model.expression_dims = 16

    c.disc.channel_base = 1024
    c.disc.channel_max = 64
    c.disc.mbstd_group_size = 4
    c.disc.alpha_channel = True  # not in the paper: D also sees alpha (see configs/default.py)

    c.render.resolution = 64
    c.render.backend = "auto"    # the C++ compositor on a CPU (rasterizer/composite_cpu.cc)
    c.loss.vgg16 = "random"     # no download: an explicit, fixed random VGG16 (logged)
    c.loss.vgg_layers = ("relu1_2", "relu2_2")  # the shallow layers: a quarter of the cost

    c.train.batch_size = 8
    c.train.total_kimg = 2.4    # 300 steps: about 12 minutes on 2 CPU cores, set-up included
    c.train.log_every = 25
    c.train.checkpoint_every = 100
    c.train.sample_every = 150
    c.train.swd_every = 10**9   # measured at the start and at the end only
    c.train.swd_num_images = 128
    return c
