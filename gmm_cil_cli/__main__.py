"""`python -m gmm_cil_cli` = `gmm-cil`."""
import sys

from gmm_cil_cli import main

sys.exit(main())
