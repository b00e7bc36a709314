"""``python -m unmix``: the ``unmix`` command (also ``torchrun ... -m unmix train ...``)."""

import sys

from unmix.cli import main

sys.exit(main())
