"""Table 1(c) from trained ablation runs: FID, AED, Dri FPS per row, the paper's beside.

  for row in baseline gm gm_gd; do
    python launch.py --config=configs/ablation.py:$row --workdir=runs/ablation_$row
    python experiments/evaluate.py --workdir=runs/ablation_$row --metrics=fid,aed,apd
    python experiments/benchmark.py --workdir=runs/ablation_$row --out=runs/ablation_$row/benchmark.json
  done
  python experiments/ablation_table.py --runs=runs/ablation_baseline,runs/ablation_gm,runs/ablation_gm_gd

Prints the Markdown table (and writes it to --out). A run without its metrics.json or
benchmark.json keeps empty cells and a note naming the command that writes them.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402
from reta3d import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("runs", None, "Training workdirs, one per row.")
flags.DEFINE_string("metrics_file", "eval/metrics.json", "evaluate.py's output inside each run.")
flags.DEFINE_string("benchmark_file", "benchmark.json", "benchmark.py's --out inside each run.")
flags.DEFINE_string("out", None, "Also write the table here (Markdown).")
flags.mark_flag_as_required("runs")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from reta3d.evaluation import ablation
    rows = [ablation.run_row(run, FLAGS.metrics_file, FLAGS.benchmark_file) for run in FLAGS.runs]
    table = ablation.markdown_table(rows)
    if FLAGS.out:
        from reta3d import atomic_files
        path = pathlib.Path(FLAGS.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_files.write_text(path, table)
    print(table, end="")


if __name__ == "__main__":
    cli.run(main)
