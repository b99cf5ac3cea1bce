"""``python -m mrlstore``: the command line (mrlstore/cli.py)."""

from mrlstore.cli import main

if __name__ == "__main__":
    main()
