"""Benchmarks: boot, publish, replication. May import anything."""
