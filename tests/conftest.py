"""Test-wide environment, set before jax or triton are imported.

- Two host devices, so pmap code is tested on CPU.
- Triton's interpreter, so the Triton kernels run on CPU torch tensors (no GPU in CI).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_configure(config):
    # `-n 2` alone distributes test by test, so a module's cached, expensive set-up (one
    # training iteration compiled and run) is paid once per worker. Modules marked
    # `xdist_group` go to one worker whole; everything else is still spread test by test.
    if getattr(config.option, "dist", None) == "load":
        config.option.dist = "loadgroup"
