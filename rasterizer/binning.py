"""Tile binning: every (Gaussian, 16x16 tile) intersection, sorted by tile then depth.

Static shapes throughout (jit-friendly, no host round trip):

1. Each Gaussian's tile rectangle: columns floor((mu_x - r) / 16) ... ceil((mu_x + r) / 16) - 1,
   rows likewise, clamped to the tile grid; culled Gaussians (radius 0) get an empty rectangle.
2. Exclusive cumsum of the rectangle sizes gives each Gaussian's first slot in a buffer of static
   capacity K; slot k belongs to Gaussian `cummax(scatter(first slot -> index))[k]` and covers
   that Gaussian's (k - first slot)-th tile, row-major inside its rectangle.
3. One global sort on uint32 keys `(tile_id << rank_bits) | depth_rank` (`depth_ranks`: the
   front-to-back rank of each Gaussian, ties in index order): a single-key unsigned sort is what
   XLA turns into a radix sort on GPU, and the rank bits give back the Gaussian, so no payload
   rides along. Padding slots get key 0xFFFFFFFF and sort last.
   When T * 2^rank_bits does not fit in 32 bits (e.g. > 2^22 Gaussians at 512^2), a two-key
   `lax.sort` on (tile_id, depth_rank) is used instead; same order, just slower.
4. Per-tile [start, end) from `searchsorted` on the sorted keys.

With the conics and opacities given (as `render` does), step 2's slots are also culled
exactly: a (Gaussian, tile) pair is dropped when o exp(power) < 1/255 at every point of the
rectangle spanned by the tile's pixel centres (`tile_alpha_bound`), i.e. where the compositor
would skip the Gaussian at all 256 pixels anyway. Outputs and gradients are unchanged (up to
float rounding of the chunked products); the compositor's work shrinks by the culled share
(about a quarter for a trained demo head, half at initialisation). The test is the tile-level
"exact intersection" of gsplat/Speedy-Splat, against the square bounding box of the 3-sigma
radius alone.

Intersections beyond K are dropped and counted in `overflow` (never silently).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
from jax import lax

TILE_SIZE = 16
_PADDING_KEY = 0xFFFFFFFF
_INT32_MAX = 2**31 - 1
DEFAULT_INTERSECTIONS_PER_GAUSSIAN = 8


class Bins(NamedTuple):
    """Sorted tile intersections.

    gaussian_ids (B, K)    int32  Gaussian index in [0, N) of each sorted intersection;
                                  tile-major, front to back within a tile; entries past the
                                  real count are padding (never inside a tile range)
    tile_ranges  (B, T, 2) int32  [start, end) into gaussian_ids of row-major tile t,
                                  T = ceil(H / 16) * ceil(W / 16)
    overflow     (B,)      int32  intersections that did not fit in K (dropped)
    intersections (B,)     int32  all (Gaussian, tile) slots of the 3-sigma rectangles, what K
                                  must hold for nothing to drop (= K + overflow when it
                                  overflows; saturates at 2^31 - 1)
    """

    gaussian_ids: jax.Array
    tile_ranges: jax.Array
    overflow: jax.Array
    intersections: jax.Array


def tile_grid(width: int, height: int) -> tuple[int, int]:
    """(tiles_x, tiles_y) covering a width x height image."""
    return -(-width // TILE_SIZE), -(-height // TILE_SIZE)


def tile_rectangles(means2d: jax.Array, radii: jax.Array, width: int, height: int):
    """Tile rectangle [x0, x1) x [y0, y1) of each Gaussian, int32 each (..., N); empty if culled."""
    tiles_x, tiles_y = tile_grid(width, height)
    valid = radii > 0
    # Culled Gaussians may carry garbage (NaN) coordinates; never convert those to int.
    mu = jnp.where(valid[..., None], means2d, 0.0)
    r = radii.astype(means2d.dtype)

    def span(center, count):
        lo = jnp.clip(jnp.floor((center - r) / TILE_SIZE), 0, count)
        hi = jnp.clip(jnp.ceil((center + r) / TILE_SIZE), 0, count)
        return lo.astype(jnp.int32), hi.astype(jnp.int32)

    x0, x1 = span(mu[..., 0], tiles_x)
    y0, y1 = span(mu[..., 1], tiles_y)
    x1 = jnp.where(valid, jnp.maximum(x1, x0), x0)
    y1 = jnp.where(valid, jnp.maximum(y1, y0), y0)
    return x0, x1, y0, y1


def tile_alpha_bound(means2d, conics, opacities, tile_x, tile_y, width, height):
    """log of the largest o exp(power) over a tile's pixel-centre rectangle, (...) float.

    means2d (..., 2), conics (..., 3) = (a, b, c) with power = -0.5 (a dx^2 + c dy^2) - b dx dy,
    opacities (...), tile_x, tile_y (...) int tile coordinates. The quadratic form q = -2 power
    is convex (a, c > 0, ac > b^2 for projected Gaussians), so its minimum over the rectangle
    is 0 when the mean lies inside, else on the boundary: on each edge a 1D quadratic whose
    minimiser (-b dx / c on a vertical edge, -b dy / a on a horizontal one) is clamped to the
    edge. Pixel centres lie inside the rectangle, so the bound is never below the compositor's
    largest alpha in that tile (the cull is conservative).
    """
    dtype = means2d.dtype
    half = 0.5
    x_lo = (tile_x * TILE_SIZE).astype(dtype) + half
    y_lo = (tile_y * TILE_SIZE).astype(dtype) + half
    x_hi = jnp.minimum(x_lo + (TILE_SIZE - 1), width - half)
    y_hi = jnp.minimum(y_lo + (TILE_SIZE - 1), height - half)
    dx_lo, dx_hi = x_lo - means2d[..., 0], x_hi - means2d[..., 0]
    dy_lo, dy_hi = y_lo - means2d[..., 1], y_hi - means2d[..., 1]
    a, b, c = conics[..., 0], conics[..., 1], conics[..., 2]
    # Degenerate conics only belong to culled Gaussians (radius 0, no slots); keep them finite.
    a_safe = jnp.where(a > 0, a, 1.0)
    c_safe = jnp.where(c > 0, c, 1.0)

    def form(dx, dy):
        return a * dx * dx + 2.0 * b * dx * dy + c * dy * dy

    def on_vertical(dx):
        return form(dx, jnp.clip(-b * dx / c_safe, dy_lo, dy_hi))

    def on_horizontal(dy):
        return form(jnp.clip(-b * dy / a_safe, dx_lo, dx_hi), dy)

    edges = jnp.minimum(jnp.minimum(on_vertical(dx_lo), on_vertical(dx_hi)),
                        jnp.minimum(on_horizontal(dy_lo), on_horizontal(dy_hi)))
    inside = (dx_lo <= 0) & (dx_hi >= 0) & (dy_lo <= 0) & (dy_hi >= 0)
    q_min = jnp.where(inside, 0.0, jnp.maximum(edges, 0.0))
    return jnp.log(jnp.maximum(opacities, 0.0)) - 0.5 * q_min


def saturating_cumsum(values: jax.Array, limit: int = _INT32_MAX) -> jax.Array:
    """Inclusive cumsum of non-negative int32 (M,) values, saturating at `limit` (< 2^31).

    Only the first K offsets matter, so saturation loses nothing but the exact overflow count
    (which then saturates too) when N * T intersections could exceed int32.
    """
    clipped = jnp.minimum(values, limit).astype(jnp.uint32)
    # uint32 holds the sum of two values <= 2^31 - 1 without wrapping.
    return lax.associative_scan(
        lambda a, b: jnp.minimum(a + b, jnp.uint32(limit)), clipped).astype(jnp.int32)


def depth_ranks(depths: jax.Array, valid: jax.Array, max_tie_rounds: int = 16):
    """Front-to-back rank of each Gaussian and its inverse, both (B, N) int32.

    depths, valid (B, N). Ties keep index order; invalid Gaussians rank last.

    An argsort drags an index payload through the sort, which XLA CPU does several times
    slower than a plain sort. Instead: one single-operand sort of the depths' float32 bit
    patterns, a binary search for each Gaussian's group of equal depths, then the members of
    each group claim its slots in index order (one scatter-min round per group member: exact
    float32 ties are common, ~1k pairs among 68k Gaussians, but groups are small). Groups
    larger than `max_tie_rounds` fall back to a stable argsort (one scalar `lax.cond`).
    """
    batch, num = depths.shape
    total = batch * num
    # Non-negative float32 bit patterns order like the values and stay below 0x80000000;
    # invalid Gaussians get unique keys above every valid one. (Valid depths are > 0.2 after
    # projection; negative ones would all tie at 0 and keep index order.)
    bits = lax.bitcast_convert_type(jnp.maximum(depths, 0).astype(jnp.float32), jnp.uint32)
    index = jnp.arange(num, dtype=jnp.int32)
    keys = jnp.where(valid, bits, jnp.uint32(0x80000000) + index.astype(jnp.uint32))
    group_start = jax.vmap(lambda s, k: jnp.searchsorted(s, k, side="left"))(
        lax.sort(keys, dimension=1), keys).astype(jnp.int32)
    image_offset = num * jnp.arange(batch, dtype=jnp.int32)[:, None]
    first_slot = (group_start + image_offset).reshape(-1)
    flat_index = jnp.arange(total, dtype=jnp.int32)

    def claim_round(state):
        placed, tie_offset, order, rounds = state
        slot = first_slot + tie_offset
        claim = jnp.full((total,), total, jnp.int32).at[jnp.where(placed, total, slot)].min(
            flat_index, mode="drop")
        won = ~placed & (claim[jnp.minimum(slot, total - 1)] == flat_index)
        order = order.at[jnp.where(won, slot, total)].set(flat_index, mode="drop")
        placed = placed | won
        return placed, tie_offset + (~placed).astype(jnp.int32), order, rounds + 1

    state = (jnp.zeros((total,), bool), jnp.zeros((total,), jnp.int32),
             jnp.zeros((total,), jnp.int32), 0)
    placed, tie_offset, order, _ = lax.while_loop(
        lambda s: jnp.any(~s[0]) & (s[3] < max_tie_rounds), claim_round, state)

    def from_claims():
        return first_slot + tie_offset, order

    def stable_argsort():
        by_depth = (jnp.argsort(keys, axis=1, stable=True).astype(jnp.int32)
                    + image_offset).reshape(-1)
        rank = jnp.zeros((total,), jnp.int32).at[by_depth].set(
            jnp.arange(total, dtype=jnp.int32))
        return rank, by_depth

    rank, order = lax.cond(jnp.all(placed), from_claims, stable_argsort)
    return (rank.reshape(batch, num) - image_offset, order.reshape(batch, num) - image_offset)


# Slack of the cull in log-alpha: float32 rounding of q (|q| < 2 ln 255 where it matters) is
# ~1e-6, so nothing the compositor would composite is ever dropped.
_CULL_SLACK = 1e-3


def _bin_one(means2d, radii, rank, order, conics, opacities, width, height, capacity,
             packed_keys):
    """One image's binning (rank, order from `depth_ranks`; conics, opacities None = no
    per-tile cull)."""
    num = means2d.shape[0]
    tiles_x, tiles_y = tile_grid(width, height)
    num_tiles = tiles_x * tiles_y
    x0, x1, y0, y1 = tile_rectangles(means2d, radii, width, height)
    rect_width = x1 - x0
    counts = rect_width * (y1 - y0)

    if num * num_tiles <= _INT32_MAX:
        inclusive = jnp.cumsum(counts, dtype=jnp.int32)
    else:
        inclusive = saturating_cumsum(counts)
    first_slot = inclusive - counts
    total = inclusive[-1]

    slots = jnp.arange(capacity, dtype=jnp.int32)
    # Gaussians sharing a first slot all have count 0 except the last (largest index): max wins.
    owner = jnp.zeros((capacity,), jnp.int32).at[first_slot].max(
        jnp.arange(num, dtype=jnp.int32), mode="drop")
    owner = lax.cummax(owner)
    local = slots - first_slot[owner]
    width_of_owner = jnp.maximum(rect_width[owner], 1)
    tile = ((y0[owner] + local // width_of_owner) * tiles_x
            + x0[owner] + local % width_of_owner)
    used = slots < total
    if conics is not None:
        bound = tile_alpha_bound(means2d[owner], conics[owner], opacities[owner],
                                 tile % tiles_x, tile // tiles_x, width, height)
        used = used & (bound >= math.log(1.0 / 255.0) - _CULL_SLACK)

    owner_rank = rank[owner]

    rank_bits = max(1, (num - 1).bit_length())
    num_used = jnp.sum(used, dtype=jnp.int32)
    if packed_keys:
        keys = (tile.astype(jnp.uint32) << rank_bits) | owner_rank.astype(jnp.uint32)
        keys = jnp.where(used, keys, jnp.uint32(_PADDING_KEY))
        # The rank identifies the Gaussian, so the keys alone are sorted (no payload: a
        # single-operand sort is several times faster on CPU and a plain radix sort on GPU).
        sorted_keys = lax.sort(keys)
        sorted_rank = sorted_keys & jnp.uint32((1 << rank_bits) - 1)
        gaussian_ids = order[jnp.minimum(sorted_rank, num - 1).astype(jnp.int32)]
        tile_starts = jnp.arange(num_tiles, dtype=jnp.uint32) << rank_bits
        starts = jnp.searchsorted(sorted_keys, tile_starts, side="left").astype(jnp.int32)
    else:
        tile_key = jnp.where(used, tile, num_tiles)
        sorted_tiles, _, gaussian_ids = lax.sort((tile_key, owner_rank, owner), num_keys=2)
        starts = jnp.searchsorted(sorted_tiles, jnp.arange(num_tiles, dtype=jnp.int32),
                                  side="left").astype(jnp.int32)
    starts = jnp.minimum(starts, num_used)
    ends = jnp.concatenate([starts[1:], num_used[None]])
    overflow = jnp.maximum(total - capacity, 0)
    return gaussian_ids, jnp.stack([starts, ends], -1), overflow, total


def bin_gaussians(means2d: jax.Array, depths: jax.Array, radii: jax.Array, width: int,
                  height: int, capacity: int, packed_keys: Optional[bool] = None,
                  conics: Optional[jax.Array] = None,
                  opacities: Optional[jax.Array] = None) -> Bins:
    """Bins B images' Gaussians into 16x16 tiles.

    means2d (B, N, 2) float, depths (B, N) float (> 0 where radii > 0; ordered as float32),
    radii (B, N) int32 (0 = culled);
    width, height, capacity (K >= 1) static ints -> `Bins`. Not differentiable (integer output).
    packed_keys: None = the uint32-key sort whenever T * 2^rank_bits < 2^32, else the two-key
    sort; True/False force one (tests compare both).
    conics (B, N, 3), opacities (B, N): both or neither; given, (Gaussian, tile) pairs whose
    alpha stays below 1/255 over the whole tile are culled (`tile_alpha_bound`). The capacity
    K still counts every slot of the 3-sigma rectangles (the cull runs after enumeration), so
    `overflow` is the same with or without it.
    """
    chex.assert_rank([means2d, depths, radii], [3, 2, 2])
    batch, num = means2d.shape[:2]
    chex.assert_shape(means2d, (batch, num, 2))
    chex.assert_shape([depths, radii], (batch, num))
    if num < 1:
        raise ValueError("bin_gaussians needs at least one Gaussian (N >= 1)")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    tiles_x, tiles_y = tile_grid(width, height)
    if packed_keys is None:
        packed_keys = (tiles_x * tiles_y) << max(1, (num - 1).bit_length()) < 2**32
    if (conics is None) != (opacities is None):
        raise ValueError("bin_gaussians: pass both conics and opacities (tile cull) or neither")
    if conics is not None:
        chex.assert_shape(conics, (batch, num, 3))
        chex.assert_shape(opacities, (batch, num))
        conics, opacities = lax.stop_gradient(conics), lax.stop_gradient(opacities)
    means2d, depths = lax.stop_gradient(means2d), lax.stop_gradient(depths)
    rank, order = depth_ranks(depths, radii > 0)
    ids, ranges, overflow, total = jax.vmap(
        lambda m, r, rk, o, cn, op: _bin_one(m, r, rk, o, cn, op, width, height, int(capacity),
                                             packed_keys),
        in_axes=(0, 0, 0, 0, None if conics is None else 0, None if conics is None else 0))(
        means2d, radii, rank, order, conics, opacities)
    return Bins(gaussian_ids=ids, tile_ranges=ranges, overflow=overflow, intersections=total)


def default_capacity(num_gaussians: int, width: int, height: int) -> int:
    """Default intersection capacity K for N Gaussians on a width x height image.

    Never more than N * T (every Gaussian in every tile, so small images never overflow);
    otherwise max(DEFAULT_INTERSECTIONS_PER_GAUSSIAN * N, 4 * T), rounded up to 1024. A
    68k-Gaussian head with few-pixel footprints needs about 3.2 tiles per Gaussian at 512^2
    (experiments/benchmark_rasterizer.py); the factor leaves headroom for the larger
    footprints of early training. Memory: a few int32 arrays of K entries per image.
    """
    tiles_x, tiles_y = tile_grid(width, height)
    num_tiles = tiles_x * tiles_y
    wanted = max(DEFAULT_INTERSECTIONS_PER_GAUSSIAN * num_gaussians, 4 * num_tiles)
    wanted = 1024 * math.ceil(wanted / 1024)
    return max(1, min(num_gaussians * num_tiles, wanted))

