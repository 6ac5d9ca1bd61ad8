"""The registry's DynamoDB table: one table, keys and the one index the registry needs.

Items (``pk`` / ``sk``)::

    MODEL#<name>          META                      the model, its version counter ``next_version``,
                                                    deploy counter ``next_seq``, ``in_flight``
                                                    deployment id, and ``rev`` (bumped by every
                                                    reference change: the lock delete_version checks)
    MODEL#<name>          VERSION#<000000001>       a version (status PENDING | READY | FAILED)
    MODEL#<name>          ALIAS#<alias>             an alias -> version
    MODEL#<name>          DEPLOYMENT#<000000000001> a deployment, sorted by its per-model sequence
    DEPLOYMENT#<id>       META                      pointer from a deployment id to model + sequence
    TOKEN#<sha256>        META                      a token, stored by the hash of its secret
    IDEMPOTENCY#<token id>#<key>  META              an Idempotency-Key and the response it got
                                                    (``maas.backends.aws.idempotency``); DynamoDB's
                                                    TTL removes it after ``ttl`` (epoch seconds)

The sparse global index ``gsi1`` (``gsi1pk`` / ``gsi1sk``) lists what has no partition of its own:
``MODELS`` / <name> for every model, ``STATUS#<status>`` / <model>#<version> for versions (cleanup),
``TOKENS`` / <id> for tokens. The CDK stack creates the same table (infra imports these names)."""

from __future__ import annotations

from typing import Any

PK = "pk"
SK = "sk"
GSI = "gsi1"
GSI_PK = "gsi1pk"
GSI_SK = "gsi1sk"
#: The table's time-to-live attribute (epoch seconds): items that carry it are deleted after that time
#: (idempotency keys; DynamoDB deletes lazily, so readers check expiry themselves).
TTL_ATTRIBUTE = "ttl"


def table_definition(name: str) -> dict[str, Any]:
    """``CreateTable`` arguments (on-demand); used by tests and local emulators."""
    return {
        "TableName": name,
        "BillingMode": "PAY_PER_REQUEST",
        "AttributeDefinitions": [
            {"AttributeName": attribute, "AttributeType": "S"} for attribute in (PK, SK, GSI_PK, GSI_SK)
        ],
        "KeySchema": [{"AttributeName": PK, "KeyType": "HASH"}, {"AttributeName": SK, "KeyType": "RANGE"}],
        "GlobalSecondaryIndexes": [{
            "IndexName": GSI,
            "KeySchema": [{"AttributeName": GSI_PK, "KeyType": "HASH"},
                          {"AttributeName": GSI_SK, "KeyType": "RANGE"}],
            "Projection": {"ProjectionType": "ALL"},
        }],
    }


def time_to_live_specification() -> dict[str, Any]:
    """``UpdateTimeToLive``'s specification (TTL is not part of ``CreateTable``)."""
    return {"AttributeName": TTL_ATTRIBUTE, "Enabled": True}


def create_table(client: Any, name: str) -> None:
    client.create_table(**table_definition(name))
    client.get_waiter("table_exists").wait(TableName=name)
    client.update_time_to_live(TableName=name, TimeToLiveSpecification=time_to_live_specification())
