"""python -m rpofs.cli: what the mount and the tests start."""

import sys

from . import main

sys.exit(main())
