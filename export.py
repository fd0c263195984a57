from slm_export.cli.export import main

raise SystemExit(main())
