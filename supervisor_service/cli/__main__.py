import sys

from supervisor_service.cli.main import main

sys.exit(main())
