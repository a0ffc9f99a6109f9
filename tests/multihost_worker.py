"""One process of a training run launched by tests/test_multihost.py (not a test itself).

    python tests/multihost_worker.py WORKDIR DATA OUT NUM_STEPS

Runs `train.train_and_evaluate` for NUM_STEPS steps of test_train's tiny configuration on
the embedded synthetic dataset (DATA, built on first use), then runs it again (the resume of
a finished run) and restores the last checkpoint explicitly. Multi-process when the
environment sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (read by
`train._maybe_initialize_distributed`); JAX_PLATFORMS / XLA_FLAGS choose the local devices.

Writes into OUT, for process k:
  process{k}.json             record ids and flips of every batch the loader gave; the files
                              this process opened for writing or renamed into (atomic
                              writes) in WORKDIR, checkpoints/ aside, and the TensorBoard
                              writers it made; the results of both runs;
                              the step and loader position restored from the checkpoint and
                              the batch a fresh loader gives at that position
  process{k}_saved_{s}.npz    the state this process handed to the checkpointer at step s
                              (its in-memory parameters, optimiser states, EMA, ...)
  process{k}_restored.npz     the state restored from the last checkpoint
"""
import json
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import jax  # noqa: E402
import numpy as np  # noqa: E402

from reta3d import checkpoint as checkpoint_lib  # noqa: E402
from reta3d import train  # noqa: E402
from reta3d.data import loader as loader_lib  # noqa: E402
from test_train import tiny_config  # noqa: E402

BATCH_SIZE = 4


def make_config(data: str, num_steps: int):
    c = tiny_config()
    c.data.path = data
    c.data.synthetic = True
    c.data.synthetic_num_images = 16
    c.data.synthetic_uv_resolution = 32
    c.data.flip = True
    c.data.worker_count = 0
    c.train.batch_size = BATCH_SIZE
    c.train.total_kimg = num_steps * BATCH_SIZE / 1000
    c.train.log_every = 1
    c.train.sample_every = 2
    c.train.checkpoint_every = 2
    c.train.swd_every = 10**9
    c.train.swd_num_images = 4   # as many as the sample grid's rows: one compilation for both
    return c


def flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {f"{i:04d} {jax.tree_util.keystr(path)}": np.asarray(leaf)
            for i, (path, leaf) in enumerate(leaves)}


def main():
    workdir, data, out, num_steps = sys.argv[1:5]
    workdir, out, num_steps = pathlib.Path(workdir).resolve(), pathlib.Path(out), int(num_steps)
    config = make_config(data, num_steps)
    record = {"batches": [], "writes": [], "summary_writers": 0}

    # --- recorders around what train_and_evaluate uses ------------------------------------
    make_loader = loader_lib.make_loader

    class RecordingLoader(loader_lib.Loader):
        def __next__(self):
            batch = super().__next__()
            record["batches"].append({"index": batch["index"].tolist(),
                                      "flipped": batch["flipped"].tolist()})
            return batch

    def recording_make_loader(*args, **kwargs):
        loader = make_loader(*args, **kwargs)
        loader.__class__ = RecordingLoader
        return loader
    loader_lib.make_loader = recording_make_loader

    save = checkpoint_lib.Checkpointer.save
    saved = {}

    def recording_save(self, step, state, meta, force=True):
        np.savez(out / f"process{jax.process_index()}_saved_{int(step)}.npz", **flat(state))
        saved["state"] = state
        return save(self, step, state, meta, force)
    checkpoint_lib.Checkpointer.save = recording_save

    def note_write(path):
        if not isinstance(path, (str, os.PathLike)):
            return   # an in-memory file
        try:
            relative = pathlib.Path(path).resolve().relative_to(workdir)
        except ValueError:
            return
        if relative.parts and relative.parts[0] != "checkpoints":
            record["writes"].append(str(relative))

    path_open = pathlib.Path.open

    def recording_open(self, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            note_write(self)
        return path_open(self, mode, *args, **kwargs)
    pathlib.Path.open = recording_open
    os_replace = os.replace

    def recording_replace(src, dst, *args, **kwargs):   # an atomic write's final name
        note_write(dst)
        return os_replace(src, dst, *args, **kwargs)
    os.replace = recording_replace
    from PIL import Image
    image_save = Image.Image.save

    def recording_image_save(self, fp, *args, **kwargs):
        note_write(fp)
        return image_save(self, fp, *args, **kwargs)
    Image.Image.save = recording_image_save
    try:
        import tensorboardX

        class RecordingSummaryWriter(tensorboardX.SummaryWriter):
            def __init__(self, *args, **kwargs):
                record["summary_writers"] += 1
                super().__init__(*args, **kwargs)
        tensorboardX.SummaryWriter = RecordingSummaryWriter
    except ImportError:
        pass

    # --- train, then resume the finished run ----------------------------------------------
    record["result"] = train.train_and_evaluate(config, str(workdir))
    record.update(process_index=jax.process_index(), process_count=jax.process_count(),
                  local_devices=jax.local_device_count(), global_devices=jax.device_count())
    batches_trained = len(record["batches"])
    record["resumed_result"] = train.train_and_evaluate(config, str(workdir))
    assert len(record["batches"]) == batches_trained, "a finished run must not train again"

    # --- restore explicitly: state, and this process's loader position --------------------
    # The template only gives the structure, shapes and dtypes: the last state saved will do.
    step, state, meta = checkpoint_lib.Checkpointer(workdir).restore_latest(saved["state"])
    np.savez(out / f"process{jax.process_index()}_restored.npz", **flat(jax.device_get(state)))
    source = train.prepare_data(config)

    def new_loader():   # the arguments train_and_evaluate uses
        return make_loader(source, BATCH_SIZE, jax.local_device_count(), seed=config.seed,
                           flip=config.data.flip, shard_index=jax.process_index(),
                           shard_count=jax.process_count(), worker_count=0)
    resumed = new_loader()
    resumed.set_state(train._own_loader_state(meta))
    record["restored_step"] = step
    record["restored_next_index"] = next(resumed)["index"].tolist()
    fresh = new_loader()   # an uninterrupted stream: the batches trained on, then the next
    record["fresh_indices"] = [next(fresh)["index"].tolist() for _ in range(step + 1)]
    resumed.close()
    fresh.close()
    (out / f"process{jax.process_index()}.json").write_text(json.dumps(record))
    print(f"process {jax.process_index()} of {jax.process_count()} done", flush=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        # Exit at once: a normal exit would wait (minutes) in jax.distributed's shutdown
        # barrier for the other process, which may be stuck waiting for this one.
        import traceback
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
