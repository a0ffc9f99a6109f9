"""Compare this project against PyTorch references.

  python experiments/compare_pytorch.py stylegan2 --reference FILE.npz [--tolerance_scale X]
      our Flax StyleGAN2 vs a reference vector file from the official PyTorch code
      (format of ../shared/pytorch/sg2_*.npz); exit status 0: all match, 1: a mismatch,
      2: an unusable reference file or flag (as diff's 0/1/2).
  python experiments/compare_pytorch.py rasterizer [flags]
      our rasterizer vs gsplat (projection on CPU; full CUDA rasterization on a GPU).

`python experiments/compare_pytorch.py SUBCOMMAND --help` lists each subcommand's flags.
"""
import importlib
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

SUBCOMMANDS = {
    "stylegan2": "experiments._compare_stylegan2",
    "rasterizer": "experiments._compare_rasterizer",
}


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help") or argv[1] not in SUBCOMMANDS:
        print(__doc__)
        if len(argv) >= 2 and argv[1] not in ("-h", "--help", "help"):
            print(f"unknown subcommand {argv[1]!r}; choose one of {sorted(SUBCOMMANDS)}")
            return 2
        return 0
    module = importlib.import_module(SUBCOMMANDS[argv[1]])
    return module.main([f"{argv[0]} {argv[1]}"] + argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
