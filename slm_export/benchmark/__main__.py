"""python -m slm_export.benchmark RESULTS_JSON [--summary | --comparisons] [--plot DIR];
python -m slm_export.benchmark --update PAGE.md."""

from __future__ import annotations

import sys
from pathlib import Path

from slm_export.cli.common import ArgumentParser, entry_point
from slm_export.errors import SlmError


@entry_point
def main(argv=None) -> int:
    from slm_export.benchmark import report
    from slm_export.benchmark.results import load_results

    parser = ArgumentParser(prog="python -m slm_export.benchmark", description=__doc__)
    parser.add_argument("results", nargs="?", type=Path, help="a results file to print or draw")
    table = parser.add_mutually_exclusive_group()
    table.add_argument("--summary", action="store_true", help="one row per backend and variant")
    table.add_argument("--comparisons", action="store_true", help="every paired comparison")
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write the results' charts (PNG) here")
    parser.add_argument("--update", type=Path, metavar="PAGE.md",
                        help="rewrite the generated <!-- table: FILE --> blocks of PAGE.md")
    args = parser.parse_args(argv)
    if args.update:
        try:
            args.update.write_text(report.regenerate(args.update.read_text()))
        except (OSError, ValueError) as e:
            raise SlmError(f"cannot update {args.update}: {e}") from None
        return 0
    if args.results is None:
        parser.error("give a results file or --update PAGE.md")
    try:
        doc = load_results(args.results)
    except (OSError, ValueError) as e:
        raise SlmError(f"{args.results}: not a results file of this version ({e})") from None
    if args.plot:
        from slm_export.benchmark import plots

        for path in plots.draw(doc, args.plot):
            print(f"wrote {path}")
        return 0
    name = "summary" if args.summary else "comparisons" if args.comparisons else "results"
    sys.stdout.write(report.TABLES[name](doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
