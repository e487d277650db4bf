"""The stress tool (ClientServer_StressTools.py): many concurrent clients
against the TCP cluster or an HTTP server, every reply verified, timings in
HDR histograms, and a report with ApacheBench's columns."""
