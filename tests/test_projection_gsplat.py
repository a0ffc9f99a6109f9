"""Projection against gsplat's pure-PyTorch reference (`gsplat.cuda._torch_impl`, CPU).

gsplat conventions that differ from ours, and how the comparison handles them:
- its Jacobian clamp is (W - cx)/fx + 0.3 W/(2 fx) on one side and cx/fx + 0.3 W/(2 fx) on the
  other, which equals the reference 3DGS's symmetric 1.3 W/(2 fx) (ours) when cx = W/2: the
  cameras here have a centred principal point;
- its radius is per axis, ceil(3.33 sigma), and its near plane is a parameter: radii are not
  compared, only which Gaussians are in front of the 0.2 near plane;
- eps2d = 0.3 is the same dilation as ours.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rasterizer.projection import project

torch_impl = pytest.importorskip(
    "gsplat.cuda._torch_impl",
    reason="gsplat not installed (pip install gsplat; its pure-torch projection runs on CPU)")
torch = pytest.importorskip("torch")

WIDTH, HEIGHT = 64, 48


def _scene(seed, num=300):
    rng = np.random.default_rng(seed)
    z = rng.uniform(-0.5, 4.0, num)  # some behind the camera / the near plane
    # Spread well past the image borders so the Jacobian clamp is active for some.
    xy = rng.uniform(-1.2, 1.2, (num, 2)) * np.abs(z)[:, None]
    means = np.concatenate([xy, z[:, None]], -1)
    scales = np.exp(rng.uniform(-4, -1, (num, 3)))
    quats = rng.normal(size=(num, 4))
    return [x.astype(np.float32) for x in (means, scales, quats)]


def _cameras():
    views = []
    for angle, shift in [(0.0, (0.0, 0.0, 0.0)), (0.3, (0.1, -0.2, 0.5))]:
        c, s = np.cos(angle), np.sin(angle)
        view = np.eye(4)
        view[:3, :3] = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
        view[:3, 3] = shift
        views.append(view)
    k = np.array([[50.0, 0, WIDTH / 2], [0, 55.0, HEIGHT / 2], [0, 0, 1]])
    return (np.stack(views).astype(np.float32),
            np.broadcast_to(k, (2, 3, 3)).astype(np.float32))


@pytest.mark.parametrize("seed", [0, 1])
def test_projection_matches_gsplat(seed):
    means, scales, quats = _scene(seed)
    views, ks = _cameras()
    batch = len(views)
    ours = jax.jit(project, static_argnums=(5, 6))(
        *(jnp.asarray(np.broadcast_to(x, (batch,) + x.shape)) for x in (means, scales, quats)),
        jnp.asarray(views), jnp.asarray(ks), WIDTH, HEIGHT)

    covars, _ = torch_impl._quat_scale_to_covar_preci(
        torch.from_numpy(quats), torch.from_numpy(scales), compute_preci=False)
    radii, means2d, depths, conics, _ = torch_impl._fully_fused_projection(
        torch.from_numpy(means), covars, torch.from_numpy(views), torch.from_numpy(ks), WIDTH,
        HEIGHT, eps2d=0.3, near_plane=0.2)
    gs_valid = (radii > 0).all(-1).numpy()
    our_valid = np.asarray(ours.radii) > 0

    # Depth culling agrees exactly; beyond it only the radius rule differs (3 sqrt(lambda_max)
    # vs per-axis 3.33 sigma), which matters for Gaussians just off the image.
    camera_z = np.einsum("bij,nj->bni", views[:, :3, :3], means)[..., 2] + views[:, None, 2, 3]
    assert not np.any(our_valid & (camera_z <= 0.2))
    assert not np.any(gs_valid & (camera_z <= 0.2))
    both = our_valid & gs_valid
    assert both.sum() > 150 and np.any(~our_valid)

    clamped = np.abs(np.einsum("bij,nj->bni", views[:, :3, :3], means)[..., 0]
                     + views[:, None, 0, 3]) / camera_z > 1.3 * WIDTH / (2 * 50.0)
    assert np.any(both & clamped), "the Jacobian clamp should be exercised"

    np.testing.assert_allclose(np.asarray(ours.depths)[both], depths.numpy()[both], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.means2d)[both], means2d.numpy()[both],
                               rtol=1e-5, atol=1e-4)
    conics_gs = conics.numpy()[both]
    np.testing.assert_allclose(np.asarray(ours.conics)[both], conics_gs, rtol=2e-4,
                               atol=2e-5 * np.abs(conics_gs).max())
