"""The evaluation job of `experiments/evaluate.py`: Table 1(a)'s metrics for one trained model.

`evaluate(...)` computes the requested metrics (protocols in `reta3d.evaluation.protocol`),
writes `metrics.json` and `metrics.md` (Table 1(a)'s layout, the paper's rows beside this
run's) into the output folder, and returns the results. A metric whose weights are missing is
skipped with a message naming the file to bring and how to convert it; the others still run.
Generated features and estimates are cached under `OUT/cache/`, so an interrupted evaluation
resumes. A later call on the same weights with other metrics adds to `metrics.json` (the
metrics it recomputes are replaced); one on other weights keeps the earlier file as
`metrics.WEIGHTS.json` beside it.
"""
from __future__ import annotations

import json
import logging
import math
import pathlib
import time
from typing import Any, Dict, Optional, Sequence

import numpy as np

from reta3d import atomic_files, errors
from reta3d.evaluation import protocol

METRICS = ("fid", "kid", "id", "aed", "apd", "swd")
# The groups of metrics measured together (one protocol, one cache), in the report's order.
GROUPS = ("fid_kid", "id", "aed_apd", "swd")
# Table 1(a) of the paper (FFHQ 512²).
PAPER_ROWS = {
    "3DFaceShop": {"fid": 23.7, "aed": 0.12, "apd": 0.036, "id": 0.87},
    "Next3D": {"fid": 3.9, "aed": 0.12, "apd": 0.031, "id": 0.86},
    "OTAvatar": {"fid": 38.8, "aed": 0.17, "apd": 0.035, "id": 0.89},
    "RETA3D (paper)": {"fid": 4.3, "aed": 0.07, "apd": 0.018, "id": 0.97},
}
INCEPTION_HINT = (
    "FID/KID need the FID Inception-v3 weights: download pytorch-fid's "
    "pt_inception-2015-12-05-6726825d.pth (github.com/mseitzer/pytorch-fid releases) and pass "
    "--inception=that.pth, or convert it once with experiments/convert_inception.py and pass "
    "the .npz")
NO_FACES_HINT = (
    "ID: dlib found a face in neither image of any identity pair, so there is nothing to "
    "compare (heads a detector does not find, such as the synthetic demo's at low resolution); "
    "--id_alignment=model aligns the faces by the head model's own projected landmarks instead")
ARCFACE_HINT = (
    "ID with ArcFace needs arcface_torch's backbone.pth (insightface, recognition/arcface_torch "
    "model zoo; IResNet-50 or -100): pass --arcface=backbone.pth or its conversion by "
    "experiments/convert_arcface.py; without it ID is measured with dlib's face descriptor "
    "(reported under that name)")


def _render_fn(config, generator, resolution: int):
    """jit: (g_vars, z, cameras, flame, mapping_cameras) → images in [-1, 1] at `resolution`,
    rendered at `cameras`, the mapping conditioned on `mapping_cameras` (the rendering camera
    for FID/KID, as EG3D's metrics; the identity's own for ID and AED/APD)."""
    import copy

    from reta3d import train
    config = copy.deepcopy(config)
    with config.unlocked():
        config.render.resolution = int(resolution)
    sample = train.make_sample_fn(config, generator)
    return sample


def _generate(render, g_vars, z, conditions, start, stop, batch):
    """Images for conditions[start:stop] (uint8), rendered in fixed-size batches (padding the
    last) so that one compiled function serves every chunk. The mapping is conditioned on
    conditions["mapping_camera"] where given, else on the rendering camera."""
    from reta3d import train
    mapping = conditions.get("mapping_camera", conditions["camera"])
    flame = {k: conditions[k][start:stop] for k in protocol.FLAME_KEYS}
    images = train.sample_in_batches(render, g_vars, z[start:stop],
                                     conditions["camera"][start:stop], flame,
                                     mapping[start:stop], batch)
    return protocol.to_uint8(images)


def dataset_images(source, resolution: int, start: int, stop: int) -> np.ndarray:
    return protocol.resize_uint8(np.stack([np.asarray(source[i]["image"], np.uint8)
                                           for i in range(start, stop)]), resolution)


def evaluate(config, generator, g_vars, source, out, *, metrics: Sequence[str] = METRICS,
             num_images: int = 50000, num_identities: int = 500, sets_per_identity: int = 20,
             inception: Optional[str] = None, arcface: Optional[str] = None,
             face_resolution: int = 256, batch: int = 16, seed: int = 0,
             model_name: str = "this run", progress: bool = True,
             estimator_floor: bool = True, id_alignment: str = "detected",
             landmark_embedding=None, aed_export=None, aed_estimates=None) -> Dict[str, Any]:
    """Computes `metrics` (subset of METRICS) for (generator, g_vars) against `source` (the
    dataset: records with image, camera and FLAME keys) and writes OUT/metrics.json and
    OUT/metrics.md. num_images: generated images for FID/KID (EG3D: 50,000). num_identities /
    sets_per_identity: the ID and AED/APD protocols (paper: 500 / 20). inception / arcface:
    weight files (.pth or converted .npz). id_alignment: "detected" (the face embeddings align
    the faces dlib finds, as the papers' pipelines do) or "model" (they align the head model's
    own landmarks projected by the known camera: works on heads a detector does not find).
    landmark_embedding: the AED/APD estimator's embedding for a real FLAME generator.
    aed_export: a folder: write the AED/APD images and their driving parameters there instead
    of estimating (to run another estimator, e.g. DECA, on them); aed_estimates: an .npz of
    that estimator's results (`load_estimates`), compared instead of this project's fitter.

    Returns the report written to metrics.json: {"model", "weights" (digest of g_vars),
    "metrics" (flat: every value), "skipped" (metric → why), "timing_s", "settings" (per
    group), "groups" (GROUPS name → its metrics, skipped, settings and timing)}. Groups this
    call does not compute are kept from an earlier metrics.json in `out` on the same weights
    (`merge_reports`)."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {METRICS}")
    resolution = int(config.render.resolution)
    results: Dict[str, Any] = {}
    skipped: Dict[str, str] = {}
    timing: Dict[str, float] = {}
    groups: Dict[str, Dict[str, Any]] = {}

    def record(group, start_results, start_skipped, settings):
        groups[group] = {
            "metrics": {k: v for k, v in results.items() if k not in start_results},
            "skipped": {k: v for k, v in skipped.items() if k not in start_skipped},
            "settings": json.loads(json.dumps(settings, default=str)),   # paths as text
            "timing_s": timing[f"{group}_s"]}
    cache_root = out / "cache"
    weights_key = protocol.key_hash(jax_tree_digest(g_vars))
    renderers: Dict[int, Any] = {}

    def renderer(res):
        # One jitted sampler per resolution for the whole evaluation (FID/KID and SWD share
        # theirs: one compilation).
        if res not in renderers:
            renderers[res] = _render_fn(config, generator, res)
        return renderers[res]

    # ---------------------------------------------------------------- FID / KID
    if {"fid", "kid"} & set(metrics):
        start_time, before, before_skipped = time.perf_counter(), set(results), set(skipped)
        if inception is None:
            for m in ("fid", "kid"):
                if m in metrics:
                    skipped[m] = INCEPTION_HINT
            logging.warning(INCEPTION_HINT)
        else:
            from reta3d.evaluation import fid as fid_lib
            from reta3d.evaluation import inception_feature_fn
            features_fn = inception_feature_fn(inception)
            real_cache = protocol.ChunkCache(
                cache_root / f"real_inception_{resolution}",
                {"dataset": str(getattr(config.data, "path", "")), "size": len(source),
                 "resolution": resolution, "inception": str(inception)})
            real = protocol.chunked(len(source), 256, real_cache, lambda s, e: {
                "features": features_fn(dataset_images(source, resolution, s, e))},
                "real features" if progress else None)
            render = renderer(resolution)
            conditions = protocol.draw_conditions(source, num_images, seed)
            z = protocol.latents(num_images, config.model.z_dim, seed)
            fake_cache = protocol.ChunkCache(
                cache_root / f"fake_inception_{resolution}",
                {"weights": weights_key, "num_images": num_images, "seed": seed,
                 "inception": str(inception)})
            fake = protocol.chunked(num_images, 256, fake_cache, lambda s, e: {
                "features": features_fn(_generate(render, g_vars, z, conditions, s, e, batch))},
                "generated features" if progress else None)
            if "fid" in metrics:
                mu_r, sigma_r = fid_lib.feature_statistics(real["features"])
                mu_f, sigma_f = fid_lib.feature_statistics(fake["features"])
                results["fid"] = float(fid_lib.frechet_distance(mu_f, sigma_f, mu_r, sigma_r))
            if "kid" in metrics:
                subset = min(1000, len(real["features"]), len(fake["features"]))
                kid_mean, kid_std = fid_lib.kernel_inception_distance(
                    fake["features"], real["features"], subset_size=subset)
                results["kid"] = float(kid_mean)
                results["kid_std"] = float(kid_std)
                results["kid_subset_size"] = subset
            results["fid_num_real"] = len(source)
            results["fid_num_generated"] = num_images
        timing["fid_kid_s"] = time.perf_counter() - start_time
        record("fid_kid", before, before_skipped,
               {"num_images": num_images, "resolution": resolution, "seed": seed,
                "inception": inception, "dataset_size": len(source)})

    # ---------------------------------------------------------------- ID
    if "id" in metrics:
        start_time, before, before_skipped = time.perf_counter(), set(results), set(skipped)
        render = renderer(face_resolution)
        n = num_identities
        z = protocol.latents(n, config.model.z_dim, seed + 1)
        # Each identity twice: same latent, shape and mapping camera; other expression/pose.
        pairs = protocol.identity_conditions(source, n, 2, seed + 2)
        sets = [{key: value[k::2] for key, value in pairs.items()} for k in range(2)]
        if arcface is not None:
            from reta3d.evaluation import arcface as arcface_lib
            embed_fn = arcface_lib.arcface_embedding_fn(arcface)
            embed = lambda images, **kw: arcface_lib.embed_images(embed_fn, images, **kw)  # noqa: E731
            name, kind = "ArcFace cosine similarity", "cosine"
        else:
            from reta3d.evaluation import face_embedding
            # Generated heads score lower with the HOG detector than photos: keep every detection.
            embed = face_embedding.dlib_descriptor_fn(min_score=0.0)
            name, kind = "dlib ResNet face descriptor distance", "distance"
            skipped["id_arcface"] = ARCFACE_HINT
        if id_alignment not in ("detected", "model"):
            raise ValueError(f"id_alignment must be 'detected' or 'model', got {id_alignment!r}")
        known = None
        if id_alignment == "model":
            from reta3d.fitting import embedding as embedding_lib
            if generator.flame_model.name != "template_head":
                raise ValueError("id_alignment='model' needs the template head's embedding")
            emb_model = embedding_lib.template_embedding()
            known = [protocol.model_landmarks(generator.flame_model, emb_model, sets[k],
                                              face_resolution) for k in range(2)]
        cache = protocol.ChunkCache(cache_root / f"id_{face_resolution}_{id_alignment}",
                                    {"weights": weights_key, "n": n, "seed": seed,
                                     "embedding": name, "arcface": str(arcface),
                                     "alignment": id_alignment, "protocol": 2})

        def compute(s, e):
            arrays = {}
            for k in range(2):
                images = _generate(render, g_vars, z, sets[k], s, e, batch)
                if known is None:
                    emb, found = embed(images)
                else:
                    emb, found = embed(images, landmarks68=known[k][s:e])
                arrays[f"emb{k}"], arrays[f"found{k}"] = np.asarray(emb), np.asarray(found)
            return arrays
        emb = protocol.chunked(n, 50, cache, compute, "ID" if progress else None)
        both = emb["found0"] & emb["found1"]
        a, b = emb["emb0"][both], emb["emb1"][both]
        if not both.any():
            results["id" if kind == "cosine" else "id_dlib_distance"] = None
            results["id_note"] = NO_FACES_HINT
            logging.warning(NO_FACES_HINT)
        elif kind == "cosine":
            value = float(np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1)
                                                        * np.linalg.norm(b, axis=-1))))
            results["id"] = value
        else:
            results["id_dlib_distance"] = float(np.mean(np.linalg.norm(a - b, axis=-1)))
            # The same distance between different identities (identity i vs i+1): what the
            # same-identity distance must stay well below for the heads to keep an identity.
            if len(a) > 1:
                results["id_dlib_distance_other_identities"] = float(
                    np.mean(np.linalg.norm(a - np.roll(b, 1, axis=0), axis=-1)))
        results["id_metric"] = name + (" (faces aligned by the head model's own landmarks)"
                                       if id_alignment == "model" else "")
        results["id_pairs"] = int(both.sum())
        results["id_pairs_requested"] = n
        timing["id_s"] = time.perf_counter() - start_time
        record("id", before, before_skipped,
               {"num_identities": num_identities, "face_resolution": face_resolution,
                "seed": seed, "id_alignment": id_alignment, "arcface": arcface})

    # ---------------------------------------------------------------- AED / APD
    if {"aed", "apd"} & set(metrics):
        start_time, before, before_skipped = time.perf_counter(), set(results), set(skipped)
        model = generator.flame_model
        num_expression = min(model.num_expression, 50)
        total = num_identities * sets_per_identity
        z = np.repeat(protocol.latents(num_identities, config.model.z_dim, seed + 10),
                      sets_per_identity, axis=0)
        conditions = protocol.identity_conditions(source, num_identities, sets_per_identity,
                                                  seed + 11)
        drive_expression, drive_pose = protocol.driving_parameters(conditions, num_expression)
        render = renderer(face_resolution)
        estimated = None
        if aed_export is not None:
            export_aed_images(aed_export, render, g_vars, z, conditions, drive_expression,
                              drive_pose, batch, progress)
            results["aed_export"] = str(aed_export)
        elif aed_estimates is not None:
            estimated = load_estimates(aed_estimates, total, num_expression)
            results["aed_estimator"] = f"estimates from {aed_estimates}"
        elif landmark_embedding is None and model.name != "template_head":
            skipped["aed"] = skipped["apd"] = (
                "AED/APD with a real FLAME model need its landmark embedding "
                "(--landmark_embedding), or estimates from another estimator (--aed_export, "
                "then --aed_estimates)")
        else:
            from reta3d.fitting import embedding as embedding_lib
            emb_model = landmark_embedding or embedding_lib.template_embedding()
            cache = protocol.ChunkCache(cache_root / f"aed_{face_resolution}",
                                        {"weights": weights_key, "total": total, "seed": seed,
                                         "protocol": 2})

            def compute(s, e):
                images = _generate(render, g_vars, z, conditions, s, e, batch)
                est = protocol.estimate_parameters(images, model, emb_model, num_expression)
                return {"expression": est.expression, "pose": est.pose, "found": est.found}
            est = protocol.chunked(total, 50, cache, compute, "AED/APD" if progress else None)
            estimated = protocol.Estimates(est["expression"], est["pose"], est["found"])
            results["aed_estimator"] = "this project's landmark fitter (dlib 68 points + FLAME fit)"
            if estimator_floor and model.name == "template_head":
                results["estimator_floor"] = estimator_floor_on_synthetic(
                    model, emb_model, num_expression, face_resolution, seed=seed)
        if estimated is not None:
            summary = protocol.summarize_animation_accuracy(drive_expression, drive_pose,
                                                            estimated)
            results.update(summary)
            results["aed"], results["apd"] = summary["aed_rmse"], summary["apd_rmse"]
            if summary["estimated"] == 0:   # the values are NaN, written as null
                results["aed_note"] = "the estimator found no face in any image"
                logging.warning("AED/APD: the estimator found no face in any of the %d images",
                                total)
        timing["aed_apd_s"] = time.perf_counter() - start_time
        record("aed_apd", before, before_skipped,
               {"num_identities": num_identities, "sets_per_identity": sets_per_identity,
                "face_resolution": face_resolution, "seed": seed,
                "aed_estimates": aed_estimates, "aed_export": aed_export})

    # ---------------------------------------------------------------- SWD
    if "swd" in metrics:
        start_time, before, before_skipped = time.perf_counter(), set(results), set(skipped)
        from reta3d import train
        swd_images = min(num_images, len(source))
        swd = train.evaluate_swd(config, renderer(resolution), g_vars, source, swd_images,
                                 seed=seed, batch=batch)
        results["swd"] = float(swd["mean"])
        results["swd_num_images"] = swd_images
        results["swd_levels"] = {str(k): float(v) for k, v in swd["levels"].items()}
        timing["swd_s"] = time.perf_counter() - start_time
        record("swd", before, before_skipped,
               {"num_images": swd_images, "resolution": resolution, "seed": seed})

    report = merge_reports(read_report(out, weights_key),
                           {"model": model_name, "weights": weights_key, "groups": groups})
    report = strict_json_values(report)
    atomic_files.write_text(out / "metrics.json", json.dumps(report, indent=2, allow_nan=False))
    atomic_files.write_text(out / "metrics.md", markdown_table(report))
    return report


def read_report(out, weights_key: str) -> Optional[Dict[str, Any]]:
    """The earlier `out/metrics.json` when it was measured on the same weights (its groups are
    kept by `merge_reports`), else None. An earlier report of other weights (or unreadable) is
    first copied to `out/metrics.WEIGHTS.json` (`metrics.earlier.json`), so nothing measured is
    lost."""
    path = pathlib.Path(out) / "metrics.json"
    if not path.is_file():
        return None
    try:
        earlier = json.loads(path.read_text())
        same = earlier.get("weights") == weights_key and isinstance(earlier.get("groups"), dict)
    except (ValueError, AttributeError):
        earlier, same = None, False
    if same:
        return earlier
    tag = earlier.get("weights") if isinstance(earlier, dict) and earlier.get("weights") \
        else "earlier"
    kept = path.with_name(f"metrics.{tag}.json")
    atomic_files.write_bytes(kept, path.read_bytes())
    print(f"{path} was measured on other weights ({tag}); kept as {kept}", flush=True)
    return None


def merge_reports(earlier: Optional[Dict[str, Any]], current: Dict[str, Any]) -> Dict[str, Any]:
    """The report of `current` ({"model", "weights", "groups"}) with the groups it does not
    hold taken from `earlier` (same weights), flattened into "metrics", "skipped", "timing_s"
    and "settings" (group → settings) in GROUPS' order. A group measured again with the same
    settings keeps its earlier values that this call did not compute (FID, then KID alone);
    with other settings it is replaced whole; one this call only skipped keeps its values."""
    groups = dict((earlier or {}).get("groups", {}))
    for name, group in current["groups"].items():
        old = groups.get(name)
        if old is not None and old["metrics"] and not group["metrics"]:
            continue     # skipped now (weights not given): the values measured before stay
        # Settings are plain JSON values (`evaluate` round-trips them), so == compares them.
        if old is not None and old.get("settings") == group["settings"]:
            group = dict(group, metrics={**old["metrics"], **group["metrics"]},
                         skipped={**{k: v for k, v in old["skipped"].items()
                                     if k not in group["metrics"]}, **group["skipped"]})
        groups[name] = group
    groups = {g: groups[g] for g in GROUPS if g in groups}
    report = {"model": current["model"], "weights": current["weights"], "metrics": {},
              "skipped": {}, "timing_s": {}, "settings": {}, "groups": groups}
    for name, group in groups.items():
        report["metrics"].update(group["metrics"])
        report["skipped"].update(group["skipped"])
        report["timing_s"][f"{name}_s"] = group["timing_s"]
        report["settings"][name] = group["settings"]
    return report


def strict_json_values(tree):
    """`tree` with every non-finite float (NaN, ±inf) replaced by None, so that the report is
    strict JSON (`null`), which every JSON parser reads; NaN is not JSON."""
    if isinstance(tree, dict):
        return {k: strict_json_values(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [strict_json_values(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def export_aed_images(folder, render, g_vars, z, conditions, drive_expression, drive_pose,
                      batch: int, progress: bool) -> None:
    """Writes the AED/APD images (FOLDER/images/000000.png, …) and FOLDER/driving.npz
    (expression (N, E), pose (N, 6): head rotation relative to the camera from the frontal pose
    as axis-angle, then jaw axis-angle; camera (N, 25)) for an outside estimator. Its results
    come back through `load_estimates` (same row order)."""
    from reta3d.fitting.preprocess import Progress
    folder = pathlib.Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    total = len(z)
    bar = Progress(total, "AED/APD images") if progress else None
    for start in range(0, total, 50):
        stop = min(start + 50, total)
        if not all((folder / "images" / f"{i:06d}.png").exists() for i in range(start, stop)):
            images = _generate(render, g_vars, z, conditions, start, stop, batch)
            for i, image in zip(range(start, stop), images):
                atomic_files.save_png(folder / "images" / f"{i:06d}.png", image)
        if bar:
            bar.update(stop)
    atomic_files.save_npz(folder / "driving.npz", {
        "expression": drive_expression, "pose": drive_pose, "camera": conditions["camera"]})


def load_estimates(path, total: int, num_expression: int) -> "protocol.Estimates":
    """An outside estimator's results for the exported AED/APD images: an .npz with
    expression (N, >= E) and pose (N, 6) (`export_aed_images`' layout), optional found (N,)
    (rows with found = 0 or any NaN are left out). Raises ValueError naming the file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise errors.MissingInputError(f"AED/APD estimates not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        missing = {"expression", "pose"} - set(data.files)
        if missing:
            raise errors.InputError(f"{path}: missing array(s) {sorted(missing)}; expected expression "
                             "(N, E), pose (N, 6) and optionally found (N,)")
        expression = np.asarray(data["expression"], np.float64)
        pose = np.asarray(data["pose"], np.float64)
        found = np.asarray(data["found"]).astype(bool) if "found" in data.files else None
    if expression.ndim != 2 or expression.shape[0] != total or pose.shape != (total, 6):
        raise errors.InputError(f"{path}: expected expression ({total}, E) and pose ({total}, 6) for the "
                         f"{total} exported images, got {expression.shape} and {pose.shape}")
    out = np.zeros((total, num_expression))
    e = min(num_expression, expression.shape[1])
    out[:, :e] = expression[:, :e]
    ok = np.isfinite(out).all(1) & np.isfinite(pose).all(1)
    if found is not None:
        ok &= found
    return protocol.Estimates(out, pose, ok)


def estimator_floor_on_synthetic(model, embedding, num_expression: int, resolution: int,
                                 count: int = 32, seed: int = 0) -> Dict[str, Any]:
    """The AED/APD estimator's own error: synthetic template heads rendered with known camera
    and FLAME parameters (`reta3d.synthetic`), re-estimated and compared like the metric."""
    import tempfile

    from reta3d import synthetic
    from reta3d.data import folder as folder_lib
    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic.make_synthetic_dataset(pathlib.Path(tmp) / "floor", count, resolution,
                                                seed=seed + 100)
        data = folder_lib.read_folder(path)
        images = np.stack([folder_lib.load_image(path / name) for name in data.filenames])
    conditions = {"camera": np.asarray(data.cameras, np.float32),
                  **{k: np.asarray(data.flame[k], np.float32) for k in protocol.FLAME_KEYS}}
    est = protocol.estimate_parameters(images, model, embedding, num_expression)
    drive_expression, drive_pose = protocol.driving_parameters(conditions, num_expression)
    return dict(protocol.summarize_animation_accuracy(drive_expression, drive_pose, est),
                resolution=resolution)


def jax_tree_digest(tree) -> str:
    """A short digest of a pytree of arrays (which weights were evaluated)."""
    import hashlib

    import jax
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        a = np.asarray(leaf)
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes()[:4096])
        h.update(np.float64(a.astype(np.float64).sum()).tobytes())
    return h.hexdigest()[:16]


def _fmt(value, digits=3):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def markdown_table(report: Dict[str, Any]) -> str:
    """Table 1(a)'s layout: the paper's rows (FFHQ 512²) and this run's."""
    m = report["metrics"]
    lines = ["| model | FID ↓ | KID ↓ | AED ↓ | APD ↓ | ID ↑ | SWD ↓ |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in PAPER_ROWS.items():
        lines.append(f"| {name} (FFHQ 512², Table 1a) | {row['fid']} | – | {row['aed']} | "
                     f"{row['apd']} | {row['id']} | – |")
    id_value = _fmt(m.get("id")) if "id" in m else (
        f"({_fmt(m['id_dlib_distance'])} dlib distance ↓; other identities "
        f"{_fmt(m.get('id_dlib_distance_other_identities'))})" if "id_dlib_distance" in m else "–")
    if m.get("id_pairs") is not None and m["id_pairs"] < m.get("id_pairs_requested", 0):
        id_value += f" ({m['id_pairs']} of {m['id_pairs_requested']} pairs)"
    aed, apd = _fmt(m.get("aed")), _fmt(m.get("apd"))
    if m.get("estimated") is not None and m["estimated"] < m.get("images", 0):
        # A value from a few of the images is not the metric: the cell says how few.
        read = f" ({m['estimated']} of {m['images']} images)"
        aed, apd = aed + read, apd + read
    lines.append(f"| **{report['model']}** | {_fmt(m.get('fid'))} | {_fmt(m.get('kid'))} | "
                 f"{aed} | {apd} | {id_value} | {_fmt(m.get('swd'))} |")
    notes = []
    if "aed" in m:
        notes.append(f"AED/APD: RMSE (Next3D's convention) {_fmt(m['aed_rmse'])} / "
                     f"{_fmt(m['apd_rmse'])}; mean L1 (3DFaceShop/OTAvatar) {_fmt(m['aed_l1'])} / "
                     f"{_fmt(m['apd_l1'])}; {m['estimated']} of {m['images']} images estimated "
                     f"by {m.get('aed_estimator', 'the estimator')}.")
        floor = m.get("estimator_floor")
        if floor:
            notes.append(f"The estimator's own error on synthetic renders with known parameters: "
                         f"AED {_fmt(floor['aed_rmse'])} (answering 'neutral' every time: "
                         f"{_fmt(floor['aed_rmse_zero_guess'])}), APD {_fmt(floor['apd_rmse'])} "
                         "(RMSE).")
    if "id_metric" in m:
        notes.append(f"ID: {m['id_metric']} over {m['id_pairs']} of {m['id_pairs_requested']} "
                     "identity pairs.")
    notes += [m[k] + "." for k in ("id_note", "aed_note") if m.get(k)]
    if "swd_num_images" in m:
        notes.append(f"SWD (×10³) between {m['swd_num_images']} generated images and as many "
                     "of the dataset's.")
    for name, why in report.get("skipped", {}).items():
        notes.append(f"Skipped {name}: {why}")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
