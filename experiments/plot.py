"""``python -m experiments.plot``: the accuracy/latency trade-off of a search study, as PNG and HTML.

The figures (:mod:`experiments.figures`) and the report are written automatically at the end of every search;
this CLI regenerates them from any storage.
"""
from __future__ import annotations

import sys
from pathlib import Path

from experiments.report import summarize_study, write_outputs
from quant.errors import ArgumentParser, cli_entry
from quant.study_store import RESULTS_DIR, existing_storage_url, open_study, reading


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m experiments.plot", description=__doc__.splitlines()[0])
    p.add_argument("--storage", default=None, help="optuna storage URL (default: $QUANT_SEARCH_STORAGE, else sqlite "
                   "in --results-dir); passwords belong in the environment variable, not on the command line")
    p.add_argument("--study-name", default="quant-search", help="the search's optuna study")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                   help="where the plots go (and study.db is read from without --storage)")
    args = p.parse_args(argv)
    url = existing_storage_url(args.storage, args.results_dir)
    with reading(url):
        study = open_study(url, args.study_name)
        summary = summarize_study(study)
        written = write_outputs(study, summary, args.results_dir)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
