"""`python models/train.py`: train PIUmr; the options are in `--help`, the code in models/training/."""

from models.errors import exit_on_input_error
from models.training.cli import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    exit_on_input_error(main, "train.py")
