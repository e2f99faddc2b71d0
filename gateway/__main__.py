"""`python -m gateway` is the `responses-gateway` command."""

import sys

from gateway.cli import main

sys.exit(main())
