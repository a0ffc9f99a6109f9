"""StyleGAN2-ADA building blocks and networks (Flax linen, NHWC), PyTorch-checkpoint compatible.

- `ops`: upfirdn2d, up/downsample2d, conv2d_resample, modulated_conv2d, bias_act,
  normalize_2nd_moment, minibatch_std.
- `stylegan2`: layers, MappingNetwork, SynthesisNetwork, Generator, Discriminator, style mixing.
- `convert`: PyTorch state dict <-> Flax variables, module configs, orbax save/load.
"""
from reta3d.networks import ops
from reta3d.networks.stylegan2 import (
    Conv2dLayer,
    Discriminator,
    DiscriminatorBlock,
    DiscriminatorEpilogue,
    FullyConnectedLayer,
    Generator,
    MappingNetwork,
    SynthesisBlock,
    SynthesisLayer,
    SynthesisNetwork,
    ToFeatureLayer,
    ToRGBLayer,
    apply_style_mixing,
    channels_at,
    mix_styles,
    style_mixing_crossover,
    synthesis_num_ws,
)

__all__ = [
    "ops",
    "Conv2dLayer",
    "Discriminator",
    "DiscriminatorBlock",
    "DiscriminatorEpilogue",
    "FullyConnectedLayer",
    "Generator",
    "MappingNetwork",
    "SynthesisBlock",
    "SynthesisLayer",
    "SynthesisNetwork",
    "ToFeatureLayer",
    "ToRGBLayer",
    "apply_style_mixing",
    "channels_at",
    "mix_styles",
    "style_mixing_crossover",
    "synthesis_num_ws",
]
