"""Command-line plumbing shared by the scripts under `experiments/`.

Flag groups (absl flags on `absl.flags.FLAGS`; call each `define_*` once, at a script's top
level, before `app.run`):

    define_generator_flags(psi=False)    --workdir --config --random_init --init_seed [--psi]
    define_render_flags()                --resolution --backend --capacity
    define_capacity_flag()               --capacity alone
    define_flame_model_flags()           --flame_model --flame_uv
    define_landmark_flags()              --landmark_embedding --dynamic_embedding
    define_identity_flag(instead_of)     --identity (load_identity_from_flags)
    define_timing_flags(repeats, warmup) --repeats --warmup

This module disclaims its key flags (`absl.flags.disclaim_key_flags`), so every flag it defines
belongs to the calling script and is listed by that script's `--help` (which shows only the
main module's flags). `run(main)` replaces `absl.app.run` in every script: usage and input
errors in one line, without the docstring or a traceback. Also here: the parsers of
list-valued flags (`parse_seeds`, `parse_floats`, `parse_expression_components`; they raise
`reta3d.errors.InputError`), `load_generator_from_flags`, `print_json` and `warn_overflow`
(the one-line rasterizer-overflow warning of the scripts).

Nothing here imports JAX at module import, so `--help` stays fast.
"""
from __future__ import annotations

import ast
import json
import math
import pathlib
import re
import sys
from typing import Any, Dict, Mapping, Optional

from absl import app, flags, logging
from ml_collections import config_flags

from reta3d import atomic_files, errors

FLAGS = flags.FLAGS

# The flags defined below are the calling script's key flags, not this module's.
flags.disclaim_key_flags()


# ------------------------------------------------------------------------------------------
# Flag groups
# ------------------------------------------------------------------------------------------

def define_generator_flags(psi: bool = False) -> None:
    """--workdir (a trained model: G_ema of the workdir's latest checkpoint) or --config with
    --random_init (random weights, seed --init_seed); psi=True adds --psi (truncation)."""
    flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints: G_ema).")
    config_flags.DEFINE_config_file("config", None, "Config file (with --random_init).",
                                    lock_config=True)
    flags.DEFINE_bool("random_init", False, "Random weights from --config (no trained model).")
    flags.DEFINE_integer("init_seed", 0, "PRNG seed of --random_init weights.")
    if psi:
        flags.DEFINE_float("psi", 1.0, "Truncation psi (1 = none).")


def define_capacity_flag() -> None:
    """--capacity: the rasterizer's tile-intersection slots per image (unset or 0: the
    rasterizer's default, `rasterizer.binning.default_capacity`)."""
    flags.DEFINE_integer(
        "capacity", None,
        "Rasterizer tile-intersection slots per image (unset or 0: the rasterizer's default, "
        "max(8·N, 4·tiles) rounded up to 1024). Intersections beyond it are dropped and "
        "reported in the JSON.", lower_bound=0)


def define_render_flags() -> None:
    """--resolution and --backend (default: the config's render settings) and --capacity."""
    flags.DEFINE_integer("resolution", None, "Render size (default: the config's render.resolution).")
    flags.DEFINE_enum("backend", None, ["auto", "jax", "triton"], "Rasterizer backend (default: config).")
    define_capacity_flag()


def define_flame_model_flags() -> None:
    """--flame_model / --flame_uv: real FLAME files (default: the embedded template head)."""
    flags.DEFINE_string("flame_model", None, "FLAME model file (.pkl/.npz); default: template.")
    flags.DEFINE_string("flame_uv", None, "FLAME UV file (head_template.obj or .npz); default: "
                                          "the model's own UVs.")


def define_landmark_flags() -> None:
    """--landmark_embedding / --dynamic_embedding: the head model's 68-point landmark
    embedding (default: the template head's own; a real FLAME model needs the user's file)."""
    flags.DEFINE_string("landmark_embedding", None,
                        "Landmark embedding of --flame_model: DECA's landmark_embedding.npy or "
                        "FLAME's flame_static_embedding.pkl (default: the template's own).")
    flags.DEFINE_string("dynamic_embedding", None,
                        "FLAME's flame_dynamic_embedding.npy (with flame_static_embedding.pkl).")


def load_head_and_landmarks(model=None, flag_values=FLAGS):
    """(head model, its LandmarkEmbedding) from --flame_model/--flame_uv and
    --landmark_embedding/--dynamic_embedding; `model` given: that model (e.g. a generator's).
    A real FLAME model without --landmark_embedding is an error saying where to get one."""
    from reta3d import flame
    from reta3d.fitting import embedding
    if model is None:
        model = flame.load(flag_values.flame_model, flag_values.flame_uv)
    path = flag_values.landmark_embedding
    if path is None:
        if model.name != "template_head":
            raise app.UsageError(
                f"the head model '{model.name}' needs --landmark_embedding: DECA's "
                "data/landmark_embedding.npy (github.com/yfeng95/DECA) or FLAME's "
                "flame_static_embedding.pkl (flame.is.tue.mpg.de)")
        return model, embedding.template_embedding()
    return model, embedding.load_embedding(path, model, flag_values.dynamic_embedding)


def define_identity_flag(instead_of: str) -> None:
    """--identity: an inverted identity (experiments/invert.py's OUT/identity.npz) used
    instead of the seed flags named in `instead_of` (for the help text)."""
    flags.DEFINE_string("identity", None, "An inverted identity (experiments/invert.py's "
                        f"OUT/identity.npz) instead of {instead_of}.")


def load_identity_from_flags(generator, g_vars, seed_flags_given: bool, flag_values=FLAGS):
    """--identity → (g_vars with its tuned weights merged, its StaticMaps, its Identity)
    (`reta3d.inversion.load_identity` / `read_identity`). UsageError when seed flags were also
    given (`seed_flags_given`) or the file is missing or belongs to other weights."""
    from reta3d import inversion
    if seed_flags_given:
        raise app.UsageError("--identity replaces the seed flags (and --psi)")
    try:
        g_vars, static = inversion.load_identity(flag_values.identity, generator, g_vars)
        return g_vars, static, inversion.read_identity(flag_values.identity)
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(str(e)) from e


def define_timing_flags(repeats: int, warmup: int) -> None:
    """--repeats (timed runs, the median is reported) and --warmup (untimed runs first)."""
    flags.DEFINE_integer("repeats", repeats, "Timed runs per measurement (the median is reported).")
    flags.DEFINE_integer("warmup", warmup, "Untimed warm-up runs per measurement before timing.")


# ------------------------------------------------------------------------------------------
# Using the flags
# ------------------------------------------------------------------------------------------

def run(main) -> None:
    """`absl.app.run(main)` for the scripts, with the user's mistakes reported in one line:
    an `app.UsageError` prints `usage error: …` and a pointer to `--help` (absl prints the
    script's whole docstring and flags first, which buries the message), and a
    `reta3d.errors.InputError` (a file, folder or setting that cannot be used; DatasetError,
    a missing photo folder, a video without a face …) prints `error: …` without a
    traceback. Both exit with status 1; every other exception keeps its traceback. A flag
    value absl cannot parse (`--seed=0.5`) is a usage error too. Ctrl-C prints one line
    (`interrupted`; the scripts that resume say so) and exits with status 130."""
    script = pathlib.Path(sys.argv[0]).name

    def main_reporting_input_errors(argv):
        try:
            return main(argv)
        except app.UsageError as e:
            _exit_with(f"usage error: {e}\nRun {script} --help for the flags.", e.exitcode)
        except errors.InputError as e:
            _exit_with(f"error: {e}", 1)
        except KeyboardInterrupt:
            _exit_with(f"{script}: interrupted", 130)

    def parse_flags(argv):
        try:
            return FLAGS(argv)
        except (flags.Error, KeyError, AttributeError, OSError) as e:
            # KeyError / AttributeError: a misspelt --config.x.y override (config_flags);
            # OSError: a --config file that does not exist.
            message = str(e)
            if isinstance(e, (KeyError, AttributeError)) and e.args:
                message = str(e.args[0])
                try:   # config_flags' text arrives as a repr: "'name'\nDid you mean …"
                    message = ast.literal_eval(message)
                except (ValueError, SyntaxError):
                    pass
                message = "unknown --config field " + " ".join(message.split("\n"))
            _exit_with(f"usage error: {message}\nRun {script} --help for the flags.", 1)

    app.run(main_reporting_input_errors, flags_parser=parse_flags)


def _exit_with(message: str, status: int) -> None:
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    sys.exit(status)


def start(argv) -> None:
    """The common first lines of a script's main: no positional arguments, absl logging at
    WARNING (JAX and orbax are chatty at INFO), JAX's persistent compilation cache on
    (`reta3d.compilation_cache`)."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from reta3d import compilation_cache
    compilation_cache.enable()  # a second run loads its compiled functions


def load_generator_from_flags(flag_values=FLAGS):
    """`reta3d.inference.load_generator` from the generator flags → (config, generator,
    g_vars). Raises `app.UsageError` unless exactly one of --workdir / --config is given, and
    --config with --random_init."""
    from reta3d import inference
    given = [name for name in ("workdir", "config") if flag_values[name].value is not None]
    if len(given) != 1:
        raise app.UsageError(
            "pass --workdir=RUN (a trained model) or --config=FILE --random_init (random "
            "weights), " + ("not both" if given else "got neither"))
    if given == ["config"] and not flag_values.random_init:
        raise app.UsageError("--config alone has no trained weights: add --random_init for "
                             "random ones, or pass --workdir=RUN of a trained model")
    return inference.load_generator(workdir=flag_values.workdir, config=flag_values.config,
                                    random_init=flag_values.random_init,
                                    seed=flag_values.init_seed)


def render_options(flag_values=FLAGS) -> Dict[str, Optional[Any]]:
    """{resolution, backend, capacity} from the render flags, as keyword arguments of
    `inference.make_frame_fn` / `make_view_fn` / `animate_to_video`."""
    return {"resolution": flag_values.resolution, "backend": flag_values.backend,
            "capacity": flag_values.capacity or None}


def print_json(result: Mapping[str, Any], out=None) -> str:
    """Prints `result` as indented JSON on stdout (and writes it to `out` when given)."""
    text = json.dumps(result, indent=2)
    print(text, flush=True)     # first: a bad `out` must not lose a long run's result
    if out:
        path = pathlib.Path(out)
        try:
            atomic_files.write_text(path, text)    # creates the folder
        except OSError as e:
            raise errors.InputError(f"cannot write {path} ({e}); the JSON above is the "
                                    "result") from e
    return text


def warn_overflow(report: Mapping[str, Any], what: str = "", file=None) -> Optional[str]:
    """Prints one warning line on stderr when `report` (from `inference.overflow_report`)
    counts dropped tile intersections; returns the line (None when nothing was dropped).

    Dropped intersections are Gaussians missing from the tiles they overlap (holes, wrong
    colours); the line says how many, in how many images, and the --capacity that holds the
    worst image (its capacity plus its overflow)."""
    dropped = int(report.get("dropped_tile_intersections", 0))
    if dropped <= 0:
        return None
    line = (f"warning: rasterizer capacity overflow{' in ' + what if what else ''}: {dropped} "
            f"tile intersections dropped in {report['images_with_overflow']} of "
            f"{report['images']} images (up to {100 * report['max_dropped_fraction']:.2f}% of "
            f"an image's); pass --capacity={report['capacity_needed']} or more (now "
            f"{report['capacity']})")
    print(line, file=sys.stderr if file is None else file, flush=True)
    return line


# ------------------------------------------------------------------------------------------
# Parsers of list-valued flags
# ------------------------------------------------------------------------------------------

def parse_seeds(text: str) -> list:
    """'0-3,7,10-11' → [0, 1, 2, 3, 7, 10, 11] (ranges inclusive, order kept, no duplicates)."""
    seeds = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise errors.InputError(
                f"--seeds={text}: '{part}' is not N or N-M (non-negative ints, e.g. 0-3,7)")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise errors.InputError(f"--seeds={text}: the range '{part}' ends before it starts "
                                    f"(write {hi}-{lo})")
        seeds.extend(s for s in range(lo, hi + 1) if s not in seeds)
    if not seeds:
        raise errors.InputError(f"--seeds={text!r}: no seed given (e.g. --seeds=0-3)")
    return seeds


def parse_floats(text: Optional[str], what: str) -> list:
    """'0.5,-1,2' → [0.5, -1.0, 2.0]; None or '' → []. `what` names the flag in errors."""
    if text is None or str(text).strip() == "":
        return []
    try:
        values = [float(t) for t in str(text).split(",") if t.strip() != ""]
    except ValueError as e:
        raise errors.InputError(
            f"{what}: expected a comma-separated list of numbers, got {text!r}") from e
    if not all(math.isfinite(v) for v in values):
        raise errors.InputError(f"{what}: values must be finite, got {text!r}")
    return values


def parse_expression_components(text: Optional[str]) -> Dict[str, int]:
    """'smile=1,blink=7' → {'smile': 1, 'blink': 7}."""
    out = {}
    for part in (text or "").replace(" ", "").split(","):
        if not part:
            continue
        match = re.fullmatch(r"([A-Za-z_]\w*)=(\d+)", part)
        if match is None:
            raise errors.InputError(
                f"bad expression component '{part}' in {text!r} (expected name=index)")
        out[match.group(1)] = int(match.group(2))
    return out
