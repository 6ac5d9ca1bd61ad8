"""The public HTTPS front door: one REST API for management and inference.

REST (not HTTP API) because it gives per-stage throttling, binary media types (``*/*``: Triton's binary
tensor extension arrives with no Content-Type at all), execution and access logs, X-Ray, and a cached
TOKEN authorizer. Every route requires a live maas token (checked by the authorizer before any
function runs) except the two OIP health probes, which return no data."""

from __future__ import annotations

import json

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct

from infra.config import StageConfig, log_retention

# Every payload is binary to API Gateway: requests reach the functions base64-encoded whatever their
# Content-Type (tritonclient's binary tensors come with none), and an isBase64Encoded answer goes back
# as bytes whatever the caller's Accept (API Gateway matches only the first Accept value against this
# list, and tritonclient sends none). The functions decode and encode bodies themselves.
BINARY_MEDIA_TYPES = ["*/*"]
PUBLIC_ROUTES = ("/v2/health/live", "/v2/health/ready")
#: what a request may carry through API Gateway (10 MB) into a Lambda function's 6 MB event, where
#: every body arrives base64-encoded (4/3 of its size) beside the headers and request context
MAX_BODY_BYTES = 4_500_000
GATEWAY_PROBLEMS = (
    (apigw.ResponseType.UNAUTHORIZED, "401", "Unauthorized",
     "send a live maas token: Authorization: Bearer <token>"),
    (apigw.ResponseType.ACCESS_DENIED, "403", "Forbidden", "send a live maas token: Authorization: Bearer <token>"),
    (apigw.ResponseType.REQUEST_TOO_LARGE, "413", "Payload too large",
     "a request body may be about 4.5 MB here (API Gateway passes it base64-encoded inside Lambda's 6 MB "
     "event): send fewer rows per request, or the binary tensor extension instead of JSON; push models "
     "with `maas models push` (it uploads straight to storage)"),
    (apigw.ResponseType.INTEGRATION_TIMEOUT, "504", "Gateway timeout",
     "the model did not answer within API Gateway's 29 s integration timeout: send fewer rows per request, "
     "or deploy it to the sagemaker target"),
)
# The authorizer's own check of the header's shape: malformed headers get a 401 without an invocation.
TOKEN_HEADER_REGEX = r"^Bearer maas_[A-Za-z0-9_-]{32,}$"


class Api(Construct):
    """``rest_api``, ``stage``, ``authorizer``, ``access_logs``, ``url``, ``public_methods`` (the health
    probes, the only methods without the authorizer)."""

    def __init__(self, scope: Construct, construct_id: str, *, config: StageConfig,
                 management: lambda_.IFunction, inference: lambda_.IFunction,
                 authorizer_function: lambda_.IFunction,
                 image_inference: lambda_.IFunction | None = None, image_pool_path: str = "/image") -> None:
        super().__init__(scope, construct_id)
        self.access_logs = logs.LogGroup(
            self, "AccessLogs", retention=log_retention(config.log_retention_days),
            removal_policy=RemovalPolicy.RETAIN if config.retain_data else RemovalPolicy.DESTROY,
        )
        self.rest_api = apigw.RestApi(
            self, "RestApi",
            rest_api_name=f"maas-{config.name}",
            description="maas: model management and Open Inference Protocol v2 inference",
            binary_media_types=BINARY_MEDIA_TYPES,
            endpoint_types=[apigw.EndpointType.REGIONAL],
            # The account's API Gateway logging role is not a stage's to own (infra.account).
            cloud_watch_role=False,
            deploy_options=apigw.StageOptions(
                stage_name=config.name,
                throttling_rate_limit=config.throttle_rate_limit,
                throttling_burst_limit=config.throttle_burst_limit,
                access_log_destination=apigw.LogGroupLogDestination(self.access_logs),
                access_log_format=apigw.AccessLogFormat.json_with_standard_fields(
                    caller=False, http_method=True, ip=True, protocol=True, request_time=True,
                    resource_path=True, response_length=True, status=True, user=True,
                ),
                logging_level=apigw.MethodLoggingLevel.ERROR,
                data_trace_enabled=False,  # would log request bodies: tensors and tokens
                metrics_enabled=True,
                tracing_enabled=True,
            ),
        )
        self.stage = self.rest_api.deployment_stage
        self.authorizer = apigw.TokenAuthorizer(
            self, "TokenAuthorizer",
            handler=authorizer_function,
            identity_source=apigw.IdentitySource.header("Authorization"),
            validation_regex=TOKEN_HEADER_REGEX,
            results_cache_ttl=Duration.seconds(config.authorizer_cache_seconds),
        )
        # API Gateway's own refusals as problem+json like the functions' own: a 401 from the authorizer,
        # a 403 from its policy, a body over the limits, a model slower than the integration timeout.
        for response_type, status, title, detail in GATEWAY_PROBLEMS:
            self.rest_api.add_gateway_response(
                f"{title.replace(' ', '')}Response", type=response_type, status_code=status,
                response_headers={"Content-Type": "'application/problem+json'"},
                templates={"application/json": json.dumps(
                    {"type": "about:blank", "title": title, "status": int(status), "detail": detail})},
            )

        to_management = apigw.LambdaIntegration(management, proxy=True)
        to_inference = apigw.LambdaIntegration(inference, proxy=True)
        root = self.rest_api.root
        # Management: every path that is not /v2 (models, versions, uploads, deployments, tokens, docs).
        self._protect(root.add_resource("{proxy+}"), "ANY", to_management)
        # Inference: /v2 and below; the health probes are the only routes without a token.
        v2 = root.add_resource("v2")
        self._protect(v2, "GET", to_inference)
        self._protect(v2.add_resource("{proxy+}"), "ANY", to_inference)
        health = v2.add_resource("health")
        self.public_methods = [
            health.add_resource(probe).add_method("GET", to_inference, authorization_type=apigw.AuthorizationType.NONE)
            for probe in ("live", "ready")
        ]
        # The container-image pool serves the same routes under its own prefix.
        if image_inference is not None:
            to_image = apigw.LambdaIntegration(image_inference, proxy=True)
            image_v2 = root.add_resource(image_pool_path.strip("/")).add_resource("v2")
            self._protect(image_v2, "GET", to_image)
            self._protect(image_v2.add_resource("{proxy+}"), "ANY", to_image)
        self.url = self.rest_api.url

    def _protect(self, resource: apigw.IResource, method: str, integration: apigw.Integration) -> apigw.Method:
        return resource.add_method(method, integration, authorizer=self.authorizer,
                                   authorization_type=apigw.AuthorizationType.CUSTOM)
