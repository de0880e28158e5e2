"""A local DRS-compatible control plane: the public failback operations plus the failback client's own,
checked against botocore's drs model + ours, SigV4-authenticated, state in SQLite. Tests and demos only."""

__version__ = "0.1.0"
