#!/usr/bin/env python3
"""The HTTP load balancer on port 44444 over the four backends (see --help)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from clusterkit.http.cli import main_lb  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_lb())
