"""Parity of our StyleGAN2 networks with seeded PyTorch reference vectors.

Used by the dispatcher `experiments/compare_pytorch.py stylegan2 --reference FILE.npz
[--tolerance_scale X]`, which calls `main(argv)`.

A reference file has the format of /work/shared/pytorch/sg2_*.npz (README.txt there): NCHW
float32 arrays; keys with a '.' are the PyTorch state dict, keys without are inputs/outputs,
and `config` is a JSON object with the constructor arguments and, under "outputs", how each
stored output was produced. Everything is derived from `config` (never from the file name);
a file without `config` is treated as an op-level file (sg2_ops.npz: upsample2d, downsample2d,
modulated_conv2d, conv2d_resample, bias_act, normalize_2nd_moment, minibatch std).

For every output it can reproduce, prints the max absolute error; an output fails when
    max|ours - ref| > tolerance_scale * (1e-5 * max|ref| + 1e-5).
Returns 0 when everything reproduced passes, 1 when any output fails, 2 when the file is
unusable or nothing could be reproduced.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import re
import sys
from typing import Callable, Dict, List, Optional, Sequence

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from reta3d.networks import convert, ops  # noqa: E402

REL_TOL = 1e-5
ABS_TOL = 1e-5


@dataclasses.dataclass
class Result:
    name: str
    max_abs_err: float
    max_abs_ref: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs_err)) and self.max_abs_err <= self.tolerance


def _nhwc(a) -> jax.Array:
    return jnp.asarray(a, jnp.float32).transpose(0, 2, 3, 1)


def _nchw(a) -> np.ndarray:
    return np.asarray(a).transpose(0, 3, 1, 2)


def _hwio(w) -> jax.Array:
    return jnp.asarray(w, jnp.float32).transpose(2, 3, 1, 0)


def _result(name: str, ours, ref: np.ndarray, scale: float) -> Result:
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"{name}: our output has shape {ours.shape}, reference {ref.shape}")
    max_ref = float(np.max(np.abs(ref))) if ref.size else 0.0
    err = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
    return Result(name, err, max_ref, scale * (REL_TOL * max_ref + ABS_TOL))


# --------------------------------------------------------------------------------------------
# Op-level file (no config)


def _op_outputs(d: Dict[str, np.ndarray]) -> Dict[str, Callable[[], np.ndarray]]:
    """Output name -> how to compute it, for the sg2_ops.npz outputs whose inputs are present."""
    f = d.get("filter")
    table: Dict[str, Callable[[], np.ndarray]] = {}

    def need(*keys):
        return all(k in d for k in keys)

    for suffix, x_key in (("", "ud_x"), ("8", "ud_x8")):
        if need(x_key, "filter"):
            table[f"up{suffix}_out"] = lambda x=x_key: _nchw(ops.upsample2d(_nhwc(d[x]), f))
            table[f"down{suffix}_out"] = lambda x=x_key: _nchw(ops.downsample2d(_nhwc(d[x]), f))
    if need("mc_x", "mc_w", "mc_styles"):
        mc = lambda w, **kw: _nchw(ops.modulated_conv2d(  # noqa: E731
            _nhwc(d["mc_x"]), _hwio(d[w]), jnp.asarray(d["mc_styles"]), **kw))
        table["mc_up1_out"] = lambda: mc("mc_w", padding=1, demodulate=True, flip_weight=True)
        if "filter" in d:
            table["mc_up2_out"] = lambda: mc("mc_w", up=2, padding=1, resample_filter=f,
                                             demodulate=True, flip_weight=False)
        if "mc_w1x1" in d:
            table["mc_torgb_out"] = lambda: mc("mc_w1x1", demodulate=False)
    if need("ud_x8", "filter"):
        for key, w, pad in (("cr_down3_out", "cr_w3", 1), ("cr_down1_out", "cr_w1", 0)):
            if w in d:
                table[key] = lambda w=w, pad=pad: _nchw(ops.conv2d_resample(
                    _nhwc(d["ud_x8"]), _hwio(d[w]), f, down=2, padding=pad, flip_weight=True))
    if need("ba_x", "ba_b"):
        ba = lambda **kw: _nchw(ops.bias_act(_nhwc(d["ba_x"]), jnp.asarray(d["ba_b"]), **kw))  # noqa: E731
        table["ba_lrelu_clamp256_out"] = lambda: ba(act="lrelu", clamp=256)
        table["ba_lrelu_out"] = lambda: ba(act="lrelu")
        table["ba_linear_clamp256_out"] = lambda: ba(act="linear", clamp=256)
    if need("n2m_x"):
        table["n2m_out"] = lambda: np.asarray(ops.normalize_2nd_moment(jnp.asarray(d["n2m_x"])))
    if need("mbstd_x"):
        for key in [k for k in d if re.fullmatch(r"mbstd_g\d+_out", k)]:
            group = int(re.fullmatch(r"mbstd_g(\d+)_out", key).group(1))
            table[key] = lambda g=group: _nchw(ops.minibatch_std(_nhwc(d["mbstd_x"]), g, 1))
    return table


# --------------------------------------------------------------------------------------------
# Network files


def _generator_outputs(module, variables, d, config) -> Dict[str, Callable[[], np.ndarray]]:
    if "z" not in d:
        raise ValueError("generator reference has no input 'z'")
    z = jnp.asarray(d["z"])
    c = jnp.asarray(d["c"]) if module.c_dim > 0 else None
    if module.c_dim > 0 and "c" not in d:
        raise ValueError(f"generator has c_dim={module.c_dim} but the reference has no input 'c'")

    # psi is traced (one compile for every psi; psi=1 then costs one rounding, far below the
    # tolerance); the synthesis is compiled once per noise mode and shared by every output.
    @functools.partial(jax.jit, static_argnames=("cutoff",))
    def mapping(variables, z, c, psi, cutoff):
        return module.apply(variables, z, c, truncation_psi=psi, truncation_cutoff=cutoff,
                            method=module.map_latents)

    @functools.partial(jax.jit, static_argnames=("noise_mode",))
    def synthesize(variables, ws, noise_mode):
        return module.apply(variables, ws, noise_mode=noise_mode, return_block_outputs=True,
                            method=module.synthesize)

    runs = {}  # the debug outputs of one run share it

    def generate(variables, z, c, psi, cutoff, noise_mode):
        key = (psi, cutoff, noise_mode)
        if key not in runs:
            ws = mapping(variables, z, c, psi, cutoff)
            runs[key] = synthesize(variables, ws, noise_mode)
        return runs[key]

    @jax.jit
    def w_avg_update(variables, z, c):
        _, state = module.apply(variables, z, c, update_w_avg=True, mutable=["mapping_state"],
                                method=module.map_latents)
        return state["mapping_state"]["mapping"]["w_avg"]

    def _psi(spec):
        psi = spec.get("psi", 1)
        return 1.0 if psi in (None, 1) else float(psi)

    outputs = config.get("outputs") or {}
    img_spec = outputs.get("img", {"psi": 1, "cutoff": None, "noise_mode": config.get("noise_mode")})
    table: Dict[str, Callable[[], np.ndarray]] = {}
    for name, spec in outputs.items():
        call = spec.get("call")
        cutoff = spec.get("cutoff")
        if call == "mapping":
            table[name] = lambda s=spec, co=cutoff: np.asarray(mapping(variables, z, c, _psi(s), co))
        elif call == "G":
            mode = spec.get("noise_mode") or config.get("noise_mode") or "const"
            table[name] = lambda s=spec, co=cutoff, m=mode: _nchw(
                generate(variables, z, c, _psi(s), co, m)[0])
        elif call == "mapping.train":
            table[name] = lambda: np.asarray(w_avg_update(variables, z, c))
        elif call == "hook":
            match = re.fullmatch(r"dbg_b(\d+)_(x|img)", name)
            if match:
                block, which = f"b{match.group(1)}", match.group(2)
                mode = img_spec.get("noise_mode") or config.get("noise_mode") or "const"
                table[name] = lambda b=block, w=which, m=mode: _nchw(generate(
                    variables, z, c, _psi(img_spec), img_spec.get("cutoff"), m)[1][b][
                        0 if w == "x" else 1])
    return table


def _discriminator_outputs(module, variables, d, config) -> Dict[str, Callable[[], np.ndarray]]:
    if "img" not in d:
        raise ValueError("discriminator reference has no input 'img'")
    img = _nhwc(d["img"])
    c = jnp.asarray(d["c"]) if module.c_dim > 0 else None
    if module.c_dim > 0 and "c" not in d:
        raise ValueError(f"discriminator has c_dim={module.c_dim} but the reference has no 'c'")

    @functools.lru_cache(maxsize=1)
    def run_once():
        return jax.jit(lambda v, x, c: module.apply(v, x, c, return_block_outputs=True))(
            variables, img, c)

    def run(variables, img, c):
        del variables, img, c  # always the file's own inputs; computed once
        return run_once()

    table: Dict[str, Callable[[], np.ndarray]] = {}
    for name, spec in (config.get("outputs") or {}).items():
        call = spec.get("call")
        if call == "D":
            table[name] = lambda: np.asarray(run(variables, img, c)[0])
        elif call == "hook":
            match = re.fullmatch(r"dbg_b(\d+)_x", name)
            if match:
                table[name] = lambda b=f"b{match.group(1)}": _nchw(run(variables, img, c)[1][b])
            elif name == "dbg_cmap" and module.c_dim > 0:
                table[name] = lambda: np.asarray(run(variables, img, c)[1]["cmap"])
    return table


def compare_reference(path: str, tolerance_scale: float = 1.0,
                      log: Callable[[str], None] = print,
                      module_overrides: Optional[Dict[str, object]] = None) -> List[Result]:
    """Recomputes every reproducible output of the reference file; returns one Result each.

    module_overrides: constructor arguments replacing the file's config (e.g.
    {"fused_modconv": False} to check our other modulated-conv path).

    Raises ValueError/FileNotFoundError for unusable files (missing, not an npz, bad config,
    weights that do not fit the configured module).
    """
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"reference file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {p} as .npz: {e}") from e

    config = None
    if "config" in arrays:
        try:
            config = json.loads(str(arrays.pop("config")))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: the 'config' entry is not valid JSON: {e}") from e
    io = {k: v for k, v in arrays.items() if "." not in k}
    state_dict = {k: v for k, v in arrays.items() if "." in k}

    if config is None:
        log(f"{p}: no config entry -> op-level comparisons")
        table = _op_outputs(io)
    else:
        kind = config.get("kind")
        if kind not in ("generator", "discriminator"):
            raise ValueError(f"{p}: config kind {kind!r} is not 'generator' or 'discriminator'")
        module = convert.build_module(kind, {**config, **(module_overrides or {})})
        variables = convert.torch_to_flax(state_dict, module, source=str(p))
        log(f"{p}: {kind} {convert.module_config(module)}")
        outputs_fn = _generator_outputs if kind == "generator" else _discriminator_outputs
        table = outputs_fn(module, variables, io, config)

    results = []
    for name in sorted(io):
        if name in table:
            results.append(_result(name, table[name](), io[name], tolerance_scale))
    reproduced = {r.name for r in results}
    skipped = [k for k in sorted(io) if k not in reproduced]
    if skipped:
        log(f"not compared (inputs or not reproducible): {', '.join(skipped)}")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """argv as sys.argv: argv[0] is the program name (the dispatcher passes
    "compare_pytorch.py stylegan2"), the flags follow. A list starting with a flag is
    accepted too (program name omitted)."""
    argv = list(sys.argv if argv is None else argv)
    prog = "compare_pytorch.py stylegan2"
    if argv and not argv[0].startswith("-"):
        prog, argv = argv[0], argv[1:]
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Compare our StyleGAN2 networks/ops with a PyTorch reference .npz.")
    parser.add_argument("--reference", required=True, help="reference .npz (sg2_*.npz format)")
    parser.add_argument("--tolerance_scale", type=float, default=1.0,
                        help="multiplies the tolerance 1e-5*max|ref| + 1e-5 (< 1 tightens)")
    args = parser.parse_args(argv)
    if not args.tolerance_scale > 0:
        print(f"error: --tolerance_scale must be > 0, got {args.tolerance_scale}", file=sys.stderr)
        return 2
    try:
        results = compare_reference(args.reference, args.tolerance_scale)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not results:
        print(f"error: nothing in {args.reference} could be reproduced", file=sys.stderr)
        return 2
    for r in results:
        print(f"{r.name:24s} max_abs_err={r.max_abs_err:.3e}  tol={r.tolerance:.3e}  "
              f"max|ref|={r.max_abs_ref:.3e}  {'ok' if r.ok else 'FAIL'}")
    failed = [r.name for r in results if not r.ok]
    print(json.dumps({"reference": str(args.reference), "compared": len(results),
                      "failed": failed, "tolerance_scale": args.tolerance_scale,
                      "max_rel_err": max(r.max_abs_err / max(r.max_abs_ref, 1e-30)
                                         for r in results)}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
