"""`python -m supervisor_service.cli`: the same command as `supervisor-service`."""

import sys

from supervisor_service.cli.main import main

sys.exit(main())
