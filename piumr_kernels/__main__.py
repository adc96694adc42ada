"""`python -m piumr_kernels [--require BACKEND ...]`: compiles the C++ extension if needed,
prints `info()`, and fails naming the reason when a required backend cannot run."""

import argparse
import sys

import piumr_kernels
from piumr_kernels.backends import BACKENDS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m piumr_kernels", description=__doc__)
    parser.add_argument(
        "--require",
        action="append",
        choices=BACKENDS,
        default=[],
        help="exit with status 1 when this backend is unavailable (repeatable)",
    )
    args = parser.parse_args(argv)
    report = piumr_kernels.info()
    print(report)
    missing = [name for name in args.require if not report["backends"][name]["available"]]
    for name in missing:
        print(f"error: the {name} backend is required but {report['backends'][name]['reason']}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
