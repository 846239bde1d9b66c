"""`python -m supervisor_service.bench`: the scale benchmark (README "Performance")."""

from supervisor_service.bench.runner import main

raise SystemExit(main())
