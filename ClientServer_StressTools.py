#!/usr/bin/env python3
"""ClientServer_StressTools.py: stress the TCP cluster or an HTTP server (see --help).

    python ClientServer_StressTools.py -n 1000 -c 10
"""
import sys

from clusterkit.stress.cli import main

if __name__ == "__main__":
    sys.exit(main())
