"""Test-wide environment, set before jax or triton are imported.

- Two host devices, so pmap code is tested on CPU.
- XLA's older CPU fusion emitters (`--xla_cpu_use_fusion_emitters=false`) and LLVM's
  optimisation off (`--xla_backend_optimization_level=0`): the tests' programs compile
  several times faster and run ~2x slower, a good trade for programs that run a few steps;
  the same HLO runs (a user's run keeps XLA's defaults).
- Triton's interpreter, so the Triton kernels run on CPU torch tensors (no GPU in CI).
- One persistent compilation cache for the whole run, shared by the xdist workers and the
  scripts the tests launch, in a temporary folder removed at the end: many tests compile
  the same programs (the tiny configuration's train steps, its sampler), and compiling is
  most of the suite's time on a 2-core machine. JAX keys entries on the program, so a hit
  runs exactly what a fresh compilation would. The user's own cache is not touched.

Modules marked `xdist_group` run whole on one worker (pytest.ini: `--dist=loadgroup`), so
that their module fixtures (a training iteration, a multi-process job) run once, not once
per worker. Tests marked `slow` (minutes each on 2 cores) are collected first, so that the
workers start on them and the run does not end with one worker on a long test while the
other idles; `-m "not slow"` leaves them out for a quick check.

`RETA3D_TEST_COMPILE_LOG=FILE` appends one JSON line per compilation event in the test
processes (test, event, function, seconds), for finding what the suite spends its time
compiling: `python experiments/compile_profile.py FILE` sums it by test and by function.
"""
import os
import shutil
import tempfile

# Compile-time flags (module docstring): the older fusion emitters compile tiny train steps
# in 33 s instead of 54 s on 2 idle cores, and -O0 cuts LLVM's share (~70% of a compile);
# the demo's step runs ~12% faster with the default emitters, kept for users.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
if "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE_OWNER = "RETA3D_TEST_CACHE_OWNER"
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # Set in the controller before the workers start, so that they inherit one folder.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="reta3d-test-jax-cache-")
    os.environ[_CACHE_OWNER] = str(os.getpid())
os.environ.setdefault("RETA3D_COMPILATION_CACHE", os.environ["JAX_COMPILATION_CACHE_DIR"])


def _log_compilations(path):
    import json
    import jax.monitoring

    def listener(event, duration, **kwargs):
        if event.startswith("/jax/core/compile") or event.startswith("/jax/compilation_cache"):
            record = {"test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0],
                      "event": event, "fun": kwargs.get("fun_name", ""), "s": duration}
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
    jax.monitoring.register_event_duration_secs_listener(listener)


if os.environ.get("RETA3D_TEST_COMPILE_LOG"):
    _log_compilations(os.environ["RETA3D_TEST_COMPILE_LOG"])


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable


def pytest_unconfigure(config):
    if os.environ.get(_CACHE_OWNER) == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

