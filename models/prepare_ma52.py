"""`python models/prepare_ma52.py --data-root MA52 --out COPY`: a fast-loading copy of MA-52;
the options are in `--help`, the code in models/data/prepare.py."""

from models.data.prepare import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
