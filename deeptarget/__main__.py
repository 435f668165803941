import sys

from deeptarget.cli import main

sys.exit(main())
