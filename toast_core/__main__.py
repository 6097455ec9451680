"""`python -m toast_core <command> ...` — see toast_core/frontends/cli.py."""

import sys

from toast_core.frontends.cli import main

if __name__ == "__main__":
    sys.exit(main())
