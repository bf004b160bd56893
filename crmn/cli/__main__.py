"""``python -m crmn.cli``: what ``run_experiments.sh`` runs."""
import sys

from crmn.cli import main

sys.exit(main())
