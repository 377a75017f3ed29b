"""`python -m peftcore ...` runs the same command line as the `peftcore` script."""
import sys

from peftcore.cli import main

sys.exit(main())
