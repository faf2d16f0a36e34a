from collectord.cli import main

raise SystemExit(main())
