"""Gateway configuration: one pydantic-settings model.

Precedence, highest first: command-line flags, `EGRESS_GATEWAY_*` environment variables (nested keys with `__`,
e.g. `EGRESS_GATEWAY_RESOLVER__TIMEOUT_S=1`), the YAML file given with `--config`, then the defaults below.
Every key is documented in docs/configuration.md. Owns configuration only; imports nothing from the adapters.
"""

from __future__ import annotations

import ipaddress
import json
import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # the same key as policy.model's (settings import no adapter)


class DefaultAction(StrEnum):
    ALLOW = "Allow"
    DENY = "Deny"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_cidrs(values: list[str]) -> list[str]:
    return [str(ipaddress.ip_network(v, strict=False)) for v in values]


class StaticIdentity(_Section):
    """Maps client source addresses to a workload when there is no cluster."""

    cidr: str
    namespace: str
    pod: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    namespace_labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, value: str) -> str:
        return str(ipaddress.ip_network(value, strict=False))

    @model_validator(mode="after")
    def _real_namespace_name(self) -> StaticIdentity:
        # The name label is always the namespace's own name; another value would let this entry pose as another
        # namespace for every namespaceSelector that selects by name.
        stated = self.namespace_labels.get(NAMESPACE_NAME_LABEL)
        if stated is not None and stated != self.namespace:
            raise ValueError(
                f"namespace_labels[{NAMESPACE_NAME_LABEL!r}] is {stated!r} but namespace is {self.namespace!r}: "
                "the name label is always the namespace's own name (leave it out)"
            )
        return self


IdentityMode = Literal["static", "pod-ip", "service-account-token"]


class TokenReviewRate(_Section):
    per_second: float = Field(default=1.0, ge=0)  # 0 = unlimited
    burst: int = Field(default=10, ge=1)


class IdentitySettings(_Section):
    # Tried in order; the first that identifies the client wins. "service-account-token" before "pod-ip".
    # NoDecode: the environment may say EGRESS_GATEWAY_IDENTITY__MODE=static,pod-ip (or a JSON list).
    mode: Annotated[list[IdentityMode], NoDecode] = Field(default_factory=lambda: list[IdentityMode](["static"]))
    static: list[StaticIdentity] = Field(default_factory=list)
    token_audience: str = "egress-gateway"
    token_cache_size: int = Field(default=10_000, ge=1)  # approved tokens kept
    token_rejection_cache_size: int = Field(default=10_000, ge=1)  # rejected tokens kept (a separate LRU)
    token_cache_ttl_s: float = Field(default=60.0, gt=0)  # an approval is re-reviewed after this (or at its exp)
    token_reviews_per_address: TokenReviewRate = Field(default_factory=TokenReviewRate)
    # A token is accepted only from the address of the pod it is bound to; None = on when "pod-ip" is in `mode`.
    bind_token_to_pod_ip: bool | None = None
    # Pod-IP identities are not served once the pod index has been out of touch with the API server this long.
    max_staleness_s: float = Field(default=30.0, gt=0)

    @field_validator("mode", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def binds_tokens_to_pod_ip(self) -> bool:
        if self.bind_token_to_pod_ip is None:
            return "pod-ip" in self.mode
        return self.bind_token_to_pod_ip


class ResolverSettings(_Section):
    hosts: dict[str, list[str]] = Field(default_factory=dict)
    nameservers: list[str] = Field(default_factory=list)  # "ip" or "ip:port"; empty = system resolver
    timeout_s: float = Field(default=2.0, gt=0)
    # At most this many addresses of one answer are considered (checked, pinned); the rest are ignored, so a huge
    # answer costs no more than a small one.
    max_addresses: int = Field(default=16, ge=1, le=1024)


class TimeoutSettings(_Section):
    connect_s: float = Field(default=10.0, gt=0)
    client_hello_s: float = Field(default=10.0, gt=0)
    client_request_s: float = Field(default=30.0, gt=0)
    idle_s: float = Field(default=600.0, gt=0)


class NamespaceRate(_Section):
    per_second: float = Field(default=0.0, ge=0)  # 0 = unlimited
    burst: int = Field(default=100, ge=1)


class LimitSettings(_Section):
    max_connections: int = Field(default=10_000, ge=1)
    # Each namespace's share of max_connections (counted from accept, before any decision). None: a quarter of
    # max_connections (at least 1); equal to max_connections: no share.
    namespace_connections: int | None = Field(default=None, ge=1)
    namespace_rate: NamespaceRate = Field(default_factory=NamespaceRate)
    max_request_line_bytes: int = Field(default=8192, ge=64)  # longer -> 414
    max_header_bytes: int = Field(default=32768, ge=256)  # whole request head; larger -> 431
    max_headers: int = Field(default=100, ge=1)  # more header lines -> 431


class AuditSettings(_Section):
    file: Path | None = None
    otlp_endpoint: str | None = None
    otlp_protocol: Literal["http", "grpc"] = "http"
    otlp_headers: dict[str, str] = Field(default_factory=dict)
    console: bool = False
    max_queue_size: int = Field(default=8192, ge=1)
    hmac_key_file: Path | None = None  # seal the trail's chain with HMAC-SHA256 under this key (docs/audit.md)
    checkpoint_interval_s: float = Field(default=60.0, gt=0)
    flush_interval_s: float = Field(default=1.0, gt=0, le=60)  # bound on an `open` record's delay to the file
    rotate_bytes: int = Field(default=100 * 1024 * 1024, ge=0)  # built-in rotation at this size; 0: none
    rotate_interval_s: float = Field(default=0.0, ge=0)  # ... or at this age of the live file; 0: none
    keep_files: int = Field(default=10, ge=0)  # rotated generations kept
    compress_rotated: bool = True  # gzip rotated generations
    otlp_retry_buffer: int = Field(default=16384, ge=0)  # spans kept for retry while OTLP is down; 0: no retries
    policy_annotations: list[str] = Field(default_factory=list)  # carried into the records of that policy's decisions


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class KubernetesSettings(_Section):
    kubeconfig: Path | None = None
    context: str | None = None
    lease_name: str = "egress-gateway-status"
    lease_namespace: str | None = None  # default: the gateway's own namespace (POD_NAMESPACE)
    # Leader election for status writes (client-go defaults); lease > renew deadline > 1.2 x retry period.
    lease_duration_s: int = Field(default=15, ge=2)  # Lease spec.leaseDurationSeconds is an integer
    renew_deadline_s: float = Field(default=10.0, gt=1)
    retry_period_s: float = Field(default=2.0, ge=1)
    write_status: bool = True  # false: never write status (e.g. read-only RBAC)
    watch_timeout_s: float = Field(default=300.0, ge=1)  # server-side timeoutSeconds, randomized x1..x2
    backoff_max_s: float = Field(default=30.0, gt=0)  # cap of the jittered retry backoff


class TransparentSettings(_Section):
    """Transparent mode (docs/install.md, "Pods that ignore the proxy"): name-routed listeners, off by default."""

    tls_listen: str | None = None  # e.g. "0.0.0.0:3129": TLS to anything; the SNI names the destination
    http_listen: str | None = None  # e.g. "0.0.0.0:3130": origin-form HTTP; the Host header names the destination
    tls_port: int = Field(default=443, ge=1, le=65535)  # decided as a CONNECT to SNI:tls_port
    http_port: int = Field(default=80, ge=1, le=65535)  # a Host without a port: decided as Host:http_port
    # After a NAT redirect: the address the client connected to must be one the name resolves to.
    check_original_destination: bool = True

    @field_validator("tls_listen", "http_listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            split_hostport(value)  # HOST:PORT or [v6]:PORT, else a ValueError naming the field
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="EGRESS_GATEWAY_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )
    config_file: ClassVar[Path | None] = None

    listen: str = "127.0.0.1:3128"
    admin_listen: str = "127.0.0.1:9901"
    policy_source: Literal["files", "kubernetes"] = "files"
    policies_path: Path = Path("policies")
    default_action: DefaultAction = DefaultAction.DENY
    require_sni_match: bool = True
    revoke_open_tunnels: bool = True
    allowed_ranges: list[str] = Field(default_factory=list)
    # Addresses that reach this gateway besides its interfaces' (enumerated at run time): its Service ClusterIPs,
    # load-balancer or node addresses. No tunnel or plain-HTTP request may dial them on a port the gateway listens on.
    own_addresses: list[str] = Field(default_factory=list)
    own_ports: list[int] = Field(default_factory=list)  # further ports that are the gateway (e.g. a Service port)
    pod_ip: str | None = None  # default: the POD_IP environment variable (the chart sets it from status.podIP)
    shutdown_grace_s: float = Field(default=25.0, ge=0)
    data_dir: Path | None = None

    identity: IdentitySettings = Field(default_factory=IdentitySettings)
    resolver: ResolverSettings = Field(default_factory=ResolverSettings)
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
    transparent: TransparentSettings = Field(default_factory=TransparentSettings)

    @field_validator("allowed_ranges")
    @classmethod
    def _ranges(cls, values: list[str]) -> list[str]:
        return _check_cidrs(values)

    @field_validator("own_addresses")
    @classmethod
    def _addresses(cls, values: list[str]) -> list[str]:
        return [str(ipaddress.ip_address(v.strip("[]"))) for v in values]

    @field_validator("pod_ip")
    @classmethod
    def _pod_ip(cls, value: str | None) -> str | None:
        return str(ipaddress.ip_address(value)) if value else None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.config_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=cls.config_file))
        return tuple(sources)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from a YAML file, the environment and explicit overrides (CLI flags)."""
    if config_file is not None and not config_file.is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")

    class _FileSettings(Settings):
        pass

    _FileSettings.config_file = config_file
    values = {k: v for k, v in overrides.items() if v is not None}
    return Settings.model_validate(_FileSettings(**values).model_dump())


def configured_own_addresses(settings: Settings) -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The gateway's own addresses known from configuration: a specific listen address, the pod IP (`pod_ip`, else
    the POD_IP environment variable) and `own_addresses`. Every EngineConfig and the self-dial check use this."""
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    pod_ip = settings.pod_ip or os.environ.get("POD_IP", "")
    texts = [split_hostport(settings.listen)[0], pod_ip, *settings.own_addresses]
    for text in texts:
        try:
            address = ipaddress.ip_address(text.strip())
        except ValueError:
            continue
        if not address.is_unspecified:
            found.add(address)
    return frozenset(found)


def split_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    """'127.0.0.1:3128' -> ('127.0.0.1', 3128); '[::1]:3128' -> ('::1', 3128)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        if default_port is None:
            raise ValueError(f"{value!r}: expected HOST:PORT")
        return value.strip("[]"), default_port
    return host.strip("[]"), int(port)
