"""`python -m ksmpolicy`: the same as the `ksmpolicy` command."""

from __future__ import annotations

import sys

from ksmpolicy.cli.main import main

sys.exit(main())
