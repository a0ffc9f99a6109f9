"""Gaussians ⇄ the standard 3D Gaussian splatting `.ply` layout (Kerbl et al. 2023).

The layout every common 3DGS viewer reads (SIBR, SuperSplat, antimatter15/splat, gsplat's
viewers): `format binary_little_endian 1.0`, one `vertex` element, float32 properties

    x y z            mean (world units)
    nx ny nz         normals (unused by 3DGS; written as 0)
    f_dc_0..2        SH degree-0 colour coefficients: f_dc = (colour − 0.5) / C0, C0 = 0.28209479…
    [f_rest_0..K-1]  higher SH coefficients, only with sh_degree > 0 (written as 0)
    opacity          logit(opacity)      (3DGS stores pre-sigmoid values)
    scale_0..2       log(scale)          (3DGS stores pre-exp values)
    rot_0..3         quaternion (w, x, y, z), not necessarily normalised

Header: exactly the reference `save_ply`'s (graphdeco-inria/gaussian-splatting, written by
plyfile): `ply`, `format binary_little_endian 1.0`, `element vertex N`, then one comment (what
plyfile writes as an element comment, right after the element line), the properties and
`end_header`, lines ended by '\n'. The vertex count must be on the third line: SIBR's
`loadPly` (the reference viewer) and the many loaders copied from it read line 3 as
"element vertex N" at fixed positions, skip to `end_header` and read N fixed-size records.
Some viewers (SIBR) are compiled for SH degree 3 and expect all 45 f_rest values: write with
sh_degree=3 for them.

Frame: positions, rotations and scales are in EG3D's world, where the heads are generated
and rendered: y up, the face looking towards +z (the subject's left at +x), the head around
the origin (FLAME × 2.68, nose tip near (0, 0, 0.2), crown to chin about 0.57 units). The
frontal camera (`rasterizer.types.look_at_eg3d_label(0, 0)`) sits on the +z axis, 2.7 from the
origin, looking at (0, 0, 0.2) along −z with image-up = +y and focal length 4.2647 × the image
size (a 13.4° field of view). Viewers made for COLMAP captures may take y as down (the head
shows upside down: turn it 180° about x) or start with the camera on −z (the back of the head
shows: turn it 180° about y).

`read_ply` accepts any property order, extra properties and f_rest
(ignored: higher SH bands are view-dependent colour that `rasterizer.Gaussians` does not hold).
Values are clipped before the transforms so the file stays finite: opacity to
[1e-6, 1 − 1e-6] (logit ±13.8), scales to ≥ float32's smallest normal number.
"""
from __future__ import annotations

import pathlib
from typing import Dict, List, Tuple

import numpy as np

from reta3d import atomic_files, errors

SH_C0 = 0.28209479177387814
OPACITY_EPS = 1e-6
_MIN_SCALE = float(np.finfo(np.float32).tiny)

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "<i2", "int16": "<i2",
    "ushort": "<u2", "uint16": "<u2", "int": "<i4", "int32": "<i4", "uint": "<u4", "uint32": "<u4",
    "float": "<f4", "float32": "<f4", "double": "<f8", "float64": "<f8",
}
REQUIRED_PROPERTIES = ("x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                       "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")


def property_names(sh_degree: int = 0) -> List[str]:
    """The 3DGS property order for a given SH degree (0..3)."""
    if not 0 <= int(sh_degree) <= 3:
        raise ValueError(f"sh_degree must be 0..3, got {sh_degree}")
    rest = 3 * ((int(sh_degree) + 1) ** 2 - 1)
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
            + [f"f_rest_{i}" for i in range(rest)]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def _unbatched(gaussians) -> Dict[str, np.ndarray]:
    fields = {name: np.asarray(getattr(gaussians, name), np.float64)
              for name in ("means", "scales", "quats", "opacities", "colors")}
    if fields["means"].ndim == 3:
        if fields["means"].shape[0] != 1:
            raise ValueError(f"write_ply writes one set of Gaussians; got a batch of "
                             f"{fields['means'].shape[0]} (index one, e.g. gaussians[0])")
        fields = {k: v[0] for k, v in fields.items()}
    num = fields["means"].shape[0] if fields["means"].ndim == 2 else -1
    expected = {"means": (num, 3), "scales": (num, 3), "quats": (num, 4), "opacities": (num,),
                "colors": (num, 3)}
    for name, shape in expected.items():
        if fields[name].shape != shape or num < 0:
            raise ValueError(f"write_ply: gaussians.{name} must have shape "
                             f"{('N',) + shape[1:]} (RGB colours for SH degree 0), got "
                             f"{fields[name].shape}")
        if not np.all(np.isfinite(fields[name])):
            raise ValueError(f"write_ply: gaussians.{name} has non-finite values (NaN/inf)")
    return fields


HEADER_COMMENT = ("RETA3D Gaussians, 3DGS layout, SH degree {sh_degree}; frame: EG3D world, "
                  "y up, face towards +z")


def header_lines(num: int, sh_degree: int = 0) -> List[str]:
    """The header lines of a file of `num` Gaussians, without line ends: `ply`, the format,
    `element vertex N` on line 3 (where SIBR-style loaders read the count), one comment (as
    plyfile places an element comment), the `property float` lines, `end_header`."""
    return (["ply", "format binary_little_endian 1.0", f"element vertex {int(num)}",
             "comment " + HEADER_COMMENT.format(sh_degree=int(sh_degree))]
            + [f"property float {n}" for n in property_names(sh_degree)] + ["end_header"])


def check_output_suffix(path, what: str = "PLY output") -> pathlib.Path:
    """`path` as a Path; raises `errors.InputError` (naming `what`, e.g. a flag) unless it ends in
    .ply, the suffix 3DGS viewers open. Scripts call it before any work, `write_ply` again."""
    path = pathlib.Path(path)
    if path.suffix.lower() != ".ply":
        raise errors.InputError(f"{what} must end in .ply, got {path}")
    return path


def write_ply(path, gaussians, sh_degree: int = 0) -> pathlib.Path:
    """Writes `gaussians` (rasterizer.Gaussians, (N, ·) or (1, N, ·), colours (N, 3) in [0, 1]
    RGB, in the EG3D world frame) to `path` (a .ply; else `errors.InputError`) in the 3DGS
    layout and header of the module docstring: float32 little-endian records of
    `property_names(sh_degree)`. Returns the path."""
    check_output_suffix(path)
    fields = _unbatched(gaussians)
    names = property_names(sh_degree)
    num = fields["means"].shape[0]
    opacity = np.clip(fields["opacities"], OPACITY_EPS, 1.0 - OPACITY_EPS)
    columns = {
        "x": fields["means"][:, 0], "y": fields["means"][:, 1], "z": fields["means"][:, 2],
        "f_dc_0": (fields["colors"][:, 0] - 0.5) / SH_C0,
        "f_dc_1": (fields["colors"][:, 1] - 0.5) / SH_C0,
        "f_dc_2": (fields["colors"][:, 2] - 0.5) / SH_C0,
        "opacity": np.log(opacity) - np.log1p(-opacity),
    }
    log_scales = np.log(np.maximum(fields["scales"], _MIN_SCALE))
    for i in range(3):
        columns[f"scale_{i}"] = log_scales[:, i]
    for i in range(4):
        columns[f"rot_{i}"] = fields["quats"][:, i]
    record = np.zeros(num, dtype=[(n, "<f4") for n in names])  # normals and f_rest stay 0
    for name, values in columns.items():
        record[name] = values
    header = "\n".join(header_lines(num, sh_degree)) + "\n"
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_files.write_bytes(path, header.encode("ascii") + record.tobytes())


def _parse_header(data: bytes, path) -> Tuple[int, np.dtype, int]:
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise errors.InputError(f"{path}: not a PLY file (missing 'ply' magic or 'end_header')")
    newline = data.find(b"\n", end)
    if newline < 0:
        raise errors.InputError(f"{path}: truncated PLY header")
    lines = data[:end].decode("ascii", errors="replace").splitlines()
    fmt, count, props, element, seen_vertex = None, None, [], None, False
    for line in lines[1:]:
        tokens = line.split()
        if not tokens or tokens[0] in ("comment", "obj_info"):
            continue
        if tokens[0] == "format":
            fmt = tokens[1] if len(tokens) > 1 else None
        elif tokens[0] == "element":
            element = tokens[1]
            if element == "vertex":
                if seen_vertex:
                    raise errors.InputError(f"{path}: more than one 'vertex' element")
                seen_vertex, count = True, int(tokens[2])
            elif not seen_vertex:
                raise errors.InputError(f"{path}: element '{element}' before 'vertex' is not supported")
        elif tokens[0] == "property" and element == "vertex":
            if tokens[1] == "list":
                raise errors.InputError(f"{path}: list properties in 'vertex' are not 3DGS Gaussians")
            if tokens[1] not in _PLY_TYPES:
                raise errors.InputError(f"{path}: unknown PLY property type '{tokens[1]}'")
            props.append((tokens[2], _PLY_TYPES[tokens[1]]))
    if fmt != "binary_little_endian":
        raise errors.InputError(f"{path}: PLY format '{fmt}' is not supported (3DGS files are "
                         "binary_little_endian)")
    if count is None:
        raise errors.InputError(f"{path}: no 'element vertex' in the header")
    missing = [n for n in REQUIRED_PROPERTIES if n not in {p for p, _ in props}]
    if missing:
        raise errors.InputError(f"{path}: missing 3DGS properties {missing}")
    return count, np.dtype(props), newline + 1


def read_ply(path):
    """Reads a 3DGS `.ply` → rasterizer.Gaussians with (N, ·) float32 fields: means, scales =
    exp(scale_i), quats = rot_0..3 (w, x, y, z; as stored), opacities = sigmoid(opacity),
    colors = f_dc·C0 + 0.5 (N, 3). Raises FileNotFoundError / ValueError naming the file."""
    from rasterizer import Gaussians
    path = pathlib.Path(path)
    if not path.is_file():
        raise errors.MissingInputError(f"PLY file not found: {path}")
    data = path.read_bytes()
    count, dtype, offset = _parse_header(data, path)
    expected = count * dtype.itemsize
    if len(data) - offset < expected:
        raise errors.InputError(f"{path}: truncated: the header announces {count} Gaussians "
                         f"({expected} bytes) but only {len(data) - offset} bytes follow")
    record = np.frombuffer(data, dtype=dtype, count=count, offset=offset)

    def col(name):
        return record[name].astype(np.float64)

    means = np.stack([col("x"), col("y"), col("z")], -1)
    colors = np.stack([col(f"f_dc_{i}") * SH_C0 + 0.5 for i in range(3)], -1)
    opacities = 1.0 / (1.0 + np.exp(-col("opacity")))
    scales = np.exp(np.stack([col(f"scale_{i}") for i in range(3)], -1))
    quats = np.stack([col(f"rot_{i}") for i in range(4)], -1)
    for name, value in (("means", means), ("colors", colors), ("scales", scales), ("quats", quats)):
        if not np.all(np.isfinite(value)):
            raise errors.InputError(f"{path}: non-finite values in {name}")
    return Gaussians(means=means.astype(np.float32), scales=scales.astype(np.float32),
                     quats=quats.astype(np.float32), opacities=opacities.astype(np.float32),
                     colors=colors.astype(np.float32))
