"""``python -m dataspace_client.cli``: the ``dataspace`` command."""

import sys

from . import main

sys.exit(main())
