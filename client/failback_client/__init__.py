"""The failback client: runs on the LiveCD console and fails a recovery instance back."""

__version__ = "0.1.0"
