"""Losses and regularisers of RETA3D (Sec. 2.4, Eq. 2) and the discriminator's R1.

Generator objective (Eq. 2):
    L_G = L_adv + λ_o L_reg^offset + λ_s L_reg^scale + λ_r L_reg^{G_d} + λ_ID L_ID
with λ_o = λ_s = 0.1, λ_r = 0.001, λ_ID = 0.1 (`LossWeights`). The discriminator uses the
non-saturating logistic loss with R1 (γ = 1) applied lazily every 16 steps, as StyleGAN2
(whose training hyper-parameters the paper adopts).

All functions are pure jnp functions (jit/grad/pmap-safe) returning float32 scalars unless
stated. Logits are (B, 1) float32, as the EG3D/StyleGAN2 discriminator returns them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import chex
import jax
import jax.numpy as jnp

TARGET_SCALE = math.exp(-5.5)  # γs: about the spacing of neighbouring UV-sampled Gaussians.


def _safe_norm(x: jax.Array, axis=None) -> jax.Array:
    """Euclidean norm whose gradient at 0 is 0 (a subgradient) instead of NaN."""
    squared = jnp.sum(jnp.square(x), axis=axis)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def _check_logits(logits: jax.Array) -> None:
    """Logits must be (B, 1), as the discriminator returns them (not (B,), which would
    broadcast silently against (B, 1) elsewhere)."""
    chex.assert_rank(logits, 2)
    chex.assert_axis_dimension(logits, 1, 1)


# ---------------------------------------------------------------------------------------
# Adversarial terms.


def generator_adversarial(fake_logits: jax.Array) -> jax.Array:
    """L_adv = mean_b softplus(−D(I_G | π)); fake_logits (B, 1) float32 -> scalar."""
    _check_logits(fake_logits)
    return jnp.mean(jax.nn.softplus(-fake_logits))


def discriminator_adversarial(fake_logits: jax.Array, real_logits: jax.Array) -> jax.Array:
    """mean softplus(D(fake)) + mean softplus(−D(real)); each (B, 1) float32 -> scalar.

    The two batches may differ in size; each term is averaged over its own batch.
    """
    _check_logits(fake_logits)
    _check_logits(real_logits)
    return jnp.mean(jax.nn.softplus(fake_logits)) + jnp.mean(jax.nn.softplus(-real_logits))


def r1_penalty(
    d_apply: Callable[[jax.Array, jax.Array], jax.Array],
    real_images: jax.Array,
    cameras: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """R1 = mean_b ||∇_x D(x_b | π_b)||² on real images, and the real logits.

    d_apply(images (B, H, W, C), cameras (B, 25)) -> logits (B, 1) is the discriminator
    with its parameters closed over (build the closure inside the function you
    differentiate w.r.t. the discriminator parameters; the double backward works).
    As StyleGAN2: grads = ∂ sum_b D(x_b) / ∂x (per-sample gradients, since samples are
    independent; cameras are held fixed), penalty_b = sum over H, W, C of grads², then the
    batch mean. C is 3 (RGB), or 4 when D also sees alpha (`train.sees_alpha`): the penalty then
    covers the alpha channel too, as EG3D's covers both of its dual discriminator's images.
    Returns (penalty scalar float32, logits (B, 1) float32); the logits equal
    d_apply(real_images, cameras) and can serve the real term of the discriminator loss.
    """
    chex.assert_rank(real_images, 4)
    if real_images.shape[3] not in (3, 4):
        raise ValueError(f"real_images must be (B, H, W, 3) RGB or (B, H, W, 4) RGB+alpha, got "
                         f"{real_images.shape}")
    chex.assert_shape(cameras, (real_images.shape[0], 25))
    logits, pullback = jax.vjp(lambda images: d_apply(images, cameras), real_images)
    chex.assert_shape(logits, (real_images.shape[0], 1))
    (grads,) = pullback(jnp.ones_like(logits))
    per_sample = jnp.sum(jnp.square(grads), axis=(1, 2, 3))
    return jnp.mean(per_sample), logits


def r1_loss(penalty: jax.Array, gamma: float = 1.0, interval: int = 16) -> jax.Array:
    """The R1 term added to the discriminator loss on a regularisation step.

    penalty · γ/2 · interval: StyleGAN2's `loss_Dr1 = r1_penalty * (r1_gamma / 2)` times
    the lazy-regularisation gain (the term is applied only every `interval` steps, so it
    is scaled up to keep its average strength). Use interval=1 for non-lazy R1.
    """
    if interval < 1:
        raise ValueError(f"r1_loss: interval must be >= 1, got {interval}")
    return penalty * (gamma / 2.0) * interval


def lazy_regularization_adam(lr: float, b1: float, b2: float, interval: int) -> tuple[float, float, float]:
    """StyleGAN2's Adam correction for lazy regularisation every `interval` steps.

    mb_ratio = interval / (interval + 1); returns (lr·mb_ratio, b1**mb_ratio, b2**mb_ratio),
    so that one optimiser step per (interval + 1) minibatch passes keeps the same decay per
    image. E.g. D at lr 0.002, betas (0, 0.99), interval 16 -> (0.0018824, 0, 0.9905855).
    """
    if not isinstance(interval, int) or interval < 1:
        raise ValueError(f"lazy_regularization_adam: interval must be a positive int, got {interval!r}")
    mb_ratio = interval / (interval + 1)
    return lr * mb_ratio, b1**mb_ratio, b2**mb_ratio


# ---------------------------------------------------------------------------------------
# Regularisers of Sec. 2.4.


def _mean_norm_per_gaussian(vectors: jax.Array, mask: jax.Array | None) -> jax.Array:
    """vectors (B, N, 3): mean over valid Gaussians of each head of ||v_i||₂, then over B.

    mask: None, (N,) or (B, N) bool/0-1. Masked-out vectors are zeroed *before* the norm,
    so they reach neither the value nor the gradient (even if NaN); a head with no valid
    Gaussian contributes 0.
    """
    if mask is None:
        return jnp.mean(_safe_norm(vectors, axis=-1))
    mask = jnp.broadcast_to(jnp.asarray(mask).astype(bool), vectors.shape[:2])
    norms = _safe_norm(jnp.where(mask[..., None], vectors, 0.0), axis=-1)
    count = jnp.sum(mask, axis=1)
    return jnp.mean(jnp.sum(norms, axis=1) / jnp.maximum(count, 1))


def offset_regularizer(raw_offsets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """L_reg^offset = 1/N Σ_i ||o_i||₂; raw_offsets (B, N, 3) float32 -> scalar.

    o_i is the raw offset channel queried from the UV map, before the tanh of the
    decoding μ = p + γp·tanh(o)·C: the paper regularises "the offset value o_i queried from
    the UV feature map", and penalising the raw value keeps tanh out of saturation.
    Averaged over the N Gaussians of each head (only the valid ones when `mask` (N,) or
    (B, N) is given), then over the batch. Gradient at o_i = 0 is 0, not NaN.
    """
    chex.assert_rank(raw_offsets, 3)
    chex.assert_axis_dimension(raw_offsets, 2, 3)
    return _mean_norm_per_gaussian(raw_offsets, mask)


def scale_regularizer(
    scales: jax.Array, gamma_s=TARGET_SCALE, mask: jax.Array | None = None
) -> jax.Array:
    """L_reg^scale = 1/N Σ_i ||s_i − γs||₂; scales (B, N, 3) float32 -> scalar.

    s_i is the activated scale exp(raw + ln γs) (world units); γs the target, a float or an
    array broadcasting against (B, N, 3) such as (N, 1) per Gaussian (the training step passes
    `HeadBinding.log_gamma_s`, measured from the texel spacing; the paper's e^-5.5 is the
    default). Averaging as in `offset_regularizer`.
    """
    chex.assert_rank(scales, 3)
    chex.assert_axis_dimension(scales, 2, 3)
    return _mean_norm_per_gaussian(scales - gamma_s, mask)


def weight_l2(params) -> jax.Array:
    """L_reg^{G_d} = Σ_{w ∈ params} ||w||₂ -> scalar float32.

    For each parameter tensor (every leaf of the pytree: kernels, biases, ... of the
    dynamic module G_d; pass only G_d's subtree) the L2 (Frobenius) norm of the flattened
    tensor, summed over tensors; not squared, as the paper writes it (a group-lasso-like
    penalty). Gradient at an all-zero tensor (e.g. freshly initialised biases) is 0.
    """
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError("weight_l2: the parameter tree has no leaves")
    return sum(_safe_norm(leaf.astype(jnp.float32)) for leaf in leaves)


def identity_loss(
    vgg_features_fn: Callable[[jax.Array], Mapping[str, jax.Array] | list | tuple],
    image_dynamic: jax.Array,
    image_static: jax.Array,
    stop_gradient_static: bool = True,
) -> jax.Array:
    """L_ID = ||VGG(I_d) − VGG(I_s)||₁ -> scalar float32.

    image_dynamic, image_static: (B, H, W, 3) float32 in [-1, 1], rendered with and without
    the dynamic module. vgg_features_fn maps such images to a dict (or sequence) of feature
    maps; `reta3d.vgg.make_vgg16_features_fn` gives relu1_2, relu2_2, relu3_3, relu4_3 of
    VGG16 after ImageNet normalisation. The L1 is the mean absolute difference of each
    layer, averaged over the layers (each layer counts equally whatever its size).
    stop_gradient_static: the static image is the target the dynamic module must stay
    close to, so by default no gradient flows through it. Through I_d (F_d = F + ΔF) a plain
    gradient of this loss would still reach the static generator; the training step keeps
    it on G_d alone (`reta3d.train.generator_gradients`, Sec. 2.4).
    """
    chex.assert_rank(image_dynamic, 4)
    chex.assert_axis_dimension(image_dynamic, 3, 3)
    chex.assert_equal_shape([image_dynamic, image_static])
    if stop_gradient_static:
        image_static = jax.lax.stop_gradient(image_static)
    features_dynamic = vgg_features_fn(image_dynamic)
    features_static = vgg_features_fn(image_static)
    if isinstance(features_dynamic, Mapping):
        features_dynamic = [features_dynamic[name] for name in sorted(features_dynamic)]
        features_static = [features_static[name] for name in sorted(features_static)]
    if len(features_dynamic) == 0:
        raise ValueError("identity_loss: vgg_features_fn returned no feature maps")
    per_layer = [jnp.mean(jnp.abs(a - b)) for a, b in zip(features_dynamic, features_static)]
    return sum(per_layer) / len(per_layer)


# ---------------------------------------------------------------------------------------
# Eq. 2.


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of Eq. 2 (paper values) and the discriminator's R1 γ (paper: 1)."""

    offset: float = 0.1  # λ_o
    scale: float = 0.1  # λ_s
    dynamic_weights: float = 0.001  # λ_r
    identity: float = 0.1  # λ_ID
    r1_gamma: float = 1.0


# Keys of `generator_total`'s terms; "adversarial" is required, the rest optional
# (e.g. no dynamic module in a static-only ablation).
GENERATOR_TERMS = ("adversarial", "offset", "scale", "dynamic_weights", "identity")


def generator_total(terms: Mapping[str, jax.Array], weights: LossWeights = LossWeights()) -> jax.Array:
    """Eq. 2: adversarial + λ_o·offset + λ_s·scale + λ_r·dynamic_weights + λ_ID·identity.

    terms: scalars keyed by `GENERATOR_TERMS` (outputs of generator_adversarial,
    offset_regularizer, scale_regularizer, weight_l2, identity_loss). Missing optional terms
    contribute nothing; an unknown key raises, so a misspelt term cannot silently vanish.
    """
    unknown = sorted(set(terms) - set(GENERATOR_TERMS))
    if unknown:
        raise ValueError(f"generator_total: unknown term(s) {unknown}; expected keys from {GENERATOR_TERMS}")
    if "adversarial" not in terms:
        raise ValueError("generator_total: the 'adversarial' term is required")
    total = jnp.asarray(terms["adversarial"], jnp.float32)
    chex.assert_shape(total, ())
    for name in GENERATOR_TERMS[1:]:
        if name in terms:
            value = jnp.asarray(terms[name], jnp.float32)
            chex.assert_shape(value, ())
            total = total + getattr(weights, name) * value
    return total
