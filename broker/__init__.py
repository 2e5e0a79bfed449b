"""Everything that speaks NATS: settings, connection, provisioning, the embedded server, the client."""

from broker.client import MeshClient
from broker.connection import Connection
from broker.delivery import Delivery
from broker.feed import PullFeed
from broker.provision import check_provisioned, ensure_consumer, provision, wait_provisioned
from broker.registry import Registry
from broker.server import NatsServer
from broker.settings import Settings
from broker.sync_client import SyncMeshClient

__all__ = [
    "Connection", "Delivery", "MeshClient", "NatsServer", "PullFeed", "Registry", "Settings", "SyncMeshClient",
    "check_provisioned", "ensure_consumer", "provision", "wait_provisioned",
]  # fmt: skip
