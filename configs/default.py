"""Shared defaults: the paper's settings (Sec. 2.4, StyleGAN2/EG3D hyper-parameters).

Every other config starts from `get_config()` here and overrides what differs.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Data: an FFHQ-style folder (README "Data"); `synthetic` builds the embedded dataset.
    c.data = ml_collections.ConfigDict()
    c.data.path = "data/ffhq"
    c.data.synthetic = False          # True: render the embedded synthetic dataset when missing
    c.data.synthetic_num_images = 0
    c.data.synthetic_uv_resolution = 128  # texel density of the synthetic heads' textures
    c.data.flip = True                # horizontal flip: image, camera and FLAME mirrored
    c.data.worker_count = 0

    # Head model: None = the embedded template head; paths = the user's FLAME files.
    c.head = ml_collections.ConfigDict()
    c.head.flame_model = ml_collections.FieldReference(None, field_type=str)
    c.head.flame_uv = ml_collections.FieldReference(None, field_type=str)
    c.head.frame_kind = "consecutive"  # ablation (Tab. 1c): "global" | "naive" | "consecutive"
    # ln γs (Sec. 2.1: the spacing of adjacent Gaussians). None measures the texel spacing at
    # the configured UV resolution (e^-5.51 for the template at 256²); a number fixes it.
    c.head.log_gamma_s = ml_collections.FieldReference(None, field_type=float)

    # Generator (Sec. 2.2-2.3).
    c.model = ml_collections.ConfigDict()
    c.model.z_dim = 512
    c.model.w_dim = 512
    c.model.c_dim = 25                 # EG3D-style camera conditioning of the mapping network
    c.model.mapping_layers = 8
    c.model.uv_resolution = 256        # F^uv: 256x256x14
    c.model.mouth_resolution = 64      # F^mouth: 64x64x14
    c.model.channel_base = 32768
    c.model.channel_max = 512
    c.model.mouth_channel_base = 32768   # g_mouth64.txt: the official 64² listing (512 channels)
    c.model.mouth_channel_max = 512
    c.model.conv_clamp = 256
    c.model.gd_channels = 32
    c.model.expression_dims = 50
    c.model.dtype = "float32"          # "bfloat16": bf16 convolutions, fp32 params
    # Generation modules (ablation, Tab. 1c; configs/ablation.py): False drops G_m (the mouth
    # map is the face map's crop) / G_d (the expression then conditions G, rerun per frame).
    c.model.mouth_generator = True
    c.model.dynamic_module = True

    # Discriminator (EG3D's single camera-conditioned D).
    c.disc = ml_collections.ConfigDict()
    c.disc.channel_base = 32768
    c.disc.channel_max = 512
    c.disc.conv_clamp = 256
    c.disc.mbstd_group_size = 4
    # Not in the paper (its D sees RGB): True gives D the alpha as a 4th channel, the real
    # images' mattes (RGBA PNGs) against the rendered alpha, as GGHead's `use_masks`. It keeps
    # the demo's short run from settling on see-through heads (README, "The demo, measured").
    c.disc.alpha_channel = False

    # Rendering.
    c.render = ml_collections.ConfigDict()
    c.render.resolution = 512
    c.render.backend = "auto"  # "jax" | "cpu" | "triton" | "auto" (triton on GPU, cpu on CPU)
    # White: the heads have no background, so the data must not have one either (FFHQ crops
    # matted onto white, as GGHead does with MODNet masks; README, "Datasets").
    c.render.background = 1.0
    # Tile-intersection slots per image; None = the rasterizer's default. Training grows it
    # (and recompiles) when a step overflows, with a warning; see train.check_overflow.
    c.render.capacity = ml_collections.FieldReference(None, field_type=int)

    # Losses, Eq. 2.
    c.loss = ml_collections.ConfigDict()
    c.loss.lambda_offset = 0.1
    c.loss.lambda_scale = 0.1
    c.loss.lambda_gd = 0.001
    c.loss.lambda_id = 0.1
    c.loss.r1_gamma = 1.0
    c.loss.r1_interval = 16
    # VGG16 for L_ID: a path to weights converted by experiments/convert_vgg16.py, or
    # "random" (a fixed random-initialised VGG16, an explicit choice logged at start).
    c.loss.vgg16 = "vgg16.npz"
    c.loss.vgg_layers = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")

    # Optimisers (StyleGAN2).
    c.optim = ml_collections.ConfigDict()
    c.optim.g_lr = 0.0025
    c.optim.d_lr = 0.002
    c.optim.b1 = 0.0
    c.optim.b2 = 0.99
    c.optim.eps = 1e-8

    # Schedule.
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32            # global batch
    c.train.total_kimg = 25000.0       # 25M images, as EG3D
    c.train.ema_kimg = 10.0
    c.train.ema_rampup = 0.05
    c.train.style_mixing_prob = 0.9
    c.train.noise_mode = "random"      # per-layer noise during training: random | const | none
    c.train.gpc_reg_prob = 0.5         # EG3D's generator pose conditioning swap probability
    c.train.truncation_psi_samples = 1.0
    c.train.log_every = 100            # steps
    c.train.checkpoint_every = 1000    # steps
    c.train.keep_checkpoints = 3
    c.train.sample_every = 1000
    c.train.swd_every = 5000
    c.train.swd_num_images = 1024
    return c
