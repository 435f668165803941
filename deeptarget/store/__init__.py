"""Everything a deployment keeps: the metadata store (SQLite or PostgreSQL), image blobs and versioned artefacts."""
