"""``python -m broadcast.client``: the same as the ``broadcast-cli`` script."""

from broadcast.client.command import main

raise SystemExit(main())
