"""``python -m vcemri`` is the same program as ``vcemri``."""

import sys

from .cli import main

sys.exit(main())
