"""The mesh's NATS side, shared by every process: settings, the connection, provisioning, the
embedded nats-server, the registry, the claims and storage buckets. Imports only schemas/ and telemetry/."""

from broker.connection import Connection
from broker.provision import check_provisioned, ensure_consumer, provision, wait_provisioned
from broker.registry import Registry
from broker.server import NatsServer
from broker.settings import Settings

__all__ = [
    "Connection", "NatsServer", "Registry", "Settings",
    "check_provisioned", "ensure_consumer", "provision", "wait_provisioned",
]  # fmt: skip
