"""`python -m failback_client`."""

import sys

from failback_client.cli import main

sys.exit(main())
