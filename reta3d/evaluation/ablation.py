"""Table 1(c), the ablation study, from trained runs: one row per run, the paper's beside.

Each run is a training workdir (`launch.py --config=configs/ablation.py:ROW`) in which
`experiments/evaluate.py --workdir=RUN` wrote `eval/metrics.json` (FID, AED) and
`experiments/benchmark.py --workdir=RUN --out=RUN/benchmark.json` wrote the Dri FPS. The row's
name comes from the run's own config.json (frame kind; generation modules), never from the
folder name. A missing file leaves its cells empty and adds a note saying which command
writes it.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Dict, List, Optional, Sequence

from reta3d import errors
from reta3d.networks.generator import ablation_row_name

# Tab. 1(c) of the paper: (row, resolution, FID, AED, Dri FPS on one RTX 2080 Ti).
PAPER_ROWS = (
    ("Global offset", "256²", 9.8, 0.15, None),
    ("Naive local", "256²", 11.9, 0.10, None),
    ("Consecutive local (ours)", "256²", 8.1, 0.08, None),
    ("Baseline", "512²", 6.8, 0.10, 31.5),
    ("+ G_m", "512²", 4.8, 0.09, 29.8),
    ("+ G_m + G_d", "512²", 4.3, 0.07, 79.2),
)
FRAME_ROW_NAMES = {"global": "Global offset", "naive": "Naive local",
                   "consecutive": "Consecutive local (ours)"}


def _read_json(path: pathlib.Path) -> Optional[Dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise errors.InputError(f"{path}: not valid JSON ({e})") from e


def run_row(run: str, metrics_file: str = "eval/metrics.json",
            benchmark_file: str = "benchmark.json") -> Dict[str, Any]:
    """One run's cells: {run, ablation (frame-kind or module row name), resolution, fid, aed,
    swd, dri_fps, device, notes}. Raises FileNotFoundError when `run` has no config.json (not a
    training workdir)."""
    root = pathlib.Path(run)
    config = _read_json(root / "config.json")
    if config is None:
        raise errors.MissingInputError(
            f"{root / 'config.json'} not found: {run} is not a training "
            "workdir (launch.py --config=configs/ablation.py:ROW --workdir=...)")
    model, head = config.get("model", {}), config.get("head", {})
    kind = head.get("frame_kind", "consecutive")
    row = {"run": str(run), "resolution": f"{config.get('render', {}).get('resolution')}²",
           "generation_modules": ablation_row_name(model.get("mouth_generator", True),
                                                   model.get("dynamic_module", True)),
           "frame_kind": FRAME_ROW_NAMES.get(kind, kind), "notes": []}
    metrics = _read_json(root / metrics_file)
    if metrics is None:
        row["notes"].append(f"no {root / metrics_file}: run experiments/evaluate.py --workdir={run}")
        m = {}
    else:
        m = metrics.get("metrics", {})
    for key in ("fid", "aed", "swd"):
        value = m.get(key)
        row[key] = None if value is None or (isinstance(value, float) and math.isnan(value)) else value
    bench = _read_json(root / benchmark_file)
    if bench is None:
        row["notes"].append(f"no {root / benchmark_file}: run experiments/benchmark.py "
                            f"--workdir={run} --out={root / benchmark_file}")
        row["dri_fps"], row["device"] = None, None
    else:
        row["dri_fps"] = bench.get("dri_fps")
        row["device"] = bench.get("device")
    return row


def _cell(value, digits=3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def row_label(row: Dict[str, Any]) -> str:
    """"Global offset", "Baseline", "+ G_m + G_d (consecutive local)", "Baseline, Naive local"..."""
    modules, frames = row["generation_modules"], row["frame_kind"]
    if frames == FRAME_ROW_NAMES["consecutive"]:
        return "+ G_m + G_d (consecutive local)" if modules == "+ G_m + G_d" else modules
    return frames if modules == "+ G_m + G_d" else f"{modules}, {frames}"


def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    """Table 1(c)'s layout: the paper's six rows, then one row per run."""
    lines = ["| row | Res. | FID ↓ | AED ↓ | Dri FPS ↑ | SWD ↓ | device |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, res, fid, aed, fps in PAPER_ROWS:
        lines.append(f"| {name} (paper, FFHQ) | {res} | {fid:.1f} | {aed:.2f} | "
                     f"{'–' if fps is None else f'{fps:.1f}'} | – | "
                     f"{'RTX 2080 Ti' if fps else '–'} |")
    for row in rows:
        name = row_label(row)
        lines.append(f"| **{name}** ({row['run']}) | {row['resolution']} | {_cell(row['fid'])} | "
                     f"{_cell(row['aed'])} | {_cell(row['dri_fps'], 4)} | {_cell(row['swd'])} | "
                     f"{_cell(row['device'])} |")
    notes: List[str] = [n for row in rows for n in row["notes"]]
    return "\n".join(lines) + "\n" + "".join(f"\n- {n}" for n in notes) + ("\n" if notes else "")
