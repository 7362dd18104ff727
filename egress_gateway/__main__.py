"""`python -m egress_gateway` = the `egress-gateway` command."""

import sys

from egress_gateway.cli import main

sys.exit(main())
