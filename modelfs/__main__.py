from modelfs.cli import main

raise SystemExit(main())
