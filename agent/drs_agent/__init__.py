"""Replication agent for tests and demos (never in the ISO): serves a recovery instance's volumes
to the failback replicator over the open protocol in client/replicator/PROTOCOL.md."""

__version__ = "0.1.0"
