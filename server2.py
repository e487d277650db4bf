#!/usr/bin/env python3
"""server2: echo server of the TCP cluster on port 7002 (see --help)."""
import sys

from clusterkit.server import main

if __name__ == "__main__":
    sys.exit(main(name="server2", port=7002))
