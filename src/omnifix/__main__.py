"""``python -m omnifix`` is the ``omnifix`` command."""

from omnifix._cli import main

raise SystemExit(main())
