import sys

from phisum.cli import main

sys.exit(main())
