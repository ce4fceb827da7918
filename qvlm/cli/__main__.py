import sys

from qvlm.cli import main

sys.exit(main())
