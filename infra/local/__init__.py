"""The synthesized stack, run on one machine: ``make stack-local`` (``python -m infra.local``).

What runs is the cloud assembly ``cdk synth`` writes, not a copy of the stack: moto (server mode on
127.0.0.1) holds the bucket, table, topic, roles, log groups, alarms and state machine made from the
template's own properties; every Lambda function runs from its code asset and handler string, in a
process of its own, with the template's environment and the credentials of its own role (each AWS call
is checked against that role's policies); an HTTP front routes by the template's REST API resources and
methods, runs the TOKEN authorizer and applies API Gateway's limits; SageMaker endpoints are answered by
the project's serving container code on CPU. See docs/local-stack.md."""
