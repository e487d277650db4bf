#!/usr/bin/env python3
"""Load_Balancer.py: the TCP cluster's load balancer on port 7000 (see --help)."""
import sys

from clusterkit.balancer.cli import main

if __name__ == "__main__":
    sys.exit(main())
