"""The evaluation protocol (reta3d/evaluation/protocol.py, evaluate.py): poses, distances,
resumable caches, the AED/APD estimator on renders with known parameters, and the job."""
import io
import json
import pathlib

import numpy as np
import pytest

from rasterizer.types import look_at_eg3d_label
from reta3d.evaluation import protocol


def test_head_rotation_in_camera_known_answers():
    frontal = look_at_eg3d_label(0.0, 0.0)[None]
    zero = np.zeros((1, 3))
    np.testing.assert_allclose(protocol.head_rotation_in_camera(frontal, zero, zero), 0.0,
                               atol=1e-6)
    # EG3D's camera at yaw 0.3 sits on the sphere around the origin and looks at (0, 0, 0.2):
    # its viewing direction is turned by atan(2.7 sin 0.3 / (2.7 cos 0.3 − 0.2)) about the
    # vertical axis, and the head turning by minus that angle in front of the frontal camera
    # looks the same.
    angle = np.arctan2(2.7 * np.sin(0.3), 2.7 * np.cos(0.3) - 0.2)
    moved = protocol.head_rotation_in_camera(look_at_eg3d_label(0.3, 0.0)[None], zero, zero)
    turned = protocol.head_rotation_in_camera(frontal, np.array([[0.0, -angle, 0.0]]), zero)
    assert np.linalg.norm(moved) == pytest.approx(angle, abs=1e-5)
    np.testing.assert_allclose(moved, turned, atol=1e-5)
    # Neck and global pose compose: R_global · R_neck.
    split = protocol.head_rotation_in_camera(frontal, np.array([[0.0, -0.1, 0.0]]),
                                             np.array([[0.0, 0.1 - angle, 0.0]]))
    np.testing.assert_allclose(split, turned, atol=1e-6)


def test_distances_are_rmse_and_mean_l1():
    driving = np.array([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    estimated = np.array([[3.0, 4.0], [1.0, 1.0], [np.nan, np.nan]])
    valid = np.array([True, True, False])
    d = protocol.distances(driving, estimated, valid)
    assert d["rmse"] == pytest.approx(np.sqrt((9 + 16) / 4))
    assert d["l1"] == pytest.approx((3 + 4) / 4)


def _fake_source(count, rng):
    return [dict(camera=rng.standard_normal(25).astype(np.float32),
                 **{k: rng.standard_normal(w).astype(np.float32)
                    for k, w in (("shape", 4), ("expression", 3), ("global_pose", 3),
                                 ("neck_pose", 3), ("jaw_pose", 3), ("eye_pose", 6))})
            for _ in range(count)]


def test_identity_conditions_keep_shape_and_mapping_camera_per_identity():
    """ID and AED/APD animate identities: within an identity the FLAME shape and the mapping's
    camera stay (its first row's), while cameras, expressions and poses change from set to
    set; across identities the shapes differ."""
    source = _fake_source(50, np.random.default_rng(0))
    c = protocol.identity_conditions(source, 4, 3, seed=7)
    assert c["shape"].shape == (12, 4) and c["mapping_camera"].shape == (12, 25)
    drawn = protocol.draw_conditions(source, 12, 7)   # the same records, unchanged
    for i in range(4):
        rows = slice(3 * i, 3 * i + 3)
        np.testing.assert_array_equal(c["shape"][rows], np.repeat(drawn["shape"][3 * i:3 * i + 1], 3, 0))
        np.testing.assert_array_equal(c["mapping_camera"][rows],
                                      np.repeat(drawn["camera"][3 * i:3 * i + 1], 3, 0))
        for key in ("camera", "expression", "jaw_pose", "neck_pose"):
            np.testing.assert_array_equal(c[key][rows], drawn[key][rows])
    assert len({tuple(c["shape"][3 * i]) for i in range(4)}) == 4
    with pytest.raises(ValueError, match="positive"):
        protocol.identity_conditions(source, 0, 3, seed=0)


def test_generate_conditions_the_mapping_on_the_mapping_camera():
    """_generate renders at each row's camera and passes "mapping_camera" (where given) as the
    mapping's condition, padding the last batch; without it, the rendering camera."""
    from reta3d.evaluation import evaluate
    source = _fake_source(20, np.random.default_rng(1))
    c = protocol.identity_conditions(source, 3, 2, seed=3)
    z = np.arange(6, dtype=np.float32)[:, None]
    calls = []

    def render(g_vars, z_batch, cameras, flame, mapping):
        calls.append((cameras, mapping))
        return np.zeros((len(z_batch), 2, 2, 3), np.float32)
    images = evaluate._generate(render, None, z, c, 0, 6, 4)
    assert images.shape == (6, 2, 2, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(calls[0][1], c["mapping_camera"][:4])
    np.testing.assert_array_equal(calls[1][1][:2], c["mapping_camera"][4:6])
    np.testing.assert_array_equal(calls[1][0][:2], c["camera"][4:6])
    assert not np.array_equal(calls[0][0], calls[0][1])
    del c["mapping_camera"]
    calls.clear()
    evaluate._generate(render, None, z, c, 0, 4, 4)
    np.testing.assert_array_equal(calls[0][1], c["camera"][:4])


def test_chunk_cache_resumes_and_refuses_another_key(tmp_path):
    calls = []

    def compute(start, stop):
        calls.append(start)
        return {"x": np.arange(start, stop)}
    cache = protocol.ChunkCache(tmp_path / "c", {"what": 1})
    console = io.StringIO()
    first = protocol.chunked(10, 4, cache, compute, "stage", stream=console)
    np.testing.assert_array_equal(first["x"], np.arange(10))
    assert calls == [0, 4, 8]
    assert console.getvalue().startswith("stage: 0/10, starting") and " 10/10 " in console.getvalue()
    cache.path(1).unlink()                       # an interrupted run lost one chunk
    console = io.StringIO()
    again = protocol.chunked(10, 4, protocol.ChunkCache(tmp_path / "c", {"what": 1}), compute,
                             "stage", stream=console)
    np.testing.assert_array_equal(again["x"], np.arange(10))
    assert calls == [0, 4, 8, 4]                 # only the missing chunk was recomputed
    assert console.getvalue().startswith("stage: 6/10, starting")   # the cached 6 are done
    console = io.StringIO()
    protocol.chunked(10, 4, cache, compute, "stage", stream=console)
    assert calls == [0, 4, 8, 4]
    assert console.getvalue() == f"stage: all 10 from the cache ({cache.folder})\n"
    with pytest.raises(ValueError, match="caches something else"):
        protocol.ChunkCache(tmp_path / "c", {"what": 2})


@pytest.mark.slow
def test_estimator_recovers_pose_of_renders_with_known_parameters(tmp_path):
    """The AED/APD estimator on synthetic template heads rendered at 256² with known camera
    and FLAME parameters: it finds most faces and recovers the head pose and jaw (APD) to
    about 0.1 rad (measured RMSE 0.09); a permuted driving set is far worse, so the check
    has power. Its expression error (AED) is reported as the metric's floor, not asserted
    (the template's expression components are not all identifiable from 68 points)."""
    pytest.importorskip("dlib", reason="face extras not installed: pip install -r requirements-faces.txt")
    from reta3d import flame, synthetic
    from reta3d.data import folder as folder_lib
    from reta3d.fitting import embedding
    path = synthetic.make_synthetic_dataset(tmp_path / "syn", 12, 256, seed=3)
    data = folder_lib.read_folder(path)
    images = np.stack([folder_lib.load_image(path / n) for n in data.filenames])
    conditions = {"camera": data.cameras, **{k: data.flame[k] for k in protocol.FLAME_KEYS}}
    model = flame.load()
    estimates = protocol.estimate_parameters(images, model, embedding.template_embedding(), 16)
    expression, pose = protocol.driving_parameters(conditions, 16)
    summary = protocol.summarize_animation_accuracy(expression, pose, estimates)
    assert summary["estimated"] >= 9
    assert summary["apd_rmse"] < 0.15, summary
    shuffled = protocol.summarize_animation_accuracy(expression, pose[::-1], estimates)
    assert shuffled["apd_rmse"] > 1.5 * summary["apd_rmse"], (shuffled, summary)
    # The head model's own landmarks, projected by the known cameras (what ID aligns with
    # id_alignment="model"), fall where dlib finds the faces' landmarks in the renders.
    from reta3d.fitting import landmarks as landmarks_lib
    from reta3d.fitting.preprocess import interocular_distance
    known = protocol.model_landmarks(model, embedding.template_embedding(), conditions, 256)
    errors = []
    for image, marks in zip(images, known):
        face, _ = landmarks_lib.find_face(image, min_score=0.0)
        if face is not None:
            errors.append(np.linalg.norm(face.landmarks[17:] - marks[17:], axis=-1).mean()
                          / interocular_distance(marks))
    assert len(errors) >= 9 and np.median(errors) < 0.15, errors


def test_markdown_table_has_the_paper_rows_and_notes():
    from reta3d.evaluation import evaluate
    report = {"model": "demo", "metrics": {"swd": 12.5, "id_dlib_distance": 0.41,
                                           "id_metric": "dlib ResNet face descriptor distance",
                                           "id_pairs": 9, "id_pairs_requested": 10},
              "skipped": {"fid": "bring the weights"}}
    table = evaluate.markdown_table(report)
    assert "| Next3D (FFHQ 512², Table 1a) | 3.9 |" in table
    assert "**demo**" in table and "12.5" in table and "0.41 dlib distance" in table
    assert "Skipped fid: bring the weights" in table
    json.dumps(report)
    # No face in any pair: no number, the hint, and strict JSON (null, never NaN).
    report["metrics"].update(id_dlib_distance=None, id_pairs=0, id_note=evaluate.NO_FACES_HINT,
                             swd_num_images=8, swd=float("nan"))
    table = evaluate.markdown_table(report)
    assert "--id_alignment=model" in table and "between 8 generated images" in table
    strict = evaluate.strict_json_values(report)
    assert strict["metrics"]["swd"] is None and strict["metrics"]["id_pairs"] == 0
    assert evaluate.strict_json_values({"a": [1.5, float("inf"), (2, -float("inf"))]}) == {
        "a": [1.5, None, [2, None]]}


def test_merge_reports_keeps_what_was_measured():
    """metrics.json across calls on one checkpoint: a group measured again with the same
    settings adds to what it had, with other settings it is replaced, and a call that could
    only skip it (no weights given) leaves the values measured before."""
    from reta3d.evaluation import evaluate

    def group(metrics, settings, skipped=None):
        return {"metrics": metrics, "skipped": skipped or {}, "settings": settings,
                "timing_s": 1.0}
    earlier = evaluate.merge_reports(None, {"model": "a", "weights": "w", "groups": {
        "swd": group({"swd": 3.0}, {"num_images": 8}),
        "fid_kid": group({"fid": 5.0}, {"inception": "x.npz"})}})
    assert list(earlier["groups"]) == ["fid_kid", "swd"]          # GROUPS' order
    assert earlier["metrics"] == {"fid": 5.0, "swd": 3.0}
    more = evaluate.merge_reports(earlier, {"model": "b", "weights": "w", "groups": {
        "fid_kid": group({"kid": 0.1}, {"inception": "x.npz"})}})
    assert more["metrics"] == {"fid": 5.0, "kid": 0.1, "swd": 3.0} and more["model"] == "b"
    only_skipped = evaluate.merge_reports(more, {"model": "b", "weights": "w", "groups": {
        "fid_kid": group({}, {"inception": None}, skipped={"fid": "bring the weights"})}})
    assert only_skipped["metrics"] == more["metrics"] and only_skipped["skipped"] == {}
    other = evaluate.merge_reports(more, {"model": "b", "weights": "w", "groups": {
        "fid_kid": group({"fid": 7.0}, {"inception": "y.npz"})}})
    assert other["metrics"] == {"fid": 7.0, "swd": 3.0}
    assert other["settings"] == {"fid_kid": {"inception": "y.npz"}, "swd": {"num_images": 8}}


@pytest.mark.slow
def test_evaluate_job_runs_fid_kid_swd_and_resumes(tmp_path, monkeypatch):
    """The job's wiring with a stand-in feature network (colour statistics per image, so the
    test needs no Inception weights): FID/KID/SWD land in metrics.json and metrics.md, the
    features are cached, and a second run reads the cache instead of generating again."""
    from reta3d import inference, synthetic
    from reta3d.data import folder as folder_lib
    from reta3d.evaluation import evaluate
    import reta3d.evaluation as evaluation_pkg

    path = synthetic.make_synthetic_dataset(tmp_path / "syn", 8, 32, seed=1)
    data = folder_lib.read_folder(path)
    source = [dict(image=folder_lib.load_image(path / n), camera=data.cameras[i],
                   **{k: data.flame[k][i] for k in protocol.FLAME_KEYS})
              for i, n in enumerate(data.filenames)]

    def features_fn_factory(_path):
        def features(images):
            images = np.asarray(images, np.float32) / 255.0
            return np.concatenate([images.mean((1, 2)), images.std((1, 2)),
                                   images[:, ::4, ::4].reshape(len(images), -1)[:, :26]], 1)
        return features
    monkeypatch.setattr(evaluation_pkg, "inception_feature_fn", features_fn_factory)
    config_path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py"
    config, generator, g_vars = inference.load_generator(config=str(config_path),
                                                         random_init=True)
    with config.unlocked():
        config.render.resolution = 32
    out = tmp_path / "eval"
    report = evaluate.evaluate(config, generator, g_vars, source, out, metrics=("fid", "kid", "swd"),
                               num_images=12, inception="stand-in", batch=4, progress=False)
    m = report["metrics"]
    assert m["fid"] > 0 and np.isfinite(m["kid"]) and m["swd"] > 0
    assert m["fid_num_generated"] == 12 and m["kid_subset_size"] == 8
    assert m["swd_num_images"] == 8       # num_images, up to the dataset's 8
    assert json.loads((out / "metrics.json").read_text())["metrics"]["fid"] == m["fid"]
    assert "**this run**" in (out / "metrics.md").read_text()
    assert list((out / "cache").glob("fake_inception_32/chunk_*.npz"))
    # Resuming: with the cache in place nothing is generated again.
    monkeypatch.setattr(evaluate, "_generate", lambda *a, **k: pytest.fail("regenerated"))
    again = evaluate.evaluate(config, generator, g_vars, source, out, metrics=("fid",),
                              num_images=12, inception="stand-in", batch=4, progress=False)
    assert again["metrics"]["fid"] == pytest.approx(m["fid"])
    # The metrics this call did not compute are kept from the first (same weights).
    assert again["metrics"]["swd"] == m["swd"] and again["metrics"]["kid"] == m["kid"]
    assert set(again["groups"]) == {"fid_kid", "swd"}
    assert again["settings"]["swd"]["num_images"] == 8
    monkeypatch.undo()
    # AED/APD through another estimator: export the images and driving parameters, read that
    # estimator's answers back. Perfect answers score 0; wrong ones do not; a bad file is an
    # error naming it.
    export = tmp_path / "aed_images"
    evaluate.evaluate(config, generator, g_vars, source, out, metrics=("aed", "apd"),
                      num_identities=2, sets_per_identity=2, face_resolution=64,
                      aed_export=export, batch=4, progress=False)
    assert len(list((export / "images").glob("*.png"))) == 4
    with np.load(export / "driving.npz") as driving:
        expression, pose = driving["expression"], driving["pose"]
    np.savez(tmp_path / "perfect.npz", expression=expression, pose=pose)
    perfect = evaluate.evaluate(config, generator, g_vars, source, out, metrics=("aed", "apd"),
                                num_identities=2, sets_per_identity=2, face_resolution=64,
                                aed_estimates=tmp_path / "perfect.npz", batch=4, progress=False)
    assert perfect["metrics"]["aed"] == 0.0 and perfect["metrics"]["apd"] == 0.0
    np.savez(tmp_path / "off.npz", expression=expression + 0.5, pose=pose, found=[1, 1, 0, 1])
    off = evaluate.evaluate(config, generator, g_vars, source, out, metrics=("aed",),
                            num_identities=2, sets_per_identity=2, face_resolution=64,
                            aed_estimates=tmp_path / "off.npz", batch=4, progress=False)
    assert off["metrics"]["aed"] == pytest.approx(0.5) and off["metrics"]["estimated"] == 3
    assert "(3 of 4 images)" in (out / "metrics.md").read_text()   # the cell says how few
    assert off["metrics"]["swd"] == m["swd"]        # still kept
    # An estimator that found no face anywhere: no numbers (null in strict JSON), a note.
    np.savez(tmp_path / "none.npz", expression=expression, pose=pose, found=[0, 0, 0, 0])
    none = evaluate.evaluate(config, generator, g_vars, source, out, metrics=("aed", "apd"),
                             num_identities=2, sets_per_identity=2, face_resolution=64,
                             aed_estimates=tmp_path / "none.npz", batch=4, progress=False)
    assert none["metrics"]["aed"] is None and none["metrics"]["estimated"] == 0

    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")
    written = json.loads((out / "metrics.json").read_text(), parse_constant=no_constants)
    assert written["metrics"]["aed"] is None
    assert "found no face in any image" in (out / "metrics.md").read_text()
    # Other weights: the earlier report is kept beside the new one, not merged into it.
    import jax
    other = jax.tree_util.tree_map(lambda x: x * 1.5, g_vars)
    earlier_key = written["weights"]
    fresh = evaluate.evaluate(config, generator, other, source, out, metrics=("aed",),
                              num_identities=2, sets_per_identity=2, face_resolution=64,
                              aed_estimates=tmp_path / "perfect.npz", batch=4, progress=False)
    assert fresh["weights"] != earlier_key and set(fresh["groups"]) == {"aed_apd"}
    kept = json.loads((out / f"metrics.{earlier_key}.json").read_text())
    assert kept["metrics"]["swd"] == m["swd"] and kept["metrics"]["fid"] == pytest.approx(m["fid"])
    np.savez(tmp_path / "bad.npz", expression=expression)
    with pytest.raises(ValueError, match="bad.npz"):
        evaluate.evaluate(config, generator, g_vars, source, out, metrics=("aed",),
                          num_identities=2, sets_per_identity=2, face_resolution=64,
                          aed_estimates=tmp_path / "bad.npz", batch=4, progress=False)


@pytest.mark.slow
def test_id_reference_script_measures_the_synthetic_data():
    """experiments/id_reference.py: dlib distances of synthetic identity pairs (same identity,
    other identity) come out finite and in the descriptor's range; kept small so it cannot rot."""
    import importlib.util
    script = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "id_reference.py"
    spec = importlib.util.spec_from_file_location("id_reference", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.id_reference(num=3, resolution=128, seed=0)
    assert out["num"] == 3 and "dlib" in out["metric"]
    for key in ("same_identity", "other_identities"):
        assert np.isfinite(out[key]) and 0.0 < out[key] < 1.5
