"""The HTTP side: one core (httptools parsing, limits, static files), an async
server, a thread-per-connection server, and a round-robin reverse proxy.
``python -m clusterkit.http up`` starts the whole set-up."""
