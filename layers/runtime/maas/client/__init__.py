"""Python SDK for the maas HTTP API."""

from maas.client.client import Client, MaasClientError, build_infer_request

__all__ = ["Client", "MaasClientError", "build_infer_request"]
