"""Storage backends: ``maas.backends.local`` (files + SQLite) and ``maas.backends.aws`` (S3 + DynamoDB).

Both implement the ports in ``maas.ports``; services never import a backend directly."""
