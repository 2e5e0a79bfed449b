from servemesh.cli import main

raise SystemExit(main())
