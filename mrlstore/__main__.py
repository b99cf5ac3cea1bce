"""``python -m mrlstore``: the command line (mrlstore/integrations/cli.py)."""

from mrlstore.integrations.cli import main

if __name__ == "__main__":
    main()
