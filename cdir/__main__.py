import sys

from cdir.cli import main

sys.exit(main())
