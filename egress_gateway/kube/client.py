"""Connecting to the Kubernetes API server: which credentials, which namespace, which identity.

Owns: `connect(settings)` -> an asyncio `ApiClient` (the official client's `kubernetes.aio`), built from, in
order, `kubernetes.kubeconfig` (`--kubeconfig`), `$KUBECONFIG`, the in-cluster ServiceAccount, then
`~/.kube/config`; `own_namespace()` and `holder_identity()` for leader election. Imports settings only from
the gateway.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from kubernetes.aio.client import ApiClient, Configuration
from kubernetes.aio.config import ConfigException, load_incluster_config, load_kube_config

from egress_gateway.settings import KubernetesSettings

_SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_DEFAULT_KUBECONFIG = Path("~/.kube/config").expanduser()


class KubeConfigError(OSError):
    """No usable way to reach the API server (the message says what was tried). An OSError, like a missing
    file, so that `run` reports it as a startup failure."""


async def connect(settings: KubernetesSettings) -> ApiClient:
    configuration = Configuration()
    kubeconfig = settings.kubeconfig or (Path(os.environ["KUBECONFIG"]) if os.environ.get("KUBECONFIG") else None)
    try:
        if kubeconfig is not None:
            await load_kube_config(
                config_file=str(kubeconfig),
                context=settings.context,
                client_configuration=configuration,
                persist_config=False,
            )
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            load_incluster_config(client_configuration=configuration)
        elif _DEFAULT_KUBECONFIG.is_file():
            await load_kube_config(
                config_file=str(_DEFAULT_KUBECONFIG),
                context=settings.context,
                client_configuration=configuration,
                persist_config=False,
            )
        else:
            raise KubeConfigError(
                "no Kubernetes credentials: set kubernetes.kubeconfig (--kubeconfig) or KUBECONFIG, "
                "or run in a pod with a ServiceAccount token mounted"
            )
    except (ConfigException, OSError, ValueError) as exc:
        where = kubeconfig or "in-cluster ServiceAccount"
        raise KubeConfigError(f"cannot load Kubernetes client configuration from {where}: {exc}") from exc
    # The reflectors, the status writer and leader election retry on their own, with jitter.
    configuration.retries = None
    return ApiClient(configuration)


def own_namespace(settings: KubernetesSettings) -> str:
    """The namespace for the status Lease: the setting, then POD_NAMESPACE, then the ServiceAccount's namespace."""
    if settings.lease_namespace:
        return settings.lease_namespace
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        return _SA_NAMESPACE_FILE.read_text().strip() or "default"
    except OSError:
        return "default"


def holder_identity() -> str:
    """A name unique to this replica: the pod name when the chart passes it, else host name plus a random tag."""
    name = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{name}_{uuid.uuid4().hex[:8]}"
