"""clusterkit: build, load-balance and stress-test small TCP and HTTP server clusters.

The package holds all the code; the scripts at the top of the repository
(``server1.py``, ``Load_Balancer.py``, ``client.py``,
``ClientServer_StressTools.py``, ``http_servers/*.py``) only parse arguments
and call in here.
"""

import sys

__version__ = "0.1.0"

DEPENDENCIES = {"uvloop": "uvloop", "httptools": "httptools", "hdrh": "hdrhistogram", "rich": "rich",
                "prometheus_client": "prometheus_client"}
"""The packages pyproject.toml asks for, by the name they are imported as."""


def _missing_dependency(kind, exc, tb) -> None:
    """A script started with a Python that lacks the project's packages (outside
    ``.venv``) says so in one line, where it ended in a traceback. The process
    still exits 1. Any other uncaught error goes to Python's own hook."""
    name = getattr(exc, "name", None) or ""
    if issubclass(kind, ModuleNotFoundError) and name.split(".")[0] in DEPENDENCIES:
        print(f"error: the Python package {DEPENDENCIES[name.split('.')[0]]} is not installed for {sys.executable}: "
              f"run inside the project's virtual environment (. .venv/bin/activate, or .venv/bin/python; "
              f"`make demo` creates it)", file=sys.stderr)
        return
    sys.__excepthook__(kind, exc, tb)


if sys.excepthook is sys.__excepthook__:  # (one set by the caller, pytest's say, stays)
    sys.excepthook = _missing_dependency
