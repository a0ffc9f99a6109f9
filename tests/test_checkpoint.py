import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reta3d.checkpoint import Checkpointer, CheckpointError


def _state(v):
    return {"params": {"w": jnp.full((3, 4), v, jnp.float32), "b": jnp.arange(4.0) + v},
            "step": jnp.asarray(int(v), jnp.int32), "rng": jax.random.key_data(jax.random.PRNGKey(int(v)))}


def _corrupt(step_dir: pathlib.Path):
    # Truncate every data file of the step: the restore must fail, not return garbage.
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.stat().st_size > 0]
    assert files
    for p in files:
        p.write_bytes(b"\x00garbage")


def test_save_restore_roundtrip_and_keep(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    for s in (1, 2, 3):
        ck.save(s, _state(float(s)), {"kimg": s * 0.5, "loader": {"epoch": s}})
    assert ck.steps() == [2, 3]  # keeps the last 2
    step, state, meta = ck.restore_latest(_state(0.0))
    assert step == 3 and meta == {"kimg": 1.5, "loader": {"epoch": 3}}
    np.testing.assert_array_equal(state["params"]["w"], np.full((3, 4), 3.0))
    np.testing.assert_array_equal(state["rng"], jax.random.key_data(jax.random.PRNGKey(3)))


def test_empty_workdir_gives_none(tmp_path):
    assert Checkpointer(tmp_path).restore_latest(_state(0.0)) is None


def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog):
    ck = Checkpointer(tmp_path, keep=3)
    ck.save(10, _state(10.0), {"kimg": 1})
    ck.save(20, _state(20.0), {"kimg": 2})
    _corrupt(ck.directory / "20")
    ck2 = Checkpointer(tmp_path, keep=3)
    with caplog.at_level("WARNING"):
        step, state, meta = ck2.restore_latest(_state(0.0))
    assert step == 10 and meta["kimg"] == 1
    np.testing.assert_array_equal(state["params"]["b"], np.arange(4.0) + 10)
    assert any("instead of the newest" in r.message for r in caplog.records)


def test_all_corrupt_raises(tmp_path):
    ck = Checkpointer(tmp_path)
    ck.save(5, _state(5.0), {})
    _corrupt(ck.directory / "5")
    with pytest.raises(CheckpointError, match="could be restored"):
        Checkpointer(tmp_path).restore_latest(_state(0.0))


def test_unfinished_save_is_ignored(tmp_path):
    ck = Checkpointer(tmp_path)
    ck.save(7, _state(7.0), {})
    # A save killed mid-way leaves only a temporary folder, which is not a checkpoint.
    (ck.directory / "9.orbax-checkpoint-tmp-123").mkdir()
    step, _, _ = Checkpointer(tmp_path).restore_latest(_state(0.0))
    assert step == 7
