"""Triton kernels for tile-based Gaussian compositing (forward and backward).

Only `triton.language` lives here; the launchers (jax_triton on CUDA, Triton's interpreter
on CPU) and the `jax.custom_vjp` are in `rasterizer/composite_triton.py`, which also makes
sure `TRITON_INTERPRET` is decided before this module's `@triton.jit` decorators run.

Layout, shared by both kernels (semantics: `composite_triton`'s docstring, the same contract
as `rasterizer.composite_jax`):
  one program per (image b, tile t): program id = b * NUM_TILES + t, tiles row-major;
  the tile's TILE_SIZE x TILE_SIZE pixels are one block, pixel p of the block sits at
  (row, col) = (tile_row * TILE_SIZE + p // TILE_SIZE, tile_col * TILE_SIZE + p % TILE_SIZE);
  pixels outside the image (right/bottom edge tiles) are masked on every load and store.
  All arrays are C-contiguous float32 / int32:
    means2d (B,N,2) conics (B,N,3) opacities (B,N) colors (B,N,C) depths (B,N)
    background (B,C) gaussian_ids (B,K) tile_ranges (B,T,2)
    per-pixel images (B,H,W[,C]).
  Colours are processed as CHANNELS_PAD = next power of two >= C lanes with a channel mask.

Why per-Gaussian scalar loads inside a batch: gsplat's CUDA kernel stages a batch of
Gaussians in shared memory and every thread reads them back one after another. Triton has
no addressable shared memory and one lane cannot read another lane's registers except
through a reduction (a block-wide barrier), so the idiomatic equivalent is a uniform scalar
load per parameter (broadcast to the whole block, served from L1 after the first warp).
The batch of BLOCK_G list entries is kept as the unit of the "all pixels done" test, which
needs a block-wide reduction and is therefore done once per batch, not once per Gaussian.
"""
import triton
import triton.language as tl

# Same thresholds as the reference 3DGS rasterizer (and `composite_jax`). Globals read by
# @triton.jit code must be tl.constexpr.
ALPHA_MAX = tl.constexpr(0.99)
ALPHA_MIN = tl.constexpr(1.0 / 255.0)
TRANSMITTANCE_MIN = tl.constexpr(1e-4)


@triton.jit
def _tile_pixels(program, NUM_TILES: tl.constexpr, TILES_X: tl.constexpr,
                 WIDTH: tl.constexpr, HEIGHT: tl.constexpr, TILE_SIZE: tl.constexpr):
    """Image index, tile index, pixel flat offsets, in-image mask, pixel centres (x, y)."""
    image = program // NUM_TILES
    tile = program % NUM_TILES
    pixel = tl.arange(0, TILE_SIZE * TILE_SIZE)
    row = (tile // TILES_X) * TILE_SIZE + pixel // TILE_SIZE
    col = (tile % TILES_X) * TILE_SIZE + pixel % TILE_SIZE
    in_image = (row < HEIGHT) & (col < WIDTH)
    # Offsets of masked pixels are never dereferenced; keep them in range anyway.
    pixel_offset = image * (HEIGHT * WIDTH) + tl.where(in_image, row * WIDTH + col, 0)
    x = col.to(tl.float32) + 0.5
    y = row.to(tl.float32) + 0.5
    return image, tile, pixel_offset, in_image, x, y


@triton.jit
def _tile_range(tile_ranges_ptr, image, tile, NUM_TILES: tl.constexpr,
                NUM_INTERSECTIONS: tl.constexpr):
    """[start, end) of this tile's slice of gaussian_ids, clamped into [0, K]."""
    range_ptr = tile_ranges_ptr + (image * NUM_TILES + tile) * 2
    start = tl.load(range_ptr)
    end = tl.load(range_ptr + 1)
    start = tl.minimum(tl.maximum(start, 0), NUM_INTERSECTIONS)
    end = tl.minimum(tl.maximum(end, start), NUM_INTERSECTIONS)
    return start, end


@triton.jit
def _load_gaussian(gaussian_ids_ptr, means2d_ptr, conics_ptr, opacities_ptr, depths_ptr,
                   image, position, NUM_GAUSSIANS: tl.constexpr,
                   NUM_INTERSECTIONS: tl.constexpr):
    """Scalar parameters of the Gaussian at list position `position` of image `image`.

    Returns the flat Gaussian index (b * N + id, clamped into range), whether the id was
    valid, and mean x, mean y, conic a, b, c, opacity, depth. An out-of-range id (a binning
    bug) gets opacity 0, so it can never be composited, instead of reading out of bounds.
    """
    gaussian_id = tl.load(gaussian_ids_ptr + image * NUM_INTERSECTIONS + position)
    valid = (gaussian_id >= 0) & (gaussian_id < NUM_GAUSSIANS)
    flat = image * NUM_GAUSSIANS + tl.minimum(tl.maximum(gaussian_id, 0), NUM_GAUSSIANS - 1)
    mean_x = tl.load(means2d_ptr + flat * 2, mask=valid, other=0.0)
    mean_y = tl.load(means2d_ptr + flat * 2 + 1, mask=valid, other=0.0)
    conic_a = tl.load(conics_ptr + flat * 3, mask=valid, other=1.0)
    conic_b = tl.load(conics_ptr + flat * 3 + 1, mask=valid, other=0.0)
    conic_c = tl.load(conics_ptr + flat * 3 + 2, mask=valid, other=1.0)
    opacity = tl.load(opacities_ptr + flat, mask=valid, other=0.0)
    depth = tl.load(depths_ptr + flat, mask=valid, other=0.0)
    return flat, valid, mean_x, mean_y, conic_a, conic_b, conic_c, opacity, depth


@triton.jit
def _gaussian_alpha(x, y, mean_x, mean_y, conic_a, conic_b, conic_c, opacity):
    """Per-pixel offsets, power, unclipped alpha, alpha and the 'Gaussian counts' mask.

    Written once and used by both kernels so that forward and backward make bit-identical
    skip decisions (the backward must composite exactly the Gaussians the forward did).
    """
    dx = x - mean_x
    dy = y - mean_y
    power = -0.5 * (conic_a * dx * dx + conic_c * dy * dy) - conic_b * dx * dy
    falloff = tl.exp(power)
    raw_alpha = opacity * falloff
    alpha = tl.minimum(raw_alpha, ALPHA_MAX)
    counts = (power <= 0.0) & (alpha >= ALPHA_MIN)
    return dx, dy, power, falloff, raw_alpha, alpha, counts


@triton.jit
def composite_forward_kernel(
    # inputs
    means2d_ptr, conics_ptr, opacities_ptr, colors_ptr, depths_ptr, background_ptr,
    gaussian_ids_ptr, tile_ranges_ptr,
    # outputs
    color_out_ptr,            # (B,H,W,C) float32
    alpha_out_ptr,            # (B,H,W) float32, 1 - final transmittance
    depth_out_ptr,            # (B,H,W) float32, not normalised
    final_transmittance_ptr,  # (B,H,W) float32 residual: T after the last composited one
    last_index_ptr,           # (B,H,W) int32 residual: tile-list position of the last
                              #   composited Gaussian (relative to the tile's start), -1 if none
    # sizes
    NUM_GAUSSIANS: tl.constexpr, NUM_INTERSECTIONS: tl.constexpr,
    NUM_CHANNELS: tl.constexpr, CHANNELS_PAD: tl.constexpr,
    WIDTH: tl.constexpr, HEIGHT: tl.constexpr, TILES_X: tl.constexpr, NUM_TILES: tl.constexpr,
    TILE_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Front-to-back compositing of one tile of one image (program = image * T + tile)."""
    image, tile, pixel_offset, in_image, x, y = _tile_pixels(
        tl.program_id(0), NUM_TILES, TILES_X, WIDTH, HEIGHT, TILE_SIZE)
    start, end = _tile_range(tile_ranges_ptr, image, tile, NUM_TILES, NUM_INTERSECTIONS)
    channel = tl.arange(0, CHANNELS_PAD)
    channel_valid = channel < NUM_CHANNELS

    num_pixels: tl.constexpr = TILE_SIZE * TILE_SIZE
    transmittance = tl.full((num_pixels,), 1.0, tl.float32)
    color = tl.zeros((num_pixels, CHANNELS_PAD), tl.float32)
    depth = tl.zeros((num_pixels,), tl.float32)
    last_index = tl.full((num_pixels,), -1, tl.int32)
    # Pixels outside the image start "done" so that they never hold up the early exit.
    alive = in_image

    batch_start = start
    num_alive = tl.sum(alive.to(tl.int32), axis=0)
    while (batch_start < end) & (num_alive > 0):
        batch_end = tl.minimum(batch_start + BLOCK_G, end)
        for position in range(batch_start, batch_end):
            flat, valid, mean_x, mean_y, conic_a, conic_b, conic_c, opacity, z = _load_gaussian(
                gaussian_ids_ptr, means2d_ptr, conics_ptr, opacities_ptr, depths_ptr,
                image, position, NUM_GAUSSIANS, NUM_INTERSECTIONS)
            dx, dy, power, falloff, raw_alpha, alpha, counts = _gaussian_alpha(
                x, y, mean_x, mean_y, conic_a, conic_b, conic_c, opacity)
            counts = counts & alive
            next_transmittance = transmittance * (1.0 - alpha)
            # Stopping Gaussian is not composited (3DGS: "if (test_T < 0.0001f) done").
            stops = counts & (next_transmittance < TRANSMITTANCE_MIN)
            composited = counts & (next_transmittance >= TRANSMITTANCE_MIN)
            weight = tl.where(composited, alpha * transmittance, 0.0)
            gaussian_color = tl.load(colors_ptr + flat * NUM_CHANNELS + channel,
                                     mask=channel_valid, other=0.0)
            color += weight[:, None] * gaussian_color[None, :]
            depth += weight * z
            transmittance = tl.where(composited, next_transmittance, transmittance)
            last_index = tl.where(composited, position - start, last_index)
            alive = alive & ~stops
        batch_start = batch_end
        num_alive = tl.sum(alive.to(tl.int32), axis=0)

    background = tl.load(background_ptr + image * NUM_CHANNELS + channel,
                         mask=channel_valid, other=0.0)
    color += transmittance[:, None] * background[None, :]
    pixel_channel_mask = in_image[:, None] & channel_valid[None, :]
    tl.store(color_out_ptr + pixel_offset[:, None] * NUM_CHANNELS + channel[None, :], color,
             mask=pixel_channel_mask)
    tl.store(alpha_out_ptr + pixel_offset, 1.0 - transmittance, mask=in_image)
    tl.store(depth_out_ptr + pixel_offset, depth, mask=in_image)
    tl.store(final_transmittance_ptr + pixel_offset, transmittance, mask=in_image)
    tl.store(last_index_ptr + pixel_offset, last_index, mask=in_image)


@triton.jit
def composite_backward_kernel(
    # forward inputs
    means2d_ptr, conics_ptr, opacities_ptr, colors_ptr, depths_ptr, background_ptr,
    gaussian_ids_ptr, tile_ranges_ptr,
    # forward residuals
    final_transmittance_ptr, last_index_ptr,
    # cotangents of the outputs
    grad_color_ptr,   # (B,H,W,C)
    grad_alpha_ptr,   # (B,H,W)
    grad_depth_ptr,   # (B,H,W)
    # zero-filled gradient buffers; the GPU launcher aliases each one to the output below
    # (jax_triton passes aliased buffers twice), so these pointers are never used here
    grad_means2d_init_ptr, grad_conics_init_ptr, grad_opacities_init_ptr,
    grad_colors_init_ptr, grad_depths_init_ptr,
    # outputs, accumulated with one atomic add per Gaussian per field per tile
    grad_means2d_ptr,    # (B,N,2)
    grad_conics_ptr,     # (B,N,3)
    grad_opacities_ptr,  # (B,N)
    grad_colors_ptr,     # (B,N,C)
    grad_depths_ptr,     # (B,N)
    # sizes
    NUM_GAUSSIANS: tl.constexpr, NUM_INTERSECTIONS: tl.constexpr,
    NUM_CHANNELS: tl.constexpr, CHANNELS_PAD: tl.constexpr,
    WIDTH: tl.constexpr, HEIGHT: tl.constexpr, TILES_X: tl.constexpr, NUM_TILES: tl.constexpr,
    TILE_SIZE: tl.constexpr,
):
    """Reverse walk over one tile's list, from the last composited Gaussian back to the start.

    Per pixel, with g_C, g_A, g_D the output cotangents, T_i the transmittance in front of
    Gaussian i, a_i its alpha and S_i = sum_{j>i} (c_j.g_C + z_j g_D) a_j T_j
    + T_final (bg.g_C - g_A) (everything behind i, background and alpha output included):
      dL/dc_i = a_i T_i g_C,  dL/dz_i = a_i T_i g_D,
      dL/da_i = T_i (c_i.g_C + z_i g_D) - S_i / (1 - a_i).
    T_i is recovered from T_{i+1} by division, T_i = T_{i+1} / (1 - a_i), as in 3DGS.
    Through a = min(0.99, o exp(power)) the gradient is zero where the clamp is active.
    The background gradient (T_final g_C summed over pixels) is formed by the launcher.
    """
    image, tile, pixel_offset, in_image, x, y = _tile_pixels(
        tl.program_id(0), NUM_TILES, TILES_X, WIDTH, HEIGHT, TILE_SIZE)
    start, end = _tile_range(tile_ranges_ptr, image, tile, NUM_TILES, NUM_INTERSECTIONS)
    channel = tl.arange(0, CHANNELS_PAD)
    channel_valid = channel < NUM_CHANNELS
    pixel_channel_mask = in_image[:, None] & channel_valid[None, :]

    transmittance = tl.load(final_transmittance_ptr + pixel_offset, mask=in_image, other=1.0)
    last_index = tl.load(last_index_ptr + pixel_offset, mask=in_image, other=-1)
    grad_color = tl.load(grad_color_ptr + pixel_offset[:, None] * NUM_CHANNELS + channel[None, :],
                         mask=pixel_channel_mask, other=0.0)
    grad_alpha = tl.load(grad_alpha_ptr + pixel_offset, mask=in_image, other=0.0)
    grad_depth = tl.load(grad_depth_ptr + pixel_offset, mask=in_image, other=0.0)
    background = tl.load(background_ptr + image * NUM_CHANNELS + channel,
                         mask=channel_valid, other=0.0)
    behind = transmittance * (tl.sum(background[None, :] * grad_color, axis=1) - grad_alpha)

    # Never walk past the tile's end, whatever the residual says.
    num_positions = tl.minimum(tl.max(last_index, axis=0) + 1, end - start)
    for step in range(0, num_positions):
        relative = num_positions - 1 - step
        flat, valid, mean_x, mean_y, conic_a, conic_b, conic_c, opacity, z = _load_gaussian(
            gaussian_ids_ptr, means2d_ptr, conics_ptr, opacities_ptr, depths_ptr,
            image, start + relative, NUM_GAUSSIANS, NUM_INTERSECTIONS)
        dx, dy, power, falloff, raw_alpha, alpha, counts = _gaussian_alpha(
            x, y, mean_x, mean_y, conic_a, conic_b, conic_c, opacity)
        composited = counts & (last_index >= relative)
        one_minus_alpha = 1.0 - alpha
        transmittance = tl.where(composited, transmittance / one_minus_alpha, transmittance)
        weight = tl.where(composited, alpha * transmittance, 0.0)

        gaussian_color = tl.load(colors_ptr + flat * NUM_CHANNELS + channel,
                                 mask=channel_valid, other=0.0)
        color_dot = tl.sum(gaussian_color[None, :] * grad_color, axis=1) + z * grad_depth
        grad_alpha_pixel = transmittance * color_dot - behind / one_minus_alpha
        behind = tl.where(composited, behind + color_dot * weight, behind)

        differentiable = composited & (raw_alpha <= ALPHA_MAX)
        grad_alpha_pixel = tl.where(differentiable, grad_alpha_pixel, 0.0)
        # alpha = opacity * falloff, falloff = exp(power)
        grad_power = grad_alpha_pixel * raw_alpha
        grad_opacity = tl.sum(grad_alpha_pixel * falloff, axis=0)
        grad_conic_a = tl.sum(grad_power * (-0.5 * dx * dx), axis=0)
        grad_conic_b = tl.sum(grad_power * (-dx * dy), axis=0)
        grad_conic_c = tl.sum(grad_power * (-0.5 * dy * dy), axis=0)
        # d power / d mean = -(d power / d offset)
        grad_mean_x = tl.sum(grad_power * (conic_a * dx + conic_b * dy), axis=0)
        grad_mean_y = tl.sum(grad_power * (conic_c * dy + conic_b * dx), axis=0)
        grad_z = tl.sum(weight * grad_depth, axis=0)
        grad_gaussian_color = tl.sum(weight[:, None] * grad_color, axis=0)

        touched = tl.max(composited.to(tl.int32), axis=0) > 0
        if touched & valid:
            tl.atomic_add(grad_means2d_ptr + flat * 2, grad_mean_x)
            tl.atomic_add(grad_means2d_ptr + flat * 2 + 1, grad_mean_y)
            tl.atomic_add(grad_conics_ptr + flat * 3, grad_conic_a)
            tl.atomic_add(grad_conics_ptr + flat * 3 + 1, grad_conic_b)
            tl.atomic_add(grad_conics_ptr + flat * 3 + 2, grad_conic_c)
            tl.atomic_add(grad_opacities_ptr + flat, grad_opacity)
            tl.atomic_add(grad_depths_ptr + flat, grad_z)
            tl.atomic_add(grad_colors_ptr + flat * NUM_CHANNELS + channel, grad_gaussian_color,
                          mask=channel_valid)
