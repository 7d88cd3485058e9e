import sys

from blob2gpu.cli import main

sys.exit(main())
