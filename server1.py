#!/usr/bin/env python3
"""server1: echo server of the TCP cluster on port 7001 (see --help)."""
import sys

from clusterkit.server import main

if __name__ == "__main__":
    sys.exit(main(name="server1", port=7001))
