"""`python models/ablate.py`: the paper's ablation rows x seeds on any config; the options are in
`--help`, the code in models/evaluation/ablation.py."""

import sys

from models.evaluation.ablation import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
