"""Where a test run spends its time compiling: sums the log that tests/conftest.py writes
under `RETA3D_TEST_COMPILE_LOG=FILE` (one JSON line per JAX compilation event in the test
processes; scripts the tests launch are not in it).

    RETA3D_TEST_COMPILE_LOG=/tmp/compiles.jsonl python -m pytest -n 2 tests
    python experiments/compile_profile.py /tmp/compiles.jsonl [--top 30]

Prints, as JSON: seconds per phase (tracing, lowering, XLA compilation) and the compilation
cache's hits and seconds saved; the tests by compilation seconds; the functions by
compilation seconds summed over the tests that compiled them.
"""
import argparse
import collections
import json
import pathlib

PHASES = {"/jax/core/compile/jaxpr_trace_duration": "trace",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
          "/jax/core/compile/backend_compile_duration": "compile"}


def summarize(path, top):
    records = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line]
    totals = collections.Counter()
    by_test = collections.defaultdict(collections.Counter)
    by_fun = collections.defaultdict(lambda: {"s": 0.0, "n": 0, "tests": set()})
    for r in records:
        phase = PHASES.get(r["event"])
        if phase is None:
            if r["event"] == "/jax/compilation_cache/compile_time_saved_sec":
                totals["cache_saved_s"] += r["s"]
                totals["cache_hits"] += 1
            continue
        totals[f"{phase}_s"] += r["s"]
        by_test[r["test"]][f"{phase}_s"] += r["s"]
        if phase == "compile":
            entry = by_fun[r["fun"]]
            entry["s"] += r["s"]
            entry["n"] += 1
            entry["tests"].add(r["test"])
    tests = sorted(by_test.items(), key=lambda kv: -kv[1]["compile_s"])[:top]
    funs = sorted(by_fun.items(), key=lambda kv: -kv[1]["s"])[:top]
    return {
        "totals": {k: round(v, 1) for k, v in totals.items()},
        "tests": [{"test": t, **{k: round(v, 1) for k, v in c.items()}} for t, c in tests],
        "functions": [{"fun": f, "compile_s": round(e["s"], 1), "compilations": e["n"],
                       "tests": len(e["tests"])} for f, e in funs],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    print(json.dumps(summarize(args.log, args.top), indent=1))


if __name__ == "__main__":
    main()
