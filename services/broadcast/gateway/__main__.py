from broadcast.gateway.command import main

raise SystemExit(main())
