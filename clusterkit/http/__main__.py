import sys

from .up import main

sys.exit(main())
