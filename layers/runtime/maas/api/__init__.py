"""The HTTP API (FastAPI): management routes and the Open Inference Protocol v2 data plane."""

from maas.api.app import create_app

__all__ = ["create_app"]
