"""python -m trainer.optim.bench"""

import sys

from .cli import main

sys.exit(main())
