"""``python -m spotstart``: the same as the ``spotstart`` command."""

from spotstart.cli.main import main

raise SystemExit(main())
