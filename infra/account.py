"""``AccountSettings``: the one API Gateway setting that belongs to an account and region, not a stage.

API Gateway writes a stage's execution logs with the role named in the account's settings
(``AWS::ApiGateway::Account``): one value per account and region. A stage stack that set it would own
it: two stages in one account would overwrite each other's, and destroying either would break API
logging account-wide. So it lives in a stack of its own, ``maas-account``, which every stage depends
on (``cdk deploy maas-dev`` deploys it first), whose resources are kept when it is destroyed. Nothing
else is in it."""

from __future__ import annotations

from typing import Any

from aws_cdk import RemovalPolicy, Stack
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_iam as iam
from constructs import Construct

ACCOUNT_STACK_NAME = "maas-account"
LOGS_POLICY = "service-role/AmazonAPIGatewayPushToCloudWatchLogs"


class AccountSettings(Stack):
    """``logs_role`` (assumed by API Gateway) and ``settings`` (the account's API Gateway settings)."""

    def __init__(self, scope: Construct, construct_id: str = ACCOUNT_STACK_NAME, **kwargs: Any) -> None:
        super().__init__(scope, construct_id, description="maas account-wide settings: API Gateway's CloudWatch "
                         "Logs role (shared by every maas stage in this account and region)", **kwargs)
        self.logs_role = iam.Role(
            self, "ApiGatewayLogsRole", assumed_by=iam.ServicePrincipal("apigateway.amazonaws.com"),
            managed_policies=[iam.ManagedPolicy.from_aws_managed_policy_name(LOGS_POLICY)],
            description="API Gateway writes execution logs of every REST API in this account and region",
        )
        self.settings = apigw.CfnAccount(self, "ApiGatewaySettings", cloud_watch_role_arn=self.logs_role.role_arn)
        # Kept on destroy: other stages (and other software in the account) rely on the setting.
        for resource in (self.logs_role, self.settings):
            resource.apply_removal_policy(RemovalPolicy.RETAIN)
