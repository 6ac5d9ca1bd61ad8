"""Python SDK for the maas HTTP API."""

from maas.client.client import Client, DeploymentFailed, MaasClientError, build_infer_request

__all__ = ["Client", "DeploymentFailed", "MaasClientError", "build_infer_request"]
