"""experiments/gpu_suite.py: the --smoke run end to end (so the GPU suite cannot rot), its
time limits and error recording, and experiments/gpu_wheelhouse.sh's pins.

The smoke run takes one to two minutes on two CPU cores: every section runs in its own
process at tiny sizes, with the Triton kernels under Triton's interpreter.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUITE = ROOT / "experiments" / "gpu_suite.py"
pytestmark = pytest.mark.slow   # the smoke run: minutes on 2 cores


def load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite_under_test", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_suite(out, *args, timeout=900, llvm_optimized=False):
    """Runs the suite as a script. `llvm_optimized` drops conftest's -O0 from XLA_FLAGS: the
    whole smoke run spends more time running its programs than compiling them (122 s against
    141 s at -O0, alone on 2 cores)."""
    env = {k: v for k, v in os.environ.items() if k != "GPU_SUITE_T0"}
    if llvm_optimized:
        env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_backend_optimization_level=0", "")
    return subprocess.run([sys.executable, str(SUITE), f"--out={out}", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def strict_json(path):
    def no_constants(name):
        raise ValueError(f"{path}: non-standard JSON constant {name}")
    return json.loads(pathlib.Path(path).read_text(), parse_constant=no_constants)


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite_smoke")
    # A generous budget: CI machines are shared; the run normally takes 1-2 minutes.
    result = run_suite(out, "--smoke", "--budget_s=840", llvm_optimized=True)
    assert (out / "gpu_suite.json").is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    return out, strict_json(out / "gpu_suite.json"), result


def test_smoke_run_has_every_section_with_numbers(smoke_report):
    out, report, result = smoke_report
    suite = load_suite()
    assert report["smoke"] is True and "SMOKE" in report["note"]
    expected = [s for s in suite.SECTIONS if s not in suite.SMOKE_SKIPS]
    statuses = {name: report["sections"][name]["status"] for name in suite.SECTIONS}
    errors = {name: report["sections"][name].get("errors") for name in expected
              if report["sections"][name].get("errors")}
    assert all(statuses[name] == "ok" for name in expected) and not errors, \
        (statuses, json.dumps(errors, indent=1)[:6000], result.stdout[-3000:])
    assert report["all_ok"] is True and result.returncode == 0
    assert set(report["not_run_in_smoke"]) == set(suite.SMOKE_SKIPS)
    sections = {name: report["sections"][name]["result"] for name in expected}

    stack = sections["stack"]
    assert stack["num_devices"] == 1 and stack["jax_backend"] == "cpu"
    from rasterizer.composite_cpu import cpu_backend_problem
    on_cpu = "jax" if cpu_backend_problem() else "cpu"  # the C++ compositor where it builds
    assert stack["packages"]["jax"] and stack["backend_auto"] == on_cpu
    assert stack["triton_backend_problem"] is None  # the interpreter path works here

    counts = sections["pytest"]["counts"]
    assert counts["passed"] >= 1 and counts["failed"] == counts["error"] == 0
    assert (out / "pytest_gpu.log").read_text().strip()

    correctness = sections["correctness"]
    assert correctness["num_gaussians"] > 50 and correctness["checks_failed"] == 0
    assert correctness["checks_passed"] == len(correctness["checks"]) >= 60
    assert set(correctness["runs"]) == {"triton_f32", "jax_f32", "jax_f64"}
    # Two independent float64 renderers (rasterizer jax backend in float64, the suite's
    # per-pixel numpy one) agree to rounding: the reference itself is right.
    per_pixel = correctness["per_pixel_reference"]["jax_f64"]
    assert max(per_pixel[o]["max_abs"] for o in ("color", "alpha", "depth")) < 1e-9
    for field in suite.GRADIENT_FIELDS:
        entry = correctness["directional_derivatives"][field]
        assert abs(entry["finite_difference"]) > 0
        assert entry["triton_f32"]["normalised_error"] < 1e-4
        assert entry["jax_f64"]["normalised_error"] < 1e-8

    raster = sections["rasterizer"]["results"]
    assert {e["backend"] for e in raster} == {"jax", "triton"}
    for entry in raster:
        assert entry["forward_ms"] > 0 and entry["forward_backward_ms"] > 0, entry
        assert entry["overflow"] == [0]
    assert sections["rasterizer"]["intersections_per_frame"]["1"] > 0

    table = sections["table1b"]
    modes = [k for k in table if k.startswith(("latency", "throughput"))]
    assert len(modes) == 2
    for mode in modes:
        for key in ("gen_fps", "rend_fps", "dri_fps"):
            assert table[mode][key] > 0, (mode, key)
    ablation = table["ablation (Tab. 1c Dri, random init, batch 1)"]
    assert ablation["Baseline"]["dri_fps"] > 0 and ablation["+ G_m"]["dri_fps"] > 0

    networks = sections["networks"]["results"]
    assert {(e["function"], e["precision"]) for e in networks} == {
        (f, p) for f in ("generate_static", "animate") for p in ("fp32", "tf32", "bf16")}
    assert all(e["median_ms"] > 0 for e in networks)

    train = sections["train_fp32"]
    assert train["images_per_s"] > 0 and train["images_per_s_end_to_end"] > 0
    attempt = train["attempts"][str(train["global_batch"])]
    assert attempt["metrics_finite"] and set(attempt["ms_per_phase"]) == {
        "g_step", "d_step", "d_reg_step"}
    # Timed at a capacity that renders everything (grown first if the warm-up overflowed).
    assert train["render_dropped_fraction"] == 0.0 and attempt["render_overflow_max"] == 0
    assert train["render_capacity"] >= attempt["render_capacity_start"] > 0
    for name in expected:
        if name != "pytest":
            assert (out / "logs" / f"{name}.log").is_file()


def test_time_limit_ends_a_section_and_keeps_the_json(tmp_path):
    # The correctness section needs 10 s or more; with a 3 s limit its process is killed,
    # and what it had recorded by then (its sizes, written first) stays in the JSON.
    result = run_suite(tmp_path, "--smoke", "--sections=correctness",
                       "--budgets=correctness=3", timeout=120)
    report = strict_json(tmp_path / "gpu_suite.json")
    assert result.returncode == 1
    section = report["sections"]["correctness"]
    assert section["status"] == "timeout" and section["time_limit_s"] == 3
    assert section["sizes"]["image"] == load_suite().SMOKE_SIZES["correctness"]["image"]
    assert report["summary"] == {"correctness": "timeout"} and report["all_ok"] is False
    assert "timed out" in section["errors"][-1]["error"]


def test_out_of_time_sections_are_skipped_not_started(tmp_path):
    result = run_suite(tmp_path, "--smoke", "--sections=stack,correctness", "--budget_s=5",
                       timeout=120)
    report = strict_json(tmp_path / "gpu_suite.json")
    assert result.returncode == 1
    for name in ("stack", "correctness"):
        assert report["sections"][name]["status"] == "skipped"
        assert report["sections"][name]["reason"].startswith("out of time")
    assert not (tmp_path / "logs").exists()


def test_section_exception_is_recorded_with_traceback(tmp_path, monkeypatch):
    suite = load_suite()

    def failing(ctx):
        ctx.rec.result["measured before the failure"] = 1.5
        ctx.rec.attempt("a failing measurement", lambda: 1 / 0)
        ctx.rec.result["measured after it"] = 2.5
        raise ValueError("the section broke")

    monkeypatch.setitem(suite.SECTION_FUNCTIONS, "stack", failing)
    assert suite.run_section("stack", tmp_path, smoke=True, compile_workers=1) == 0
    data = strict_json(tmp_path / "sections" / "stack.json")
    assert data["status"] == "error"
    assert data["result"] == {"measured before the failure": 1.5, "measured after it": 2.5}
    assert [e["where"] for e in data["errors"]] == ["a failing measurement", "stack"]
    assert "ZeroDivisionError" in data["errors"][0]["traceback"]
    assert data["errors"][1]["error"] == "ValueError: the section broke"
    assert "raise ValueError" in data["errors"][1]["traceback"]


def test_json_is_written_atomically_and_strictly(tmp_path):
    suite = load_suite()
    import numpy as np
    path = tmp_path / "x.json"
    suite.write_json_atomic(path, {"a": np.float32(1.5), "b": float("nan"),
                                   "c": np.arange(3), "d": (np.int64(2), float("inf"))})
    assert strict_json(path) == {"a": 1.5, "b": None, "c": [0, 1, 2], "d": [2, None]}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_wheelhouse_pins_satisfy_requirements():
    """The wheelhouse's pinned versions are inside requirements.txt's ranges, and every
    project requirement missing from a CUDA machine with jax/torch/triton preinstalled is
    pinned (`gpu_wheelhouse.sh --print-pins` needs no network)."""
    from packaging.requirements import Requirement
    result = subprocess.run(["bash", str(ROOT / "experiments" / "gpu_wheelhouse.sh"),
                             "--print-pins"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    pins = {}
    for line in result.stdout.split():
        name, _, version = line.partition("==")
        pins[name.lower().replace("_", "-")] = version
    assert "jax" not in pins and "torch" not in pins and "jaxlib" not in pins
    project = [Requirement(line.split("#")[0]) for line in
               (ROOT / "requirements.txt").read_text().splitlines()
               if line.split("#")[0].strip()]
    needed = {"jax-triton", "ml-collections", "grain", "array-record", "tensorflow-datasets",
              "tensorboardx", "imageio-ffmpeg", "pytest"}
    assert needed <= set(pins), needed - set(pins)
    for requirement in project:
        name = requirement.name.lower().replace("_", "-")
        if name in pins:
            assert requirement.specifier.contains(pins[name], prereleases=True), \
                (requirement, pins[name])


def test_sigterm_stops_the_run_and_keeps_the_json(tmp_path):
    """`timeout` sends SIGTERM: the running section is stopped, the JSON says so and keeps
    what the section had recorded, later sections are marked skipped."""
    import signal
    import time
    env = {k: v for k, v in os.environ.items() if k != "GPU_SUITE_T0"}
    proc = subprocess.Popen([sys.executable, str(SUITE), f"--out={tmp_path}", "--smoke",
                             "--sections=correctness,rasterizer"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    section_json = tmp_path / "sections" / "correctness.json"
    deadline = time.time() + 120
    while not section_json.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert section_json.exists(), proc.communicate(timeout=60)[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, output[-3000:]
    report = strict_json(tmp_path / "gpu_suite.json")
    assert report["sections"]["correctness"]["status"] == "terminated"
    assert report["sections"]["correctness"]["section"] == "correctness"
    assert report["sections"]["rasterizer"]["status"] == "skipped"
    assert report["all_ok"] is False
