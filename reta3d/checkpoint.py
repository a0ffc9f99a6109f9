"""Orbax checkpoints for training: atomic saves, keep the last K, resume with fallback.

A checkpoint holds one pytree of arrays (parameters, EMA, optimiser states, step, RNG keys)
and a JSON object (data-loader state, kimg, wall time, ...). Orbax writes each step into a
temporary folder and renames it when complete, so a crash during a save never touches the
last good checkpoint; a step that fails to restore (truncated or corrupted files) is skipped
with a warning and the previous one is used instead — never a silent restart from scratch.
"""
from __future__ import annotations

import logging
import pathlib
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    pass


def _abstract(tree):
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Save / restore training state in `workdir/checkpoints`."""

    def __init__(self, workdir: str | pathlib.Path, keep: int = 3):
        self.directory = pathlib.Path(workdir).resolve() / "checkpoints"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def steps(self):
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, force: bool = True) -> None:
        self.manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force,
        )
        self.manager.wait_until_finished()

    def restore_latest(self, template: Any) -> Optional[Tuple[int, Any, dict]]:
        """The newest checkpoint that restores cleanly, as (step, state, meta), or None if the
        folder holds no checkpoint. `template` is a pytree with the state's structure, shapes
        and dtypes (e.g. a freshly initialised state). Raises CheckpointError when checkpoints
        exist but none can be restored."""
        steps = self.steps()
        if not steps:
            return None
        abstract = _abstract(template)
        errors = []
        for step in reversed(steps):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                            meta=ocp.args.JsonRestore()),
                )
                if step != steps[-1]:
                    logging.warning("Resuming from checkpoint %d instead of the newest (%d), which "
                                    "could not be restored: %s", step, steps[-1], errors[0])
                return step, restored["state"], dict(restored["meta"] or {})
            except Exception as e:  # noqa: BLE001 - any failure means "this step is unusable"
                errors.append(f"step {step}: {type(e).__name__}: {e}")
                logging.warning("Checkpoint %s/%d could not be restored (%s: %s)",
                                self.directory, step, type(e).__name__, str(e)[:300])
        raise CheckpointError(f"No checkpoint in {self.directory} could be restored:\n  " +
                              "\n  ".join(errors))

    def close(self):
        self.manager.close()
