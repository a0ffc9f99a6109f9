#!/usr/bin/env bash
# Downloads, on a machine that reaches the package index, the wheels that an OFFLINE Linux
# x86-64 CUDA machine still needs to run this project and experiments/gpu_suite.py when it has
# only jax[cuda], torch and triton (plus flax, optax, orbax-checkpoint, chex, numpy, scipy,
# pillow) preinstalled: jax-triton, ml_collections, grain, array-record, tensorflow-datasets,
# tensorboardX, imageio-ffmpeg, pytest and their dependencies, for CPython 3.12 and 3.11
# (manylinux x86-64), pinned to versions resolved together (2026-11-30). No jax, jaxlib,
# torch, triton, numpy or pyarrow in it: the folder stays small (about 48 MB, 29 of them the
# ffmpeg binary inside imageio-ffmpeg).
#
#   bash experiments/gpu_wheelhouse.sh DIR          # download (needs the index)
#   bash DIR/install.sh                             # on the GPU machine: offline install
#   bash experiments/gpu_wheelhouse.sh --print-pins # the pinned name==version list
#
# DIR/install.sh runs, with no network:
#   python3 -m pip install --no-index --find-links DIR -r DIR/requirements-offline.txt
#   python3 -m pip install --no-index --find-links DIR --no-deps tensorflow-datasets==4.9.10
# tensorflow-datasets goes in without its dependency pyarrow (40 MB per Python version): it is
# imported lazily, for parquet files only, which this project never reads. Its other
# dependencies are listed in requirements-offline.txt.
# Environment: PIP (default "python3 -m pip"), GPU_WHEELHOUSE_PYTHONS (default "3.12 3.11").
set -euo pipefail

# The project's packages missing on such a machine (pinned exactly). imageio-ffmpeg 0.7.0,
# not 0.8.x: its wheel is 29 MB against 68 MB (ffmpeg 7.0 against a larger build) and it
# has the same write_frames API (reta3d/video.py).
TOP=(
  jax-triton==0.3.1 ml_collections==1.1.0 grain==0.2.18 array-record==0.8.6
  tensorflow-datasets==4.9.10 tensorboardX==2.6.5 imageio-ffmpeg==0.7.0 imageio==2.38.1
  absl-py==2.5.1 pytest==9.2.0
)
# Their dependencies (pip's resolution of TOP for cp312 and cp311 on 2026-11-30), less numpy,
# pillow (preinstalled with jax / scikit-image) and pyarrow (see above).
DEPS=(
  attrs==26.1.0 certifi==2026.10.19.post1 charset-normalizer==3.5.3 cloudpickle==3.1.3
  dm-tree==0.1.10 docstring_parser==0.18.0 einops==0.8.2 etils==1.15.0 fsspec==2026.9.0
  googleapis-common-protos==1.76.0 idna==3.20 immutabledict==4.3.1 iniconfig==2.3.1
  packaging==26.4 pluggy==1.7.0 portpicker==1.6.0 protobuf==7.36.2 psutil==7.2.2
  Pygments==2.21.0 PyYAML==6.0.4 requests==2.34.2 simple-parsing==0.1.9 six==1.17.0
  tensorflow-metadata==1.21.0 termcolor==3.3.0 toml==0.10.2 tqdm==4.70.1
  typing_extensions==4.16.0 urllib3==2.8.0 wrapt==2.5.2 zipp==4.1.2
)
# Published as a source archive only: built here into a pure-Python wheel.
SDIST_ONLY=(promise==2.3)

if [[ "${1:-}" == "--print-pins" ]]; then
  printf '%s\n' "${TOP[@]}" "${DEPS[@]}" "${SDIST_ONLY[@]}"
  exit 0
fi
if [[ $# -ne 1 || "$1" == -* ]]; then
  sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi

DIR="$1"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
read -r -a PIP <<< "${PIP:-python3 -m pip}"
PYTHONS="${GPU_WHEELHOUSE_PYTHONS:-3.12 3.11}"
# Newest first; pip takes any wheel whose tag is in this list.
PLATFORMS=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 \
         manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1 linux; do
  PLATFORMS+=(--platform "${p}_x86_64")
done

for py in $PYTHONS; do
  abi="cp${py/./}"
  echo "== wheels for CPython $py ($abi, manylinux x86-64) -> $DIR"
  "${PIP[@]}" download --quiet --no-deps --only-binary=:all: --dest "$DIR" \
    --implementation cp --python-version "$py" --abi "$abi" --abi abi3 --abi none \
    "${PLATFORMS[@]}" "${TOP[@]}" "${DEPS[@]}"
done
echo "== building pure-Python wheels of ${SDIST_ONLY[*]}"
"${PIP[@]}" wheel --quiet --no-deps --wheel-dir "$DIR" "${SDIST_ONLY[@]}"
if compgen -G "$DIR/*.tar.gz" > /dev/null || compgen -G "$DIR/*.zip" > /dev/null; then
  echo "error: $DIR holds source archives; every package must be a wheel" >&2
  exit 1
fi

cat > "$DIR/requirements-offline.txt" <<'EOF'
# Installed by install.sh with --no-index --find-links (this folder). Pinned: this project's
# packages; ranges: shared dependencies (a preinstalled version that fits is kept).
jax-triton==0.3.1
ml_collections==1.1.0
grain==0.2.18
array-record==0.8.6
tensorboardX==2.6.5
imageio-ffmpeg==0.7.0
imageio>=2.34,<3
absl-py>=2.1,<3
pytest>=8,<10
# tensorflow-datasets==4.9.10 goes in with --no-deps (its pyarrow is only imported for
# parquet files); its other dependencies:
dm-tree
etils[edc,enp,epath,epy,etree]>=1.9.1
immutabledict
promise
protobuf>=3.20
psutil
requests>=2.19.0
simple_parsing
tensorflow-metadata
termcolor
toml
tqdm
wrapt
EOF

cat > "$DIR/install.sh" <<'EOF'
#!/usr/bin/env bash
# Offline install of this wheelhouse (made by experiments/gpu_wheelhouse.sh) into the Python
# that PIP runs (default: python3 -m pip). No network is used.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
read -r -a PIP <<< "${PIP:-python3 -m pip}"
"${PIP[@]}" install --no-index --find-links "$here" -r "$here/requirements-offline.txt"
"${PIP[@]}" install --no-index --find-links "$here" --no-deps tensorflow-datasets==4.9.10
# The import check runs in the Python that PIP runs ("X -m pip" → X), unless PYTHON is set.
python="python3"
if [[ ${#PIP[@]} -ge 3 && "${PIP[1]}" == "-m" && "${PIP[2]}" == "pip" ]]; then python="${PIP[0]}"; fi
python="${PYTHON:-$python}"
"$python" - <<'PY'
import importlib
for name in ("ml_collections", "grain", "array_record", "tensorflow_datasets", "tensorboardX",
             "imageio_ffmpeg", "pytest", "jax_triton"):
    try:
        importlib.import_module(name)
        print(f"import {name}: ok")
    except Exception as error:  # report every package, then let the caller judge
        print(f"import {name}: FAILED ({type(error).__name__}: {error})")
PY
EOF
chmod +x "$DIR/install.sh"
(cd "$DIR" && sha256sum ./*.whl > SHA256SUMS)

count=$(find "$DIR" -maxdepth 1 -name '*.whl' | wc -l)
size=$(du -sm "$DIR" | cut -f1)
echo "== $count wheels, ${size} MB in $DIR"
for py in $PYTHONS; do
  abi="cp${py/./}"
  for pkg in grain array_record dm_tree wrapt pyyaml charset_normalizer; do
    if ! compgen -G "$DIR/${pkg}-*-${abi}-*.whl" > /dev/null; then
      echo "error: no $abi wheel of $pkg in $DIR" >&2
      exit 1
    fi
  done
done
if (( size >= 60 )); then
  echo "warning: the wheelhouse is ${size} MB (meant to stay well under 60 MB)" >&2
fi
echo "On the GPU machine (offline): bash $DIR/install.sh"
