from slm_export.serve.cli import main

raise SystemExit(main())
