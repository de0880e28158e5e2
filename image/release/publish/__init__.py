"""`inv publish`: cli (the command), plan (which objects where), s3 (one region's writes), progress, regions."""
