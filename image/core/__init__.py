"""Shared by every part: the one run(), build paths and digests, the error family."""
