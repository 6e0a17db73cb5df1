"""``python -m robustsparse.cli`` (what ``torchrun ... -m robustsparse.cli train ...`` runs on every rank)."""
import sys

from .main import main

sys.exit(main())
