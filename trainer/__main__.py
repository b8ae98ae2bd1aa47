"""`python -m trainer ...`: see trainer/cli.py."""

from .cli import main

raise SystemExit(main())
