"""`python models/evaluate.py CHECKPOINT`: evaluate a trained PIUmr; the options are in
`--help`, the code in models/evaluation/."""

from models.errors import exit_on_input_error
from models.evaluation.cli import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    exit_on_input_error(main, "evaluate.py")
