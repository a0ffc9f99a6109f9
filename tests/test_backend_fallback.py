"""Backend selection when the Triton path cannot run (issue 9 §2).

A GPU whose Python lacks jax_triton (or has one that fails to import) is simulated on the
CPU: jax.default_backend() is patched to "gpu", TRITON_INTERPRET to 0 and `jax_triton` is
made unimportable. backend="auto" must then render with the pure-JAX backend after ONE
warning line naming the package; backend="triton" must raise that same line as an error
before any tracing, never an ImportError from deep inside a jit trace.
"""
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Imported before any patching, under the test configuration's TRITON_INTERPRET=1: the
# kernels are decorated for the interpreter once and for all.
from rasterizer import Camera, Gaussians, composite_triton  # noqa: F401
from rasterizer.render import BackendUnavailableError, render, resolve_backend

render_module = sys.modules["rasterizer.render"]


@pytest.fixture
def fresh_backend_state(monkeypatch):
    """Forget import outcomes and warnings from earlier tests in this process."""
    monkeypatch.setattr(render_module, "_IMPORT_PROBLEMS", {})
    monkeypatch.setattr(render_module, "_WARNED", set())


@pytest.fixture
def gpu_without_jax_triton(monkeypatch, fresh_backend_state):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setitem(sys.modules, "jax_triton", None)  # `import jax_triton` fails


def rasterizer_records(caplog):
    return [r for r in caplog.records if r.name == "rasterizer"]


def test_auto_falls_back_to_jax_with_one_warning_line(gpu_without_jax_triton, caplog):
    caplog.set_level(logging.WARNING, logger="rasterizer")
    assert resolve_backend("auto") == "jax"
    assert resolve_backend("auto") == "jax"   # warned once per process, not per call
    records = rasterizer_records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert "\n" not in message
    assert message.startswith("rasterizer: backend='auto' falls back to the pure-JAX backend")
    assert "`jax_triton`" in message and "pip install jax-triton" in message
    assert "backend='jax'" in message


def test_triton_raises_the_same_clear_error_before_tracing(gpu_without_jax_triton, caplog):
    caplog.set_level(logging.WARNING, logger="rasterizer")
    resolve_backend("auto")
    warning = rasterizer_records(caplog)[0].getMessage()
    with pytest.raises(BackendUnavailableError) as info:
        resolve_backend("triton")
    assert isinstance(info.value, ImportError)
    error = str(info.value)
    reason = error.removeprefix("rasterizer: ")
    assert error.startswith("rasterizer: the triton backend needs the `jax_triton` package")
    assert warning.endswith(reason) and "\n" not in error
    # render() checks before tracing: the error comes from resolve_backend, not from a trace.
    gaussians, camera = scene()
    with pytest.raises(BackendUnavailableError, match="jax_triton") as info:
        render(gaussians, camera, backend="triton")
    assert [entry.name for entry in info.traceback][-2:] == ["resolve_backend", "_checked"]


def scene():
    rng = np.random.default_rng(0)
    num = 12
    means = np.concatenate([rng.uniform(-0.3, 0.3, (num, 2)), rng.uniform(2, 3, (num, 1))], -1)
    gaussians = Gaussians(
        means=jnp.asarray(means, jnp.float32),
        scales=jnp.asarray(rng.uniform(0.05, 0.2, (num, 3)), jnp.float32),
        quats=jnp.asarray(rng.normal(size=(num, 4)), jnp.float32),
        opacities=jnp.asarray(rng.uniform(0.3, 0.9, num), jnp.float32),
        colors=jnp.asarray(rng.uniform(0, 1, (num, 3)), jnp.float32))
    k = np.array([[30.0, 0, 10], [0, 30.0, 9], [0, 0, 1]], np.float32)
    return gaussians, Camera(jnp.asarray(np.eye(4, dtype=np.float32)), jnp.asarray(k), 20, 18)


def test_auto_fallback_renders_what_the_jax_backend_renders(gpu_without_jax_triton, caplog):
    gaussians, camera = scene()
    auto = render(gaussians, camera, backend="auto")
    reference = render(gaussians, camera, backend="jax")
    np.testing.assert_array_equal(np.asarray(auto.color), np.asarray(reference.color))
    assert float(np.asarray(reference.alpha).max()) > 0.3  # the scene is not empty
    assert len(rasterizer_records(caplog)) == 1


def test_a_jax_triton_that_fails_to_import_is_named_with_its_error(
        monkeypatch, fresh_backend_state, tmp_path, caplog):
    # An installed but broken jax_triton (e.g. built for another jax): its own error is shown.
    package = tmp_path / "jax_triton"
    package.mkdir()
    (package / "__init__.py").write_text(
        "raise ImportError('jax-triton requires JAX to be installed with GPU support')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "jax_triton", raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    caplog.set_level(logging.WARNING, logger="rasterizer")
    assert resolve_backend("auto") == "jax"
    message = rasterizer_records(caplog)[0].getMessage()
    assert "`import jax_triton` failed (ImportError: jax-triton requires JAX to be installed " \
           "with GPU support)" in message


def test_cpu_auto_is_the_cpu_kernel_without_probing_triton_or_warning(fresh_backend_state,
                                                                     caplog):
    from rasterizer.composite_cpu import cpu_backend_problem
    caplog.set_level(logging.WARNING, logger="rasterizer")
    assert jax.default_backend() == "cpu"
    if cpu_backend_problem() is not None:
        pytest.skip(cpu_backend_problem())
    assert resolve_backend("auto") == "cpu"
    assert render_module._IMPORT_PROBLEMS == {} and not rasterizer_records(caplog)
    assert resolve_backend("triton") == "triton"  # the interpreter path works here


def test_cpu_triton_without_torch_names_torch(monkeypatch, fresh_backend_state):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(BackendUnavailableError, match=r"needs the `torch` package \(Triton's "
                                                      r"interpreter"):
        resolve_backend("triton")


def test_launcher_import_error_is_the_clear_error(monkeypatch):
    # The jax_triton launcher itself (reached only on a GPU) gives the same one-line error.
    monkeypatch.setitem(sys.modules, "jax_triton", None)
    with pytest.raises(BackendUnavailableError, match="the triton backend needs the "
                                                      "`jax_triton` package"):
        composite_triton._triton_call(kernel=None, out_shapes=[])
