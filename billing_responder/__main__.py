"""`python -m billing_responder` is the same as the `billing-responder` command."""

import sys

from billing_responder.cli import main

sys.exit(main())
