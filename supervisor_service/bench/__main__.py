from supervisor_service.bench.runner import main

raise SystemExit(main())
