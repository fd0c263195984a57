from slm_export.cli.generate import main

raise SystemExit(main())
