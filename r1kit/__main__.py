"""`python -m r1kit VERB ...` (and `torchrun ... -m r1kit VERB ...`): the same entry point as the `r1kit` script."""
import sys

from r1kit.cli import main

sys.exit(main())
