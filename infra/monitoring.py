"""What an operator watches: one CloudWatch dashboard and the alarms that page (and, with progressive
delivery, drive automatic rollback).

Per-model series come from the EMF metrics the functions write (namespace ``maas``, dimensions ``model``
and ``version``; see ``maas.backends.aws.telemetry``). Model names are not known at synth time, so those
widgets use ``SEARCH`` expressions: a model pushed after ``cdk deploy`` shows up without a redeploy."""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as actions
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from infra.config import StageConfig
from infra.deploy_workflow import ROLLBACK_FAILED_STATE

NAMESPACE = "maas"
PERIOD = Duration.minutes(1)


def per_model(metric: str, statistic: str, label: str) -> cloudwatch.MathExpression:
    """One series per (model, version) of an EMF metric, found at query time."""
    return cloudwatch.MathExpression(
        expression=f"SEARCH('{{{NAMESPACE},model,version}} MetricName=\"{metric}\"', '{statistic}', 60)",
        using_metrics={}, label=label, period=PERIOD,
    )


class Monitoring(Construct):
    """``topic`` (alarm notifications), ``alarms`` (name -> alarm), ``alarm_names`` and
    ``rollback_alarm_names`` (fixed names, so the deploy tasks can name them without a dependency cycle
    through the state machine) and ``dashboard``."""

    def __init__(self, scope: Construct, construct_id: str, *, config: StageConfig, rest_api: apigw.RestApi,
                 inference: Sequence[lambda_.IFunction], management: lambda_.IFunction,
                 state_machine: sfn.StateMachine, workflow_logs: logs.ILogGroup) -> None:
        super().__init__(scope, construct_id)
        key = kms.Key(
            self, "TopicKey", enable_key_rotation=True,
            description="maas alarm topic encryption",
            removal_policy=RemovalPolicy.RETAIN if config.retain_data else RemovalPolicy.DESTROY,
        )
        # CloudWatch publishes alarm notifications with this key.
        key.grant(iam.ServicePrincipal("cloudwatch.amazonaws.com"), "kms:Decrypt", "kms:GenerateDataKey*")
        self.topic = sns.Topic(self, "Alarms", display_name=f"maas {config.name} alarms", master_key=key,
                               enforce_ssl=True)
        if config.alarm_email:
            self.topic.add_subscription(subscriptions.EmailSubscription(config.alarm_email))

        # every inference pool (zip and image) counts towards the error rate
        pools = range(len(inference))
        error_rate = cloudwatch.MathExpression(
            expression=f"100 * ({' + '.join(f'errors{i}' for i in pools)}) / "
                       f"MAX([{' + '.join(f'invocations{i}' for i in pools)}, 1])",
            using_metrics={
                **{f"errors{i}": fn.metric_errors(period=Duration.minutes(5), statistic="Sum")
                   for i, fn in enumerate(inference)},
                **{f"invocations{i}": fn.metric_invocations(period=Duration.minutes(5), statistic="Sum")
                   for i, fn in enumerate(inference)},
            },
            label="inference error rate (%)", period=Duration.minutes(5),
        )
        latency = rest_api.metric_latency(period=Duration.minutes(5), statistic="p99")
        throttles = cloudwatch.MathExpression(
            expression=" + ".join(f"t{index}" for index in range(len(inference) + 1)),
            using_metrics={f"t{index}": fn.metric_throttles(period=Duration.minutes(5), statistic="Sum")
                           for index, fn in enumerate([*inference, management])},
            label="Lambda throttles (inference + management)", period=Duration.minutes(5),
        )
        self.alarms: dict[str, cloudwatch.Alarm] = {
            "InferenceErrorRate": error_rate.create_alarm(
                self, "InferenceErrorRate", alarm_name=f"maas-{config.name}-InferenceErrorRate",
                threshold=config.alarm_error_rate_percent,
                evaluation_periods=3, datapoints_to_alarm=2,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
                alarm_description=f"inference functions fail more than {config.alarm_error_rate_percent}% of calls",
            ),
            "ApiLatencyP99": latency.create_alarm(
                self, "ApiLatencyP99", alarm_name=f"maas-{config.name}-ApiLatencyP99",
                threshold=config.alarm_p99_latency_ms,
                evaluation_periods=3, datapoints_to_alarm=2,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
                alarm_description=f"API p99 latency above {config.alarm_p99_latency_ms:g} ms",
            ),
            "Throttles": throttles.create_alarm(
                self, "Throttles", alarm_name=f"maas-{config.name}-Throttles",
                threshold=config.alarm_throttles, evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
                alarm_description="Lambda is throttling maas functions: raise reserved concurrency or limits",
            ),
            "FailedDeploys": self._on_any(config, "FailedDeploys", state_machine.metric_failed(
                period=Duration.minutes(5), statistic="Sum"), "a deploy failed and was rolled back"),
            # A timed-out execution skips its Catch: no rollback ran, the deployment may still be
            # IN_PROGRESS with canary traffic (deploys bake at most MAX_TOTAL_BAKE_SECONDS to avoid it).
            "TimedOutDeploys": self._on_any(config, "TimedOutDeploys", state_machine.metric_timed_out(
                period=Duration.minutes(5), statistic="Sum"),
                "a deploy workflow timed out without rolling back: roll the model back by hand"),
            # The rollback's own Catch ends in this Fail state (infra.deploy_workflow): counted from the
            # workflow's execution log, since ExecutionsFailed cannot tell it from a clean rollback.
            "FailedRollbacks": self._on_any(config, "FailedRollbacks", logs.MetricFilter(
                self, "RollbackFailures", log_group=workflow_logs, metric_namespace=NAMESPACE,
                metric_name="RollbackFailures", metric_value="1", default_value=0,
                filter_pattern=logs.FilterPattern.all(
                    logs.FilterPattern.string_value("$.type", "=", "FailStateEntered"),
                    logs.FilterPattern.string_value("$.details.name", "=", ROLLBACK_FAILED_STATE)),
            ).metric(period=Duration.minutes(5), statistic="Sum"),
                "a rollback could not finish: the model may still send traffic to the new version; roll it "
                "back by hand"),
        }
        self.alarm_names = [f"maas-{config.name}-{key}" for key in self.alarms]
        #: what a SageMaker blue/green update rolls back on: serving errors and latency (requests to
        #: SageMaker models go through the inference function, so its alarms see the new variant's failures)
        self.rollback_alarm_names = [f"maas-{config.name}-{key}" for key in ("InferenceErrorRate", "ApiLatencyP99")]
        for alarm in self.alarms.values():
            alarm.add_alarm_action(actions.SnsAction(self.topic))
            alarm.add_ok_action(actions.SnsAction(self.topic))

        self.dashboard = cloudwatch.Dashboard(self, "Dashboard", dashboard_name=f"maas-{config.name}",
                                              default_interval=Duration.hours(3))
        self.dashboard.add_widgets(
            cloudwatch.TextWidget(width=24, height=2, markdown=(
                f"# maas {config.name}\nPer-model series come from the functions' EMF metrics "
                f"(namespace `{NAMESPACE}`, dimensions model and version).")),
        )
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(title="Model latency p50 (ms)", width=12,
                                   left=[per_model("ModelLatency", "p50", "p50")]),
            cloudwatch.GraphWidget(title="Model latency p99 (ms)", width=12,
                                   left=[per_model("ModelLatency", "p99", "p99")]),
        )
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(title="Invocations per model", width=8,
                                   left=[per_model("Invocations", "Sum", "invocations")]),
            cloudwatch.GraphWidget(title="Errors per model", width=8,
                                   left=[per_model("Errors", "Sum", "errors")]),
            cloudwatch.GraphWidget(title="Serving overhead (ms, p99)", width=8,
                                   left=[per_model("OverheadLatency", "p99", "overhead p99")]),
        )
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(title="Cold starts", width=8,
                                   left=[per_model("ColdStart", "Sum", "cold starts")]),
            cloudwatch.GraphWidget(title="Artifact cache hits (share of loads)", width=8,
                                   left=[per_model("CacheHit", "Average", "hit ratio")]),
            cloudwatch.GraphWidget(title="Model load time (ms)", width=8,
                                   left=[per_model("ModelLoadTime", "Maximum", "load")]),
        )
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(title="Lambda throttles", width=8, left=[throttles]),
            cloudwatch.GraphWidget(title="API requests and errors", width=8, left=[
                rest_api.metric_count(period=PERIOD, statistic="Sum"),
                rest_api.metric_client_error(period=PERIOD, statistic="Sum"),
                rest_api.metric_server_error(period=PERIOD, statistic="Sum"),
            ]),
            cloudwatch.GraphWidget(title="Deploy workflow executions", width=8, left=[
                state_machine.metric_started(period=PERIOD, statistic="Sum"),
                state_machine.metric_succeeded(period=PERIOD, statistic="Sum"),
                state_machine.metric_failed(period=PERIOD, statistic="Sum"),
            ]),
        )
        self.dashboard.add_widgets(
            cloudwatch.AlarmStatusWidget(title="Alarms", width=24, alarms=list(self.alarms.values())),
        )

    def _on_any(self, config: StageConfig, key: str, metric: cloudwatch.Metric, description: str) -> cloudwatch.Alarm:
        """An alarm that fires on a single event in five minutes (a failed or stuck deploy)."""
        return cloudwatch.Alarm(
            self, key, metric=metric, alarm_name=f"maas-{config.name}-{key}", threshold=1, evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING, alarm_description=description,
        )
