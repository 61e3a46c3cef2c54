from batchpool.cli import main

raise SystemExit(main())
