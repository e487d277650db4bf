#!/usr/bin/env python3
"""The threaded HTTP server on port 46000 (see --help)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from clusterkit.http.cli import main_threaded  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_threaded())
