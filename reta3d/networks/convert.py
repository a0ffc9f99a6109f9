"""PyTorch StyleGAN2-ADA / EG3D state dicts <-> our Flax variables.

A state dict is a mapping {torch name: array} (torch tensors or numpy arrays), with the names
and layouts of NVlabs/stylegan2-ada-pytorch `training/networks.py` (see
/work/shared/pytorch/{README.txt,g_uv256.txt,d512.txt}). Our modules use the same names, so the
conversion is:

  our path ("params", "synthesis", "b8", "conv0", "kernel")  <->  "synthesis.b8.conv0.weight"
  conv kernel  HWIO (kh, kw, in, out)  <->  (out, in, kh, kw)
  dense kernel (in, out)               <->  (out, in)
  b4.const     (4, 4, C)               <->  (C, 4, 4)
  everything else (bias, noise_strength, noise_const, w_avg): unchanged.

The PyTorch `resample_filter` buffers are not Flax variables (the FIR filter is a module
attribute); on import they must equal `setup_filter(resample_filter)`, on export they are
written back. Mismatches (unknown keys, missing keys, wrong shapes, wrong filters, non-finite
values) raise `StateDictMismatchError` listing every offending key.

Also: building our modules from a JSON-able config (the `config` entry of the reference
`.npz` files, or our own constructor kwargs), and saving/loading converted variables with orbax.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from reta3d import atomic_files, errors
from reta3d.networks import ops
from reta3d.networks.initialization import jit_init
from reta3d.networks.stylegan2 import (Discriminator, Generator, MappingNetwork,
                                       SynthesisNetwork, channels_at, synthesis_num_ws)

COLLECTIONS = ("params", "buffers", "mapping_state")
# Modules that hold a `resample_filter` buffer in PyTorch: every conv layer except torgb.
_FILTER_LAYER_NAMES = frozenset({"conv0", "conv1", "fromrgb", "skip", "conv"})
_BLOCK_NAME = re.compile(r"^b\d+$")

MODULE_CLASSES = {
    "generator": Generator,
    "discriminator": Discriminator,
    "synthesis": SynthesisNetwork,
    "mapping": MappingNetwork,
}


class StateDictMismatchError(ValueError):
    """A state dict does not fit the target module; the message lists every problem."""


# --------------------------------------------------------------------------------------------
# Names and layouts


def _flatten(tree: Mapping, prefix: Tuple[str, ...] = ()) -> Dict[Tuple[str, ...], Any]:
    out = {}
    for key, value in tree.items():
        path = prefix + (str(key),)
        if isinstance(value, Mapping):
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out


def _unflatten(flat: Mapping[Tuple[str, ...], Any]) -> Dict[str, Any]:
    tree: Dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def torch_name(path: Sequence[str]) -> str:
    """PyTorch state-dict name of a Flax variable path (without the collection)."""
    names = list(path)
    if names[-1] == "kernel":
        names[-1] = "weight"
    return ".".join(names)


def to_torch_layout(path: Sequence[str], value: np.ndarray) -> np.ndarray:
    """Our array -> the PyTorch layout of the same tensor."""
    leaf = path[-1]
    if leaf == "kernel" and value.ndim == 4:
        return np.transpose(value, (3, 2, 0, 1))
    if leaf == "kernel" and value.ndim == 2:
        return np.transpose(value)
    if leaf == "const" and value.ndim == 3:
        return np.transpose(value, (2, 0, 1))
    return value


def from_torch_layout(path: Sequence[str], value: np.ndarray) -> np.ndarray:
    """PyTorch array -> our layout (inverse of `to_torch_layout`)."""
    leaf = path[-1]
    if leaf == "kernel" and value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))
    if leaf == "kernel" and value.ndim == 2:
        return np.transpose(value)
    if leaf == "const" and value.ndim == 3:
        return np.transpose(value, (1, 2, 0))
    return value


def _torch_shape(path: Sequence[str], shape: Tuple[int, ...]) -> Tuple[int, ...]:
    return to_torch_layout(path, np.empty(shape, np.bool_)).shape


def filter_buffer_names(variables: Mapping) -> List[str]:
    """Torch names of the `resample_filter` buffers the PyTorch twin of `variables` holds.

    Every conv layer except torgb (SynthesisLayer conv0/conv1, D fromrgb/conv0/conv1/skip/
    epilogue conv) and every block that has a conv0/conv1 (G blocks, D blocks except b4).
    """
    module_paths = set()
    for path in _flatten(variables.get("params", {})):
        for i in range(1, len(path)):
            module_paths.add(path[:i])
    names = []
    for path in sorted(module_paths):
        last = path[-1]
        if last in _FILTER_LAYER_NAMES:
            names.append(".".join(path + ("resample_filter",)))
        elif _BLOCK_NAME.match(last) and (path + ("conv0",) in module_paths
                                          or path + ("conv1",) in module_paths):
            names.append(".".join(path + ("resample_filter",)))
    return names


# --------------------------------------------------------------------------------------------
# Conversion


def _to_numpy(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    try:
        return np.asarray(value)
    except Exception as e:  # noqa: BLE001 - re-raised with the key name
        raise StateDictMismatchError(f"state dict entry {name!r} is not an array: {e}") from e


def torch_to_flax(state_dict: Mapping[str, Any], target: Any, *, prefix: str = "",
                  resample_filter: Sequence[int] = ops.DEFAULT_FILTER_TAPS,
                  source: Optional[str] = None) -> Dict[str, Any]:
    """State dict -> variables {collection: nested dict of float32 numpy arrays}.

    state_dict: {torch name: tensor/array}. target: one of our modules, or the abstract
    variables (e.g. `abstract_variables(module)`) giving names and shapes. prefix: the torch
    name prefix of the target (e.g. "synthesis." to take G_m's synthesis out of a full G
    state dict); keys outside the prefix are ignored, keys inside must all be used.
    source: the file name, quoted in errors.
    """
    if isinstance(target, nn.Module):
        target = abstract_variables(target)
    where = f" in {source}" if source else ""
    expected_filter = setup_filter_np(resample_filter)
    flat_target = {(col,) + path: leaf for col in COLLECTIONS
                   for path, leaf in _flatten(target.get(col, {})).items()}
    unknown_collections = set(target) - set(COLLECTIONS)
    if unknown_collections:
        raise ValueError(f"target variables have unsupported collections {unknown_collections}")

    relevant = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    used = set()
    missing, bad_shape, non_finite = [], [], []
    out: Dict[Tuple[str, ...], np.ndarray] = {}
    for full_path, leaf in flat_target.items():
        path = full_path[1:]
        name = prefix + torch_name(path)
        if name not in relevant:
            missing.append(f"{name} {list(_torch_shape(path, tuple(leaf.shape)))}")
            continue
        used.add(name)
        value = _to_numpy(relevant[name], name)
        want = _torch_shape(path, tuple(leaf.shape))
        if tuple(value.shape) != want:
            bad_shape.append(f"{name}: got {list(value.shape)}, expected {list(want)}")
            continue
        value = value.astype(np.float32)
        if not np.all(np.isfinite(value)):
            non_finite.append(name)
        out[full_path] = np.array(from_torch_layout(path, value), order="C")

    bad_filter = []
    filter_names = [prefix + n for n in filter_buffer_names(target)]
    for name in filter_names:
        if name not in relevant:
            missing.append(f"{name} {list(expected_filter.shape)}")
            continue
        used.add(name)
        value = _to_numpy(relevant[name], name).astype(np.float32)
        if value.shape != expected_filter.shape or not np.allclose(value, expected_filter,
                                                                    rtol=1e-6, atol=1e-7):
            bad_filter.append(f"{name}: expected setup_filter({list(resample_filter)}) "
                              f"{list(expected_filter.shape)}, got shape {list(value.shape)}")
    unknown = sorted(set(relevant) - used)

    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown key(s): " + ", ".join(unknown))
    if missing:
        problems.append(f"{len(missing)} missing key(s): " + ", ".join(missing))
    if bad_shape:
        problems.append(f"{len(bad_shape)} shape mismatch(es): " + "; ".join(bad_shape))
    if bad_filter:
        problems.append(f"{len(bad_filter)} wrong resample_filter buffer(s): "
                        + "; ".join(bad_filter))
    if non_finite:
        problems.append(f"{len(non_finite)} tensor(s) with NaN/Inf: " + ", ".join(non_finite))
    if problems:
        raise StateDictMismatchError(f"state dict{where} does not match the target module "
                                     f"(prefix {prefix!r}):\n  " + "\n  ".join(problems))
    return _unflatten(out)


def flax_to_torch(variables: Mapping, *, prefix: str = "",
                  resample_filter: Sequence[int] = ops.DEFAULT_FILTER_TAPS
                  ) -> Dict[str, np.ndarray]:
    """Variables -> state dict {torch name: float32 numpy array} (incl. resample_filter buffers),
    loadable with `module.load_state_dict(...)` of the PyTorch twin."""
    out: Dict[str, np.ndarray] = {}
    for col in COLLECTIONS:
        for path, value in _flatten(variables.get(col, {})).items():
            out[prefix + torch_name(path)] = np.array(
                to_torch_layout(path, np.asarray(value, np.float32)), order="C")
    filt = setup_filter_np(resample_filter)
    for name in filter_buffer_names(variables):
        out[prefix + name] = filt.copy()
    return out


def setup_filter_np(taps: Sequence[int]) -> np.ndarray:
    """(n, n) float32 FIR filter as stored in the PyTorch `resample_filter` buffers."""
    return ops.setup_filter(taps)


# --------------------------------------------------------------------------------------------
# Modules from configs


def example_inputs(module: nn.Module, batch: int = 1) -> Tuple[tuple, dict]:
    """(args, kwargs) of zeros that `module.init` accepts; shapes follow the module config."""
    z = lambda d: jnp.zeros((batch, d), jnp.float32)  # noqa: E731
    if isinstance(module, Generator):
        return (z(module.z_dim), z(module.c_dim) if module.c_dim > 0 else None), \
            dict(noise_mode="const")
    if isinstance(module, SynthesisNetwork):
        return (jnp.zeros((batch, module.num_ws, module.w_dim), jnp.float32),), \
            dict(noise_mode="const")
    if isinstance(module, MappingNetwork):
        return (z(module.z_dim) if module.z_dim > 0 else None,
                z(module.c_dim) if module.c_dim > 0 else None), {}
    if isinstance(module, Discriminator):
        res = module.img_resolution
        return (jnp.zeros((batch, res, res, module.img_channels), jnp.float32),
                z(module.c_dim) if module.c_dim > 0 else None), {}
    raise TypeError(f"no example inputs for {type(module).__name__}")


def abstract_variables(module: nn.Module) -> Dict[str, Any]:
    """Variables of `module` as ShapeDtypeStructs (no memory, no compute: jax.eval_shape)."""
    args, kwargs = example_inputs(module)
    return jax.eval_shape(lambda key: module.init(key, *args, **kwargs), jax.random.key(0))


def init_variables(module: nn.Module, key: jax.Array, batch: int = 1) -> Dict[str, Any]:
    """Freshly initialised variables of `module` (params, buffers, mapping_state)."""
    args, kwargs = example_inputs(module, batch)
    # jit: eager init dispatches hundreds of small ops, which is far slower than compiling.
    return jit_init(lambda k, a: module.init(k, *a, **kwargs))(key, args)


# Fields of the reference `.npz` config that describe the torch module but are not our
# constructor arguments. Those that would change the network are checked, the rest ignored.
_REFERENCE_ONLY_FIELDS = frozenset({
    "kind", "source", "constructor", "channels", "num_ws", "mapping_embed_features",
    "architecture", "num_fp16_res", "fused_modconv", "activation", "noise_mode", "batch",
    "dtype", "layout", "seeds", "perturbation", "inputs_note", "outputs",
})


def module_kwargs_from_config(kind: str, config: Mapping[str, Any]) -> Dict[str, Any]:
    """Our constructor kwargs for `kind` from a config dict.

    Accepts our own attribute names and the reference `.npz` `config` format (README.txt):
    its torch-only fields are validated (architecture, activation, channels, num_ws,
    mapping_embed_features) or ignored (provenance, num_fp16_res, ...). A null field that is
    one of our attributes is passed as None (conv_clamp None = no clamp, as in torch); a null
    field that is not ours means "does not apply to this kind". Unknown fields raise.
    """
    if kind not in MODULE_CLASSES:
        raise ValueError(f"unknown network kind {kind!r}; expected one of {sorted(MODULE_CLASSES)}")
    cls = MODULE_CLASSES[kind]
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    # Sub-networks of G accept G's fields (e.g. G_m's synthesis built from a G config).
    tolerated = set(_REFERENCE_ONLY_FIELDS)
    if kind in ("synthesis", "mapping"):
        tolerated |= {f.name for f in dataclasses.fields(Generator)}
    # Null fields that are not ours mean "does not apply to this kind" in the reference format.
    unknown = sorted(k for k in set(config) - fields - tolerated if config[k] is not None)
    if unknown:
        raise ValueError(f"config has unknown field(s) for {kind}: {unknown}; "
                         f"known: {sorted(fields)}")
    # A null field means "no value" in both formats (conv_clamp None = no clamp, cmap_dim None =
    # default width, ...); fields that do not apply to this kind are not our attributes.
    kwargs = {k: v for k, v in config.items() if k in fields}
    if "resample_filter" in kwargs:
        kwargs["resample_filter"] = tuple(int(t) for t in kwargs["resample_filter"])
    if "compute_dtype" in kwargs:
        kwargs["compute_dtype"] = jnp.dtype(kwargs["compute_dtype"])

    expected_arch = {"generator": "skip", "synthesis": "skip", "discriminator": "resnet"}
    arch = config.get("architecture")
    if arch is not None and kind in expected_arch and arch != expected_arch[kind]:
        raise ValueError(f"architecture {arch!r} is not supported for {kind} "
                         f"(only {expected_arch[kind]!r})")
    if config.get("activation") not in (None, "lrelu"):
        raise ValueError(f"activation {config['activation']!r} is not supported (only 'lrelu')")

    module = cls(**kwargs)
    _validate_against_reference(kind, module, config)
    return kwargs


def _validate_against_reference(kind: str, module: nn.Module, config: Mapping[str, Any]) -> None:
    """Checks the reference's derived fields (channels, num_ws, embed width) against ours."""
    channels = config.get("channels")
    if channels and kind in ("generator", "synthesis", "discriminator"):
        ours = {int(r): channels_at(int(r), module.channel_base, module.channel_max)
                for r in channels}
        theirs = {int(r): int(v) for r, v in channels.items()}
        if ours != theirs:
            raise ValueError(f"config 'channels' {theirs} disagree with channel_base/max {ours}")
    if config.get("num_ws") is not None and kind in ("generator", "synthesis"):
        if int(config["num_ws"]) != synthesis_num_ws(module.img_resolution):
            raise ValueError(f"config num_ws={config['num_ws']} but img_resolution="
                             f"{module.img_resolution} gives {synthesis_num_ws(module.img_resolution)}")
    embed = config.get("mapping_embed_features")
    if embed is not None:
        width = module.effective_cmap_dim if kind == "discriminator" else module.w_dim
        if int(embed) != width:
            raise ValueError(f"mapping_embed_features={embed} is not supported (ours: {width})")


def build_module(kind: str, config: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """Our module of `kind` (generator | discriminator | synthesis | mapping) from a config."""
    return MODULE_CLASSES[kind](**module_kwargs_from_config(kind, config or {}))


def module_config(module: nn.Module) -> Dict[str, Any]:
    """JSON-able constructor kwargs of one of our modules (inverse of `build_module`)."""
    out = {}
    for f in dataclasses.fields(module):
        if f.name in ("parent", "name"):
            continue
        value = getattr(module, f.name)
        if f.name == "compute_dtype":
            value = jnp.dtype(value).name
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


# --------------------------------------------------------------------------------------------
# Files


def load_state_dict_file(path: str) -> Tuple[Dict[str, np.ndarray], Optional[Dict[str, Any]]]:
    """{torch name: array} and the optional `config` from a `.pt`/`.pth` (torch.save of a
    state dict) or an `.npz` (name -> array; keys without '.' are not weights and are dropped,
    a `config` JSON entry is returned)."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise errors.MissingInputError(f"state dict file not found: {p}")
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as data:
                config = json.loads(str(data["config"])) if "config" in data.files else None
                state = {k: np.asarray(data[k]) for k in data.files if "." in k}
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {p} as an .npz state dict: {e}") from e
        if not state:
            raise errors.InputError(f"{p} holds no state-dict entries (names with a '.')")
        return state, config
    try:
        import torch  # noqa: PLC0415 - optional dependency, only for .pt files
    except ImportError as e:
        raise errors.MissingDependencyError(f"reading {p} needs PyTorch (pip install torch); or save the state "
                          "dict as .npz") from e
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        # torch's own text suggests weights_only=False, which would run the file's pickled
        # code: not repeated here.
        raise errors.InputError(
            f"{p}: not a PyTorch state dict that torch.load(weights_only=True) can read "
            f"({type(e).__name__}). Save a plain state dict: "
            "torch.save(module.state_dict(), path)") from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(hasattr(v, "detach") for v in obj.values()):
        raise errors.InputError(f"{p} does not hold a state dict (name -> tensor); got "
                         f"{type(obj).__name__}. Save it with torch.save(module.state_dict(), path)")
    return {k: _to_numpy(v, k) for k, v in obj.items()}, None


def save_converted(directory: str, kind: str, module: nn.Module,
                   variables: Mapping[str, Any]) -> pathlib.Path:
    """Writes `directory/config.json` ({"kind", "module": kwargs}) and an orbax checkpoint of
    the variables in `directory/variables`. Returns the checkpoint path."""
    import orbax.checkpoint as ocp  # noqa: PLC0415 - heavy import, only when saving

    out = pathlib.Path(directory).absolute()
    out.mkdir(parents=True, exist_ok=True)
    atomic_files.write_text(out / "config.json", json.dumps(
        {"kind": kind, "module": module_config(module)}, indent=2) + "\n")
    ckpt_path = out / "variables"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(ckpt_path, jax.tree.map(np.asarray, dict(variables)), force=True)
    checkpointer.wait_until_finished()
    return ckpt_path


def load_converted(directory: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """(module, variables) from a directory written by `save_converted`."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    root = pathlib.Path(directory).absolute()
    config_path = root / "config.json"
    if not config_path.is_file():
        raise errors.MissingInputError(
            f"{config_path} not found: not a converted-network directory")
    try:
        meta = json.loads(config_path.read_text())
        module = build_module(meta["kind"], meta["module"])
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"corrupt {config_path}: {e}") from e
    target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_variables(module))
    checkpointer = ocp.StandardCheckpointer()
    variables = checkpointer.restore(root / "variables", target)
    return module, variables
