"""Convert a PyTorch StyleGAN2-ADA / EG3D state dict to our Flax variables (orbax checkpoint).

  python experiments/convert_pytorch.py --input=G.pt --kind=generator --output=/tmp/G_flax \
      [--config='{"img_resolution": 256, ...}' | --config=cfg.json] [--img_resolution=256 ...]

Input: a state dict saved with `torch.save(module.state_dict(), path)` (names/layouts as in
/work/shared/pytorch/g_uv256.txt, d512.txt), or an `.npz` of name -> array (an `.npz` with a
`config` entry, like the reference files, also provides the constructor arguments).
Constructor arguments, lowest to highest priority: our module defaults (the paper's UV
generator 256²x14 / the 512² discriminator), the `.npz` config, --config, individual flags.
--kind=synthesis / mapping convert one part of a generator state dict (e.g. the 64² mouth
generator G_m); --prefix selects the torch name prefix (default: "synthesis." / "mapping."
for those kinds when the file holds a full generator).

Output: DIR/config.json ({"kind", "module": constructor kwargs}) and an orbax
StandardCheckpointer checkpoint DIR/variables ({"params", "buffers", "mapping_state"});
reload with `reta3d.networks.convert.load_converted(DIR)`. Unknown or missing keys, wrong shapes
or NaNs: an error listing every offending key.
"""
from __future__ import annotations

import json
import pathlib
import sys
from typing import Any, Dict, Optional

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402
from reta3d import cli  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """Defined only when run as a program: importing this file for its functions (tests)
    must not register flags in absl's global registry, where another script may hold the
    same names."""
    flags.DEFINE_string("input", None, "state dict file: .pt/.pth (torch.save) or .npz")
    flags.DEFINE_enum("kind", "generator", ["generator", "discriminator", "synthesis", "mapping"],
                      "which network the state dict holds")
    flags.DEFINE_string("output", None, "output directory (created; an existing checkpoint is replaced)")
    flags.DEFINE_string("config", None, "constructor arguments: a JSON object, or a path to a .json file")
    flags.DEFINE_string("prefix", None, "torch name prefix of the network inside the state dict")
    # Individual constructor overrides (None = keep the config / default value).
    flags.DEFINE_integer("z_dim", None, "latent size")
    flags.DEFINE_integer("c_dim", None, "conditioning label size (25 = EG3D camera, 0 = none)")
    flags.DEFINE_integer("w_dim", None, "intermediate latent size")
    flags.DEFINE_integer("img_resolution", None, "output (G) / input (D) resolution")
    flags.DEFINE_integer("img_channels", None, "output (G: 14 UV features) / input (D: 3) channels")
    flags.DEFINE_integer("channel_base", None, "channels(R) = min(channel_base // R, channel_max)")
    flags.DEFINE_integer("channel_max", None, "maximum channels per layer")
    flags.DEFINE_integer("mapping_layers", None, "number of mapping FC layers")
    flags.DEFINE_float("conv_clamp", None, "activation clamp (omit for the config value; <0 = none)")
    flags.DEFINE_integer("cmap_dim", None, "D: conditioning projection width")
    flags.DEFINE_integer("mbstd_group_size", None, "D: minibatch-std group size")
    flags.DEFINE_integer("mbstd_num_channels", None, "D: minibatch-std channels")


_OVERRIDE_FLAGS = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "channel_base",
                   "channel_max", "mapping_layers", "conv_clamp", "cmap_dim", "mbstd_group_size",
                   "mbstd_num_channels")
_KIND_OF_REFERENCE = {"generator": ("generator", "synthesis", "mapping"),
                      "discriminator": ("discriminator",)}


def _read_config_arg(text: Optional[str]) -> Dict[str, Any]:
    if not text:
        return {}
    path = pathlib.Path(text)
    source = "--config"
    if not text.lstrip().startswith("{"):
        if not path.is_file():
            raise FileNotFoundError(f"--config: neither a JSON object nor an existing file: {text}")
        source, text = str(path), path.read_text()
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: invalid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
    return config


def convert_file(input_path: str, kind: str, output_dir: str,
                 config: Optional[Dict[str, Any]] = None,
                 overrides: Optional[Dict[str, Any]] = None,
                 prefix: Optional[str] = None) -> pathlib.Path:
    """Converts `input_path` and saves it under `output_dir`; returns the checkpoint path."""
    from reta3d.networks import convert  # noqa: PLC0415 - keeps --help fast

    state_dict, file_config = convert.load_state_dict_file(input_path)
    merged: Dict[str, Any] = {}
    if file_config:
        file_kind = file_config.get("kind")
        if file_kind and kind not in _KIND_OF_REFERENCE.get(file_kind, (file_kind,)):
            raise ValueError(f"{input_path} holds a {file_kind} (its config), not a {kind}")
        merged.update(file_config)
        if kind in ("synthesis", "mapping"):
            merged.pop("kind", None)
    merged.update(config or {})
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if kind == "mapping":
        merged = _mapping_kwargs(merged)

    if prefix is None:
        prefix = ""
        if kind in ("synthesis", "mapping") and any(k.startswith(kind + ".") for k in state_dict):
            prefix = kind + "."
    module = convert.build_module(kind, merged)
    variables = convert.torch_to_flax(state_dict, module, prefix=prefix,
                                      resample_filter=module.resample_filter
                                      if hasattr(module, "resample_filter") else (1, 3, 3, 1),
                                      source=str(input_path))
    return convert.save_converted(output_dir, kind, module, variables)


def _mapping_kwargs(config: Dict[str, Any]) -> Dict[str, Any]:
    """Generator-style fields -> MappingNetwork kwargs (num_ws from img_resolution)."""
    from reta3d.networks.stylegan2 import synthesis_num_ws  # noqa: PLC0415

    out = {k: v for k, v in config.items()
           if k in ("z_dim", "c_dim", "w_dim", "num_ws", "num_layers", "lr_multiplier",
                    "w_avg_beta", "embed_features", "layer_features", "activation")}
    if "mapping_layers" in config:
        out["num_layers"] = config["mapping_layers"]
    if "mapping_lr_multiplier" in config:
        out["lr_multiplier"] = config["mapping_lr_multiplier"]
    if out.get("num_ws") is None:
        out["num_ws"] = synthesis_num_ws(int(config.get("img_resolution", 256)))
    for key, default in (("z_dim", 512), ("c_dim", 25), ("w_dim", 512)):
        out.setdefault(key, default)
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.input or not FLAGS.output:
        raise app.UsageError("--input and --output are required")
    overrides = {name: getattr(FLAGS, name) for name in _OVERRIDE_FLAGS}
    config = _read_config_arg(FLAGS.config)
    if overrides["conv_clamp"] is not None and overrides["conv_clamp"] < 0:
        overrides["conv_clamp"] = None
        config["conv_clamp"] = None  # explicit "no clamp" beats the file's config
    path = convert_file(FLAGS.input, FLAGS.kind, FLAGS.output, config=config, overrides=overrides,
                        prefix=FLAGS.prefix)
    print(json.dumps({"input": FLAGS.input, "kind": FLAGS.kind, "checkpoint": str(path)}))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
