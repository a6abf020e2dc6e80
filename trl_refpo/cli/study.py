"""``trl-refpo study``: a seeded comparison of arms (see :mod:`trl_refpo.cli.study_runner`).

::

    trl-refpo study CONFIG.yaml --output_dir DIR [--jobs N] [--debug]   # train + evaluate every pending run
    trl-refpo study report DIR [--debug]                                # DIR/summary.md and DIR/figures/

Mistakes in the study file (an unknown key or loss type in an arm, duplicate arm names, seeds the baseline lacks)
print one line naming the arm and exit with status 2 before anything trains; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


PROG = "trl-refpo study"
USAGE = f"""usage: {PROG} CONFIG.yaml --output_dir DIR [--jobs N] [--debug]
       {PROG} report DIR [--debug]"""


def main(argv: list[str], debug_env: str = "TRL_REFPO_DEBUG") -> int:
    from .study_runner import StudyError, load_study, run_study, write_report

    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__.split("::")[0].strip())
        return 0 if argv else 2
    parser = argparse.ArgumentParser(prog=PROG, add_help=False)
    parser.add_argument("target")
    parser.add_argument("directory", nargs="?")
    parser.add_argument("--output_dir")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--debug", action="store_true")
    args, unknown = parser.parse_known_args(argv)
    debug = args.debug or bool(os.environ.get(debug_env))
    try:
        if unknown:
            raise StudyError(f"unknown argument(s) {unknown}.\n{USAGE}")
        if args.target == "report":
            if args.directory is None or args.output_dir is not None:
                raise StudyError(f"`report` takes the study's output folder: {PROG} report DIR.")
            summary = write_report(load_study(_study_copy(args.directory)), args.directory)
            print(f"[{PROG}] wrote {summary}")
            return 0
        if args.directory is not None or not args.output_dir:
            raise StudyError(f"give one study file and --output_dir: {USAGE.splitlines()[0][7:]}")
        if args.jobs < 1:
            raise StudyError(f"--jobs must be >= 1, got {args.jobs}.")
        study = load_study(args.target)
        if args.jobs > 1:
            study = args.target
        run_study(study, args.output_dir, jobs=args.jobs)
    except (StudyError, OSError, ImportError) as error:
        if debug:
            raise
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    write_report(load_study(_study_copy(args.output_dir)), args.output_dir)
    print(f"[{PROG}] finished; {Path(args.output_dir) / 'summary.md'} written")
    return 0


def _study_copy(directory) -> Path:
    from .study_runner import STUDY_COPY, StudyError

    path = Path(directory) / STUDY_COPY
    if not path.is_file():
        raise StudyError(f"{str(directory)!r} has no {STUDY_COPY}: it is not a study's output folder.")
    return path
