#!/usr/bin/env python3
"""server3: echo server of the TCP cluster on port 7003 (see --help)."""
import sys

from clusterkit.server import main

if __name__ == "__main__":
    sys.exit(main(name="server3", port=7003))
