from buffyfs.cli import main

raise SystemExit(main())
