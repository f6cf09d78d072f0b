"""Compare configurations of the serving stack, interleaved, on one machine.

    python -m benchmarks.ab --variant services.inception_v3.batches_in_flight=1 \\
        --variant services.inception_v3.batches_in_flight=2 --concurrency 8 --rounds 3

Each round starts the whole stack (``python -m inception_v3.launcher``) once per
variant, runs the same closed loop as ``benchmarks.bench`` against it and stops it;
the order of the variants alternates from round to round. On a machine whose speed
drifts from minute to minute, one run per variant says little; the ratios to the
first variant within each round are what this reports. A variant is one or more
space-separated ``KEY=VALUE`` configuration overrides ("" for the file as it is).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench import PROTOCOLS, LoadPoint, config_overrides, log, run_stack, stack_environment
from inception_v3.settings import PROJECT_ROOT, write_config_on_free_ports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True, help='"KEY=VALUE ..." (at least two)')
    parser.add_argument("--protocol", default="http", choices=PROTOCOLS)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of each timed window")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if len(args.variant) < 2:
        parser.error("give at least two --variant")
    work = Path(tempfile.mkdtemp(prefix="inception-v3-ab-"))
    config = work / "configuration.yaml"  # rewritten for every run
    env = stack_environment(work, config)
    point = LoadPoint(args.protocol, args.concurrency, args.duration)
    results: dict[str, list[dict[str, Any]]] = {variant: [] for variant in args.variant}
    try:
        write_config_on_free_ports(config)  # BentoML reads BENTOML_CONFIG when save_model imports it
        subprocess.run(
            [sys.executable, "save_model.py", "--random-weights", "--seed", "7"],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=subprocess.DEVNULL,
            check=True,
        )
        for round_number in range(args.rounds):
            order = args.variant if round_number % 2 == 0 else args.variant[::-1]
            for variant in order:
                log(f"round {round_number + 1}/{args.rounds}: {variant or '(as configured)'}")
                write_config_on_free_ports(config, config_overrides(variant.split()))
                (figures,) = run_stack(env, work, [point])["points"]
                results[variant].append(figures)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first = args.variant[0]
    print(f"\n{args.protocol} at concurrency {args.concurrency}, {args.rounds} rounds of {args.duration:.0f} s")
    print(f"{'variant':<52}{'images/s':>10}{'p50 ms':>9}  ratio to the first, per round")
    for variant, rows in results.items():
        ratios = [row["images_per_s"] / base["images_per_s"] for row, base in zip(rows, results[first], strict=True)]
        print(
            f"{variant or '(as configured)':<52}{statistics.fmean(r['images_per_s'] for r in rows):>10.2f}"
            f"{statistics.fmean(r['p50_ms'] for r in rows):>9.0f}  "
            + " ".join(f"{ratio:.3f}" for ratio in ratios)
            + f"  (mean {statistics.fmean(ratios):.3f})"
        )
    output = PROJECT_ROOT / "benchmarks" / "results" / f"ab-{time.strftime('%Y%m%d-%H%M%S')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"point": point.__dict__, "results": results}, indent=2))
    log(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
