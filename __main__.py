"""`python -m capfleet ...` is the `capfleet` command."""

import sys

from capfleet.jobs.cli import main

sys.exit(main())
