import sys

from tttlm.cli import main

sys.exit(main())
