from slm_export.cli.train import main

raise SystemExit(main())
