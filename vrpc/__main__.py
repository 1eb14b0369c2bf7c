import sys

from vrpc.cli import main

sys.exit(main())
