"""Multi-host training, run for real on one machine.

Two processes (CPU, one device each) form one JAX job through `jax.distributed` with a
coordinator on 127.0.0.1 (the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
variables `train._maybe_initialize_distributed` reads) and train a few steps of
test_train's tiny configuration with `train.train_and_evaluate`, as `launch.py` does on
several hosts; a third process trains the same configuration alone with two devices. Each
process is tests/multihost_worker.py, which records what its loader gave, the states it
handed to the checkpointer, the files it wrote, and what it restored (see its docstring).

Both launches run at the same time, each in its own folder (workdir, dataset, compilation
cache). Checked: both render the same dataset, only process 0 of the job building it; each
process reads a different slice of every global batch, and together exactly the one-process
run's; the parameters stay bitwise identical across the processes; the two-process run
equals the one-process, two-device run (within test_train's 1-vs-2-device tolerance); only
process 0 writes config, metrics, samples and TensorBoard events; the checkpoint restores in
both processes (the state, and each process its own loader position), and a second
`train_and_evaluate` in the same processes resumes from it.

Only to keep the test's CPU time down (CI has 2 cores), every process runs with LLVM
optimisation off and XLA's older CPU fusion emitters (as conftest.py sets for the suite), and reuses compilations through jax's persistent compilation cache in the
test's temporary folder (written by process 0 of each launch). Both launches use the same
settings; neither changes what a step computes.
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from test_train import assert_trees_close

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multihost_worker.py"
NUM_STEPS = 4            # checkpoints at steps 2 and 4; R1 at steps 0 and 2
TIMEOUT_S = 900          # for all processes together (about 2 min on 2 idle cores)


def _gloo_available() -> bool:
    try:
        from jax._src.lib import _jax
    except ImportError:   # a jaxlib laid out differently: let the launch itself tell
        return True
    return hasattr(_jax, "make_gloo_tcp_collectives")


pytestmark = [
    pytest.mark.skipif(
        not _gloo_available(),
        reason="this jaxlib has no gloo CPU collectives, so CPU processes cannot form one job"),
    # One worker runs the module: its fixture launches the whole multi-process job.
    pytest.mark.xdist_group("multihost"),
    pytest.mark.slow,
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(name, num_processes, devices_per_process, root):
    """Starts the worker as `num_processes` processes of one job, in root/name/ (its own
    workdir, dataset folder, compilation cache and outputs)."""
    folder = root / name
    (folder / "out").mkdir(parents=True)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                                 "SLURM_"))}
    base.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process} "
                          "--xla_backend_optimization_level=0 "
                          "--xla_cpu_use_fusion_emitters=false",
                JAX_COMPILATION_CACHE_DIR=str(folder / "jax_cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    port = _free_port()
    launch = {"name": name, "folder": folder, "children": [], "logs": []}
    for rank in range(num_processes):
        env = dict(base)
        if num_processes > 1:
            # The bind address keeps the coordinator (process 0) off other interfaces.
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                       JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",
                       JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(rank))
        log = open(folder / "out" / f"log{rank}.txt", "w+")
        launch["logs"].append(log)
        launch["children"].append(subprocess.Popen(
            [sys.executable, str(WORKER), str(folder / "work"), str(folder / "data"),
             str(folder / "out"), str(NUM_STEPS)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return launch


def _wait(launches):
    """Waits for every process of every launch; kills them all (whole process groups) as
    soon as one fails or at the timeout, and raises with the tails of their logs."""
    children = [child for launch in launches for child in launch["children"]]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(child.poll() is None for child in children):
            if any(child.poll() not in (None, 0) for child in children) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for child in children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
    for launch in launches:
        launch["texts"] = []
        for log in launch["logs"]:
            log.seek(0)
            launch["texts"].append(log.read())
            log.close()
    codes = [child.returncode for child in children]
    if codes != [0] * len(children):
        tails = "\n".join(f"--- {launch['name']} process {rank} (exit {child.returncode}) ---\n"
                          f"{text[-3000:]}" for launch in launches
                          for rank, (child, text) in enumerate(zip(launch["children"], launch["texts"])))
        raise AssertionError(f"a launch failed or timed out (limit {TIMEOUT_S}s):\n{tails}")


def _load(out, name):
    with np.load(out / name) as data:
        return {key: data[key] for key in sorted(data.files)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    # Both at once: two processes with one device each, and one process with two devices.
    launches = [_start("multi", 2, 1, root), _start("single", 1, 2, root)]
    _wait(launches)
    return {launch["name"]: {
        "work": launch["folder"] / "work", "data": launch["folder"] / "data",
        "out": launch["folder"] / "out", "logs": launch["texts"],
        "records": [json.loads((launch["folder"] / "out" / f"process{k}.json").read_text())
                    for k in range(len(launch["children"]))]} for launch in launches}


def test_the_job_has_two_processes_of_one_device(runs):
    for rank, record in enumerate(runs["multi"]["records"]):
        assert (record["process_index"], record["process_count"]) == (rank, 2)
        assert (record["local_devices"], record["global_devices"]) == (1, 2)
    single = runs["single"]["records"][0]
    assert (single["process_count"], single["local_devices"]) == (1, 2)
    # Only process 0 built the dataset; the other waited for it.
    built = ["Building the synthetic dataset" in log for log in runs["multi"]["logs"]]
    assert built == [True, False]


def test_both_launches_built_the_same_dataset(runs):
    """Each launch rendered the synthetic dataset in its own folder: the same files."""
    folders = [runs[name]["data"] for name in ("multi", "single")]
    names = [sorted(str(f.relative_to(d)) for f in d.rglob("*") if f.is_file() and "tfds" not in f.parts)
             for d in folders]
    assert names[0] == names[1] and {"dataset.json", "flame.json"} <= set(names[0])
    assert sum(name.startswith("images") for name in names[0]) == 16
    for name in names[0]:
        assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name


def test_each_process_reads_its_own_slice_of_the_global_batch(runs):
    multi, single = runs["multi"]["records"], runs["single"]["records"][0]
    assert len(single["batches"]) == NUM_STEPS
    for step in range(NUM_STEPS):
        first, second = (np.asarray(r["batches"][step]["index"]) for r in multi)
        assert first.shape == second.shape == (1, 2)       # (local devices, per device)
        assert not set(first.ravel()) & set(second.ravel())
        # Process k's device is device k of the one-process run: the same global batch,
        # the same records in the same order, flipped the same way.
        for key in ("index", "flipped"):
            joined = np.concatenate([np.asarray(r["batches"][step][key]) for r in multi])
            np.testing.assert_array_equal(joined, np.asarray(single["batches"][step][key]))
    seen = [{i for b in r["batches"] for i in np.ravel(b["index"])} for r in multi]
    assert seen[0] != seen[1]


def test_parameters_stay_identical_across_processes(runs):
    out = runs["multi"]["out"]
    for step in (2, NUM_STEPS):
        first, second = _load(out, f"process0_saved_{step}.npz"), _load(out, f"process1_saved_{step}.npz")
        assert first.keys() == second.keys() and len(first) > 50
        for key in first:
            np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def test_two_processes_match_one_process_with_two_devices(runs):
    multi = _load(runs["multi"]["out"], f"process0_saved_{NUM_STEPS}.npz")
    single = _load(runs["single"]["out"], f"process0_saved_{NUM_STEPS}.npz")
    assert multi.keys() == single.keys()
    assert_trees_close(multi, single)              # test_train's 1-vs-2-device tolerance
    # The comparison is not vacuous: training moved the parameters between the checkpoints.
    earlier = _load(runs["multi"]["out"], "process0_saved_2.npz")
    params = [k for k in multi if ".g_vars['params']" in k]
    assert max(float(np.abs(multi[k] - earlier[k]).max()) for k in params) > 1e-4
    losses = {}
    for name in ("multi", "single"):
        rows = [json.loads(line) for line in (runs[name]["work"] / "metrics.jsonl").read_text().splitlines()]
        losses[name] = {row["step"]: row for row in rows if "g_total" in row}
    for step in range(1, NUM_STEPS + 1):
        for key in ("g_total", "d_loss"):
            a, b = losses["multi"][step][key], losses["single"][step][key]
            assert abs(a - b) < 1e-3 * (1 + abs(b)), (step, key, a, b)


def test_only_process_zero_writes_metrics_samples_and_events(runs):
    first, second = runs["multi"]["records"]
    assert second["writes"] == [] and second["summary_writers"] == 0
    assert first["summary_writers"] >= 1
    assert {"config.json", "metrics.jsonl", "samples_0000000.png", "samples_0000002.png",
            f"samples_{NUM_STEPS:07d}.png"} <= set(first["writes"])
    lines = (runs["multi"]["work"] / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line)["step"] for line in lines if "g_total" in line]
    assert logged == list(range(1, NUM_STEPS + 1))   # once per step, not once per process


def test_checkpoint_restores_in_both_processes(runs):
    out = runs["multi"]["out"]
    nexts = []
    for rank, record in enumerate(runs["multi"]["records"]):
        # A second train_and_evaluate resumed from the checkpoint and found the run finished.
        assert record["resumed_result"]["step"] == NUM_STEPS == record["restored_step"]
        restored = _load(out, f"process{rank}_restored.npz")
        saved = _load(out, f"process{rank}_saved_{NUM_STEPS}.npz")
        assert restored.keys() == saved.keys()
        for key in saved:
            np.testing.assert_array_equal(restored[key], saved[key], err_msg=key)
        # The loader resumes at this process's own position: its next batch is the one an
        # uninterrupted stream gives after the batches trained on.
        trained = [b["index"] for b in record["batches"]]
        assert record["fresh_indices"][:NUM_STEPS] == trained
        assert record["restored_next_index"] == record["fresh_indices"][NUM_STEPS]
        nexts.append(set(np.ravel(record["restored_next_index"])))
    assert not nexts[0] & nexts[1]
