#!/usr/bin/env python3
"""One async HTTP backend: async_server.py PORT --name NAME (run four: 9002..9005) (see --help)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from clusterkit.http.cli import main_backend  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_backend())
