"""clusterkit: build, load-balance and stress-test small TCP and HTTP server clusters.

The package holds all the code; the scripts at the top of the repository
(``server1.py``, ``Load_Balancer.py``, ``client.py``,
``ClientServer_StressTools.py``, ``http_servers/*.py``) only parse arguments
and call in here.
"""

__version__ = "0.1.0"
