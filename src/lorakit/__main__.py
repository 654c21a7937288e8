"""``python -m lorakit`` (and ``torchrun -m lorakit train ...``) run the ``lorakit`` command."""

import sys

from lorakit.cli import main

if __name__ == "__main__":
    sys.exit(main())
