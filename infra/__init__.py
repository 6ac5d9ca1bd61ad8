"""The maas CDK application: one construct per concern (model store, functions, API, deploy workflow,
GPU path, monitoring), wired together and granted by ``infra.stack.MaasStack``.

Only CDK lives here. From the product it imports environment-variable names (``maas.settings``), error
class names (``maas.errors``) and the deploy step list (``maas.services.deploy``), nothing else: the
stack describes where the code runs, the code decides what it does."""
