"""fer-bench: `fer-bench [key=value ...]`, e.g. `fer-bench output=bench-results/latest.json n_images=512`."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    """Parse key=value options, run the benchmark, print the table; exit 2 on a bad option."""
    from fer_lightning.bench import BenchConfigError, format_table, parse_overrides, run_bench, usage

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in args):
        print(usage())
        return 0
    try:
        cfg = parse_overrides(args)
    except BenchConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    # Lightning's info lines and advice (GPU available, tips, small epochs) would bury the bench's progress lines
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module=name)
    results = run_bench(cfg)
    print(format_table(results))
    print(f"wrote {cfg.output} and {Path(cfg.output).with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
