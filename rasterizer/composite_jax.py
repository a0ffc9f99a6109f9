"""Pure-JAX tile compositing with an explicit reverse-order backward (jax.custom_vjp).

Formulation (memory grows with N and the number of tiles, never with N x pixels):

- The B images' tiles are flattened into one pool of B*T tiles. Each tile's sorted list
  (a [start, end) range of `gaussian_ids`) is walked in chunks of CHUNK_SIZE Gaussians.
- One `lax.while_loop`; every iteration takes the `tiles_per_step` live tiles with the most
  chunks left (`lax.top_k`, so long lists start early and the tail stays short) and composites
  each one's next chunk for its 256 pixels at once: alpha is a (G, 256, S) array, the
  transmittance inside the chunk a cumulative product of (1 - alpha), and the colors a
  (256, S) @ (S, C) matmul. A tile leaves the pool when its list is exhausted or
  all its pixels have stopped (T would drop below 1e-4), the early exit of the reference.
- The backward walks the same chunks in reverse, starting at the chunk holding the tile's
  last composited Gaussian, recovers the transmittance before each Gaussian by division
  (T_before = T_after / prod(1 - alpha), as the reference 3DGS backward does) and carries,
  per pixel, the weighted color/depth of everything behind. Per-Gaussian gradients are
  scatter-added into (B*N, ...) accumulators.

Semantics are the contract's (reference 3DGS `renderCUDA`): pixel (i, j) at (j + .5, i + .5),
power = -0.5 (a dx^2 + c dy^2) - b dx dy, skip power > 0, alpha = min(0.99, o exp(power)),
skip alpha < 1/255, stop before T < 1e-4 (that Gaussian not composited),
color = sum c alpha T + T_final background, alpha_out = 1 - T_final, depth = sum z alpha T.

Deviations, both deliberate:
- the cumulative product inside a chunk may associate differently from a running product
  (float rounding, ~1e-7 relative), so a Gaussian whose T lands within that of 1e-4 can be
  decided differently from a strictly sequential implementation;
- where alpha is clamped to 0.99, the gradient w.r.t. opacity and the 2D Gaussian is zero
  (the derivative of the min), as gsplat does; the reference 3DGS ignores the clamp there.
"""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax import lax

from rasterizer.binning import TILE_SIZE, tile_grid
from rasterizer.projection import stack_last

CHUNK_SIZE = 64
PIXELS_PER_TILE = TILE_SIZE * TILE_SIZE
ALPHA_MAX = 0.99
ALPHA_MIN = 1.0 / 255.0
TRANSMITTANCE_MIN = 1e-4
_HIGHEST = lax.Precision.HIGHEST


def tiles_per_step(total_tiles: int) -> int:
    """How many tiles one loop iteration composites: (G, 256, 64) arrays per step.

    On CPU 16..64 (every iteration has a fixed cost, but a large G wastes lanes on the short
    tail of the busiest tiles; measured at 512^2, G = 16 is as fast as 64 for one image and
    64 is ~30% faster for four); on accelerators 1024 (parallelism; 1024 x 256 x 64 floats
    is 64 MiB per intermediate).
    """
    if jax.default_backend() == "cpu":
        per_step = min(64, max(16, total_tiles // 64))
    else:
        per_step = 1024
    return max(1, min(total_tiles, per_step))


def _pixel_centers(tiles, num_tiles, tiles_x, width, height, dtype):
    """(G,) flat tile ids -> pixel x, y (G, 256) and in-image mask (G, 256)."""
    local = tiles % num_tiles
    pixel = jnp.arange(PIXELS_PER_TILE, dtype=jnp.int32)
    col = (local % tiles_x)[:, None] * TILE_SIZE + pixel % TILE_SIZE
    row = (local // tiles_x)[:, None] * TILE_SIZE + pixel // TILE_SIZE
    inside = (col < width) & (row < height)
    return col.astype(dtype) + 0.5, row.astype(dtype) + 0.5, inside


def _chunk(tiles, chunk_index, tile_ranges, live):
    """List positions (G, S) of chunk `chunk_index` of each selected tile and their validity."""
    offsets = jnp.arange(CHUNK_SIZE, dtype=jnp.int32)
    positions = tile_ranges[tiles, 0][:, None] + chunk_index[:, None] * CHUNK_SIZE + offsets
    valid = live[:, None] & (positions < tile_ranges[tiles, 1][:, None])
    return positions, valid


def _alphas(px, py, means2d, conics, opacities, position_valid):
    """Alpha of S Gaussians at 256 pixels per tile, all (G, 256, S).

    px, py (G, 256); means2d (G, S, 2); conics (G, S, 3); opacities (G, S).
    Returns dx, dy, exp(power), the unclamped o exp(power), alpha and the mask of the
    Gaussians that count (valid position, power <= 0, alpha >= 1/255).
    """
    dx = px[:, :, None] - means2d[:, None, :, 0]
    dy = py[:, :, None] - means2d[:, None, :, 1]
    a, b, c = (conics[:, None, :, k] for k in range(3))
    power = -0.5 * (a * dx * dx + c * dy * dy) - b * dx * dy
    gauss = jnp.exp(jnp.minimum(power, 0.0))
    raw = opacities[:, None, :] * gauss
    alpha = jnp.minimum(raw, ALPHA_MAX)
    counts = position_valid[:, None, :] & (power <= 0) & (alpha >= ALPHA_MIN)
    return dx, dy, gauss, raw, alpha, counts


def _triangular(dtype):
    """(S, S) matrix M with (x @ M)[k] = sum_{j > k} x[j] (suffix sums as one matmul)."""
    j = jnp.arange(CHUNK_SIZE)[:, None]
    k = jnp.arange(CHUNK_SIZE)[None, :]
    return (j > k).astype(dtype)


def _tiles_to_image(values, batch, width, height):
    """(B*T, 256, ...) per-tile pixels -> (B, H, W, ...) image."""
    tiles_x, tiles_y = tile_grid(width, height)
    trailing = values.shape[2:]
    image = values.reshape((batch, tiles_y, tiles_x, TILE_SIZE, TILE_SIZE) + trailing)
    image = jnp.moveaxis(image, 3, 2).reshape(
        (batch, tiles_y * TILE_SIZE, tiles_x * TILE_SIZE) + trailing)
    return image[:, :height, :width]


def _image_to_tiles(image, width, height):
    """(B, H, W, ...) image -> (B*T, 256, ...) per-tile pixels, zero outside the image."""
    tiles_x, tiles_y = tile_grid(width, height)
    batch, trailing = image.shape[0], image.shape[3:]
    pad = [(0, 0), (0, tiles_y * TILE_SIZE - height), (0, tiles_x * TILE_SIZE - width)]
    image = jnp.pad(image, pad + [(0, 0)] * len(trailing))
    tiles = image.reshape((batch, tiles_y, TILE_SIZE, tiles_x, TILE_SIZE) + trailing)
    tiles = jnp.moveaxis(tiles, 2, 3)
    return tiles.reshape((batch * tiles_y * tiles_x, PIXELS_PER_TILE) + trailing)


def _flatten(means2d, conics, opacities, colors, depths, gaussian_ids, tile_ranges):
    """Merges the batch: Gaussian b*N + n, list position b*K + k, tile b*T + t."""
    batch, num = opacities.shape
    capacity = gaussian_ids.shape[1]
    ids = (gaussian_ids + num * jnp.arange(batch, dtype=jnp.int32)[:, None]).reshape(-1)
    ranges = (tile_ranges + capacity * jnp.arange(batch, dtype=jnp.int32)[:, None, None])
    return (means2d.reshape(batch * num, 2), conics.reshape(batch * num, 3),
            opacities.reshape(-1), colors.reshape(batch * num, -1), depths.reshape(-1),
            ids, ranges.reshape(-1, 2))


def _check_inputs(means2d, conics, opacities, colors, depths, background, gaussian_ids,
                  tile_ranges, width, height):
    chex.assert_rank([means2d, conics, opacities, colors, depths, background, gaussian_ids,
                      tile_ranges], [3, 3, 2, 3, 2, 2, 2, 3])
    batch, num = opacities.shape
    channels = colors.shape[-1]
    tiles_x, tiles_y = tile_grid(width, height)
    chex.assert_shape(means2d, (batch, num, 2))
    chex.assert_shape(conics, (batch, num, 3))
    chex.assert_shape(colors, (batch, num, channels))
    chex.assert_shape(depths, (batch, num))
    chex.assert_shape(background, (batch, channels))
    chex.assert_shape(gaussian_ids, (batch, None))
    chex.assert_shape(tile_ranges, (batch, tiles_x * tiles_y, 2))


def _forward(means2d, conics, opacities, colors, depths, background, gaussian_ids, tile_ranges,
             width, height):
    _check_inputs(means2d, conics, opacities, colors, depths, background, gaussian_ids,
                  tile_ranges, width, height)
    batch, channels, dtype = opacities.shape[0], colors.shape[-1], means2d.dtype
    tiles_x, tiles_y = tile_grid(width, height)
    num_tiles = tiles_x * tiles_y
    total_tiles = batch * num_tiles
    step = tiles_per_step(total_tiles)
    f_means, f_conics, f_opac, f_colors, f_depths, ids, ranges = _flatten(
        means2d, conics, opacities, colors, depths, gaussian_ids, tile_ranges)

    list_length = ranges[:, 1] - ranges[:, 0]
    num_chunks = (list_length + CHUNK_SIZE - 1) // CHUNK_SIZE
    _, _, inside = _pixel_centers(jnp.arange(total_tiles), num_tiles, tiles_x, width, height,
                                  dtype)
    state = dict(
        chunks_left=num_chunks,
        trans=jnp.ones((total_tiles, PIXELS_PER_TILE), dtype),
        color=jnp.zeros((total_tiles, PIXELS_PER_TILE, channels), dtype),
        depth=jnp.zeros((total_tiles, PIXELS_PER_TILE), dtype),
        last=jnp.full((total_tiles, PIXELS_PER_TILE), -1, jnp.int32),
        # Pixels outside the image are "stopped" from the start: they never hold a tile back.
        stopped=~inside,
    )

    def body(state):
        chunks_left, tiles = lax.top_k(state["chunks_left"], step)
        live = chunks_left > 0
        positions, position_valid = _chunk(tiles, num_chunks[tiles] - chunks_left, ranges, live)
        gid = ids[jnp.where(position_valid, positions, 0)]
        px, py, _ = _pixel_centers(tiles, num_tiles, tiles_x, width, height, dtype)
        _, _, _, _, alpha, counts = _alphas(px, py, f_means[gid], f_conics[gid], f_opac[gid],
                                         position_valid)
        stopped = state["stopped"][tiles]
        trans0 = state["trans"][tiles]
        counts = counts & ~stopped[:, :, None]
        keep = jnp.where(counts, 1.0 - alpha, 1.0)
        # T after each Gaussian as if none had stopped yet; T is non-increasing, so the
        # Gaussians composited are exactly those with T_after >= 1e-4.
        after = trans0[:, :, None] * lax.cumprod(keep, axis=2)
        before = after / keep
        composited = counts & (after >= TRANSMITTANCE_MIN)
        weight = jnp.where(composited, alpha * before, 0.0)

        color = state["color"][tiles] + jnp.einsum(
            "gps,gsc->gpc", weight, f_colors[gid], precision=_HIGHEST)
        depth = state["depth"][tiles] + jnp.einsum(
            "gps,gs->gp", weight, f_depths[gid], precision=_HIGHEST)
        trans = trans0 * jnp.prod(jnp.where(composited, 1.0 - alpha, 1.0), -1)
        last = jnp.maximum(state["last"][tiles],
                           jnp.max(jnp.where(composited, positions[:, None, :], -1), -1))
        stopped = stopped | jnp.any(counts & ~composited, -1)
        left = jnp.where(jnp.all(stopped, -1), 0, jnp.maximum(chunks_left - 1, 0))

        def put(name, value):
            return state[name].at[tiles].set(value, unique_indices=True)

        return dict(chunks_left=put("chunks_left", left), trans=put("trans", trans),
                    color=put("color", color), depth=put("depth", depth),
                    last=put("last", last), stopped=put("stopped", stopped))

    state = lax.while_loop(lambda s: jnp.any(s["chunks_left"] > 0), body, state)
    tile_background = jnp.repeat(background, num_tiles, axis=0)
    color = state["color"] + state["trans"][:, :, None] * tile_background[:, None, :]
    outputs = (_tiles_to_image(color, batch, width, height),
               _tiles_to_image(1.0 - state["trans"], batch, width, height),
               _tiles_to_image(state["depth"], batch, width, height))
    return outputs, (state["trans"], state["last"])


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def composite_jax(means2d, conics, opacities, colors, depths, background, gaussian_ids,
                  tile_ranges, width, height):
    """Front-to-back alpha compositing of binned Gaussians (pure JAX).

    means2d (B, N, 2), conics (B, N, 3), opacities (B, N), colors (B, N, C), depths (B, N),
    background (B, C): float32 (or float64); gaussian_ids (B, K) int32 and tile_ranges
    (B, T, 2) int32 from `binning.bin_gaussians`; width, height static ints.
    Returns color (B, H, W, C), alpha (B, H, W) = 1 - final transmittance and depth (B, H, W)
    = sum z alpha T (not normalised). Differentiable w.r.t. all float inputs.
    """
    outputs, _ = _forward(means2d, conics, opacities, colors, depths, background, gaussian_ids,
                          tile_ranges, width, height)
    return outputs


def _composite_fwd(means2d, conics, opacities, colors, depths, background, gaussian_ids,
                   tile_ranges, width, height):
    outputs, (trans, last) = _forward(means2d, conics, opacities, colors, depths, background,
                                      gaussian_ids, tile_ranges, width, height)
    residuals = (means2d, conics, opacities, colors, depths, background, gaussian_ids,
                 tile_ranges, trans, last)
    return outputs, residuals


def _backward(width, height, residuals, cotangent_sets):
    """The reverse sweep for one or more cotangent sets (g_color, g_alpha, g_depth) at once:
    the alphas, transmittances and weights are recomputed once per chunk and shared, only the
    cotangent-dependent products are repeated. Returns one gradient tuple (means2d, conics,
    opacities, colors, depths, background) per set."""
    (means2d, conics, opacities, colors, depths, background, gaussian_ids, tile_ranges,
     trans_final, last) = residuals
    batch, num = opacities.shape
    channels, dtype = colors.shape[-1], means2d.dtype
    tiles_x, tiles_y = tile_grid(width, height)
    num_tiles = tiles_x * tiles_y
    total_tiles = batch * num_tiles
    step = tiles_per_step(total_tiles)
    f_means, f_conics, f_opac, f_colors, f_depths, ids, ranges = _flatten(
        means2d, conics, opacities, colors, depths, gaussian_ids, tile_ranges)
    suffix_exclusive = _triangular(dtype)
    tile_background = jnp.repeat(background, num_tiles, axis=0)

    per_set, behind, grad_backgrounds = [], [], []
    for g_color, g_alpha, g_depth in cotangent_sets:
        g_color_t = _image_to_tiles(g_color.astype(dtype), width, height)
        g_alpha_t = _image_to_tiles(g_alpha.astype(dtype), width, height)
        g_depth_t = _image_to_tiles(g_depth.astype(dtype), width, height)
        per_set.append((g_color_t, g_depth_t))
        grad_backgrounds.append(jnp.sum(
            (g_color_t * trans_final[:, :, None]).reshape(batch, -1, channels), axis=1))
        # Everything behind the current position, weighted by the cotangents: the background
        # term and 1 - T_final's alpha term start it.
        behind.append(trans_final * (jnp.einsum("tpc,tc->tp", g_color_t, tile_background,
                                                precision=_HIGHEST) - g_alpha_t))

    # Walk back from the chunk holding each tile's last composited Gaussian.
    last_in_tile = jnp.max(last, -1)
    num_chunks = jnp.where(last_in_tile >= ranges[:, 0],
                           (last_in_tile - ranges[:, 0]) // CHUNK_SIZE + 1, 0)
    zeros = dict(means2d=jnp.zeros_like(f_means), conics=jnp.zeros_like(f_conics),
                 opacities=jnp.zeros_like(f_opac), colors=jnp.zeros_like(f_colors),
                 depths=jnp.zeros_like(f_depths))
    state = dict(chunks_left=num_chunks, trans=trans_final, behind=tuple(behind),
                 grads=tuple(dict(zeros) for _ in cotangent_sets))

    def body(state):
        chunks_left, tiles = lax.top_k(state["chunks_left"], step)
        live = chunks_left > 0
        positions, position_valid = _chunk(tiles, chunks_left - 1, ranges, live)
        gid = ids[jnp.where(position_valid, positions, 0)]
        px, py, _ = _pixel_centers(tiles, num_tiles, tiles_x, width, height, dtype)
        mean, conic, opac = f_means[gid], f_conics[gid], f_opac[gid]
        color, depth = f_colors[gid], f_depths[gid]
        dx, dy, gauss, raw, alpha, counts = _alphas(px, py, mean, conic, opac, position_valid)
        composited = counts & (positions[:, None, :] <= last[tiles][:, :, None])
        keep = jnp.where(composited, 1.0 - alpha, 1.0)
        # Recovered by division, back to front: T_before_k = T_after_chunk / prod_{j>=k} keep_j
        # (>= T_final >= 1e-4 times it, so no underflow).
        suffix_keep = lax.cumprod(keep, axis=2, reverse=True)
        before = state["trans"][tiles][:, :, None] / suffix_keep
        weight = jnp.where(composited, alpha * before, 0.0)
        unclamped = composited & (raw <= ALPHA_MAX)
        a, b, c = (conic[:, None, :, k] for k in range(3))

        def put(array, value):
            return array.at[tiles].set(value, unique_indices=True)

        new_behind, new_grads = [], []
        for (g_color_t, g_depth_t), behind_all, grads in zip(per_set, state["behind"],
                                                             state["grads"]):
            gc, gd = g_color_t[tiles], g_depth_t[tiles]
            value = (jnp.einsum("gpc,gsc->gps", gc, color, precision=_HIGHEST)
                     + gd[:, :, None] * depth[:, None, :])
            weighted = weight * value
            behind_tiles = behind_all[tiles]
            behind_k = behind_tiles[:, :, None] + jnp.matmul(
                weighted, suffix_exclusive, precision=_HIGHEST)
            grad_alpha = jnp.where(composited, before * value - behind_k / keep, 0.0)
            grad_raw = jnp.where(unclamped, grad_alpha, 0.0)
            grad_power = grad_raw * raw
            grad = dict(
                means2d=stack_last([jnp.sum(grad_power * (a * dx + b * dy), 1),
                                    jnp.sum(grad_power * (b * dx + c * dy), 1)]),
                conics=stack_last([jnp.sum(grad_power * (-0.5 * dx * dx), 1),
                                   jnp.sum(grad_power * (-dx * dy), 1),
                                   jnp.sum(grad_power * (-0.5 * dy * dy), 1)]),
                opacities=jnp.sum(grad_raw * gauss, 1),
                colors=jnp.einsum("gps,gpc->gsc", weight, gc, precision=_HIGHEST),
                depths=jnp.einsum("gps,gp->gs", weight, gd, precision=_HIGHEST))
            new_behind.append(put(behind_all, behind_tiles + jnp.sum(weighted, -1)))
            new_grads.append({name: grads[name].at[gid].add(grad[name]) for name in grads})

        return dict(chunks_left=put(state["chunks_left"], jnp.maximum(chunks_left - 1, 0)),
                    trans=put(state["trans"], before[:, :, 0]), behind=tuple(new_behind),
                    grads=tuple(new_grads))

    state = lax.while_loop(lambda s: jnp.any(s["chunks_left"] > 0), body, state)
    return [(grads["means2d"].reshape(batch, num, 2), grads["conics"].reshape(batch, num, 3),
             grads["opacities"].reshape(batch, num),
             grads["colors"].reshape(batch, num, channels),
             grads["depths"].reshape(batch, num), grad_background)
            for grads, grad_background in zip(state["grads"], grad_backgrounds)]


def _composite_bwd(width, height, residuals, cotangents):
    return _backward(width, height, residuals, [cotangents])[0] + (None, None)


composite_jax.defvjp(_composite_fwd, _composite_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def composite_jax_pair(inputs, inputs_b, gaussian_ids, tile_ranges, width, height):
    """`composite_jax` of `inputs`, returned twice, with each copy's gradient going to its own
    handle: (outputs, outputs_b), where outputs_b's cotangent flows to `inputs_b`.

    inputs, inputs_b: (means2d, conics, opacities, colors, depths, background) as in
    `composite_jax`, holding the SAME values (inputs_b is a second handle on the same Gaussians,
    e.g. one whose upstream gradient is partly stopped; its values are never read). One
    forward and one reverse sweep serve both cotangents (`_backward` shares the alphas and
    transmittances), instead of the two sweeps of two separate pullbacks.
    """
    outputs, _ = _forward(*inputs, gaussian_ids, tile_ranges, width, height)
    return outputs, outputs


def _pair_fwd(inputs, inputs_b, gaussian_ids, tile_ranges, width, height):
    outputs, (trans, last) = _forward(*inputs, gaussian_ids, tile_ranges, width, height)
    return (outputs, outputs), (tuple(inputs) + (gaussian_ids, tile_ranges, trans, last))


def _pair_bwd(width, height, residuals, cotangents):
    grads, grads_b = _backward(width, height, residuals, list(cotangents))
    return grads, grads_b, None, None


composite_jax_pair.defvjp(_pair_fwd, _pair_bwd)
