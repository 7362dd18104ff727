"""egress-gateway: a Kubernetes egress gateway deciding allow/deny/audit per connection from EgressPolicy objects."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("egress-gateway")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0"
