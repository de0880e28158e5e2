"""Release: publishing to the regions' buckets, the replication assets, seed volumes, the container image.

May import image.core, image.stages and the client."""
