#!/usr/bin/env python3
"""client.py: send messages to the cluster and time them (see --help).

Also importable: ``from client import client_send_message``.
"""
import sys

from clusterkit.client import Client, ClientError, ClientResult, client_send_message  # noqa: F401
from clusterkit.client_cli import main

if __name__ == "__main__":
    sys.exit(main())
