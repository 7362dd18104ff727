"""Identity `pod-ip`: the client's source address is looked up in the cluster's pod index.

Owns: `PodIdentityResolver(settings)`. The index (`kube.workloads.WorkloadIndex`, shared with the token resolver)
watches Pods and Namespaces; a lookup is a dict read. Until both are listed, and for an address no running pod
owns, the answer is None (the chain then ends in `unknown_client`). Imports the kube plumbing and settings only.
"""

from __future__ import annotations

from egress_gateway.kube.workloads import WorkloadIndex
from egress_gateway.policy.decision import Identity
from egress_gateway.settings import Settings


class PodIdentityResolver:
    def __init__(self, settings: Settings, index: WorkloadIndex | None = None) -> None:
        self.index = index or WorkloadIndex.shared(settings)

    @property
    def ready(self) -> bool:
        return self.index.ready

    async def start(self) -> None:
        await self.index.start()

    async def stop(self) -> None:
        await self.index.stop()

    async def identify(self, client_ip: str, proxy_authorization: str | None) -> Identity | None:
        return self.index.identity_for_ip(client_ip)

    def namespace_of_address(self, client_ip: str) -> str | None:
        identity = self.index.identity_for_ip(client_ip)
        return identity.namespace if identity is not None else None


def build(settings: Settings) -> PodIdentityResolver:
    """Factory used by the app's `identity.mode` wiring."""
    return PodIdentityResolver(settings)
