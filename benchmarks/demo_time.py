"""Time `qvlm demo` end to end on this machine: --quick (model cache warm) and the full demo
including the first model conversion (a fresh QVLM_CACHE), against the issue's budgets
(quick: 3 minutes; full: 10 minutes). Prints a table and writes JSON.

    python benchmarks/demo_time.py                  # both
    python benchmarks/demo_time.py --only quick     # one of them
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qvlm.fileio import atomic_write_text  # noqa: E402

BUDGET_S = {"quick": 180, "full": 600}


def run(kind: str, workdir: Path) -> dict:
    out = workdir / f"demo-{kind}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if kind == "full":  # include the one-time GGUF -> safetensors conversion
        env["QVLM_CACHE"] = str(workdir / "cache")
    cmd = [sys.executable, "-m", "qvlm", "demo", "--out", str(out)] + (["--quick"] if kind == "quick" else [])
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    phases = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    summary = json.loads((out / "metrics.json").read_text())
    return {
        "command": " ".join(cmd[1:]),
        "seconds": seconds,
        "budget_s": BUDGET_S[kind],
        "within_budget": seconds <= BUDGET_S[kind],
        "phases": phases,
        "methods": summary["methods"],
        "validation": summary.get("validation"),  # the guided methods on validation prompts (training side)
        "shown": summary.get("shown"),  # the method the report shows, chosen on validation
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["quick", "full"], help="time one demo only")
    ap.add_argument("--json", default="benchmarks/results/demo_time.json", help="where to write results")
    ap.add_argument("--workdir", help="keep the demo outputs here (default: a temporary folder)")
    args = ap.parse_args()
    kinds = [args.only] if args.only else ["full", "quick"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        if (work / "cache").exists() or any((work / f"demo-{k}").exists() for k in kinds):
            raise SystemExit(f"{work} holds earlier runs; give an empty --workdir so every phase is timed")
        for kind in kinds:
            print(f"running the {kind} demo ...", flush=True)
            results[kind] = run(kind, work)
    machine = {
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
    }
    try:
        import torch
        import transformers

        machine.update(torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads())
    except ImportError:
        pass
    print(f"\nmachine: {machine}")
    print("| demo | seconds | budget | within | method shown (chosen on validation): eval reward | best_of_4 | base |")
    print("|---|---|---|---|---|---|---|")
    for kind, r in results.items():
        m, shown = r["methods"], r["shown"]["method"]
        print(
            f"| {kind} | {r['seconds']:.0f} | {r['budget_s']} | {'yes' if r['within_budget'] else 'NO'} | "
            f"{shown} {m[shown]['reward_mean']:.3f} | {m['best_of_4']['reward_mean']:.3f} | {m['base']['reward_mean']:.3f} |"
        )
    atomic_write_text(args.json, json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
