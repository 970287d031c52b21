import sys

from autosqueeze.cli import main

sys.exit(main())
