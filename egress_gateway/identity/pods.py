"""Identity `pod-ip`: the client's source address is looked up in the cluster's pod index.

Owns: `PodIdentityResolver(settings)`. The index (`kube.workloads.WorkloadIndex`, shared with the token resolver)
watches Pods and Namespaces; a lookup is a dict read. Until both are listed, and for an address no running pod
owns, the answer is None (the chain then ends in `unknown_client`). Once the index has been out of touch with the
API server for longer than `identity.max_staleness_s`, an address may already belong to another pod: the answer is
`IdentityUnavailable` (-> `unknown_client` saying why) until it is back in touch. Readiness stays up on purpose
(docs/security.md, "Identity"). Imports the kube plumbing, settings and the identity contract only.
"""

from __future__ import annotations

from egress_gateway.identity.base import IdentityUnavailable
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
        if self.index.ready and not self.index.addresses_trusted():
            raise IdentityUnavailable(self.index.untrusted_reason())
        return self.index.identity_for_ip(client_ip)

    def namespace_of_address(self, client_ip: str) -> str | None:
        if self.index.ready and not self.index.addresses_trusted():
            return None  # a stale index may name the address's previous namespace
        identity = self.index.identity_for_ip(client_ip)
        return identity.namespace if identity is not None else None


def build(settings: Settings) -> PodIdentityResolver:
    """Factory used by the app's `identity.mode` wiring."""
    return PodIdentityResolver(settings)
