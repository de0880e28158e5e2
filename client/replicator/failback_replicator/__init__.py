"""Failback replication software: the LiveCD end of the open failback replication protocol.

See PROTOCOL.md next to this package. The engine (`engine.Replicator`) talks to the agent on the
recovery instance and reports through the small interfaces in `interfaces`.
"""

__version__ = "0.1.0"
PROTOCOL_VERSION = 2  # 2: negotiated block digest (BLAKE3 or SHA-256)
PROTOCOL_VERSIONS = (2, 1)  # spoken, newest first: version 1 (SHA-256 only) with a version-1 peer
