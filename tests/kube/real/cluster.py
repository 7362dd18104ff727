"""A real Kubernetes control plane on loopback for tests: etcd 3.4 plus kube-apiserver v1.20.2.

`Cluster` starts Debian's etcd and any number of kube-apiservers on it (all on 127.0.0.1, random free ports, temp
dirs), with its own CA, a static token file (an admin in `system:masters`, a few plain users), the RBAC authorizer
and service-account token signing (TokenRequest and TokenReview work). No controller-manager and no kubelet: tests
create ServiceAccounts, Namespaces and Pods themselves and set pod IPs through the `status` subresource.

The apiserver binary is built once by `scripts/kube-apiserver` (it needs the Debian mirrors, so it runs before the
tests enter their loopback-only network namespace) and cached outside the work tree; `find_binaries()` says why it
cannot run when something is missing, and the fixtures skip with that message.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.tls import TestCA

KUBE_VERSION = "v1.20.2"
CACHE = Path(os.environ.get("KUBE_APISERVER_CACHE", "/var/cache/egress-gateway"))
APISERVER = Path(os.environ.get("KUBE_APISERVER", CACHE / f"kube-apiserver-{KUBE_VERSION}" / "kube-apiserver"))
ETCD = Path(os.environ.get("ETCD", "/usr/bin/etcd"))
KUBECTL = Path(os.environ.get("KUBECTL", "/usr/bin/kubectl"))
ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_TOKEN = "admin-token-for-tests"  # user "admin", group system:masters
# Static users (token -> name) without any group beyond system:authenticated: RBAC decides what they may do.
USERS = {"alice-token": "alice", "bob-token": "bob"}


@dataclass(frozen=True)
class Binaries:
    apiserver: Path
    etcd: Path
    kubectl: Path


def find_binaries() -> Binaries | str:
    """The three binaries, or a sentence saying what is missing and how to get it."""
    if not APISERVER.is_file() or not os.access(APISERVER, os.X_OK):
        return (
            f"no kube-apiserver {KUBE_VERSION} at {APISERVER}: build it once with `sudo scripts/kube-apiserver` "
            "(needs the Debian mirrors; `bash scripts/test` runs it) or point KUBE_APISERVER at one"
        )
    if not ETCD.is_file():
        return f"no etcd at {ETCD}: `apt-get install etcd-server` (Debian's etcd 3.4) or set ETCD"
    if not KUBECTL.is_file():
        return f"no kubectl at {KUBECTL}: set KUBECTL"
    return Binaries(APISERVER, ETCD, KUBECTL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"HTTP {status}: {body.get('message', body)}")
        self.status = status
        self.body = body


class Process:
    """A child process whose output goes to a log file (read back when it fails)."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as sink:
            self.popen = subprocess.Popen(self.argv, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        self.popen = None

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class ApiServer:
    """One kube-apiserver process; can be stopped and started again on the same port."""

    def __init__(self, cluster: Cluster, index: int) -> None:
        self.cluster = cluster
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        d = cluster.directory
        self.process = Process(
            f"kube-apiserver-{index}",
            [
                str(cluster.binaries.apiserver),
                f"--etcd-servers={cluster.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                "--insecure-port=0",  # v1.20 still opens 127.0.0.1:8080 by default
                f"--cert-dir={d / f'apiserver-{index}-certs'}",
                f"--tls-cert-file={cluster.serving.cert}",
                f"--tls-private-key-file={cluster.serving.key}",
                f"--client-ca-file={cluster.ca.cert_path}",
                f"--token-auth-file={d / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={ISSUER}",
                f"--service-account-key-file={d / 'sa.pub'}",
                f"--service-account-signing-key-file={d / 'sa.key'}",
                f"--api-audiences={ISSUER}",
                "--service-cluster-ip-range=10.96.0.0/16",
                # No controller-manager creates `default` ServiceAccounts; tests create the ones they use.
                "--disable-admission-plugins=ServiceAccount",
                # Every request, who made it and its answer: tests check that the gateway is never refused.
                f"--audit-policy-file={d / 'audit-policy.yaml'}",
                f"--audit-log-path={d / f'audit-{index}.log'}",
                "--audit-log-maxbackup=1",
                "--profiling=false",
                "--logtostderr=true",
                "--v=1",
            ],
            d / f"apiserver-{index}.log",
        )

    def start(self, timeout: float = 120.0) -> ApiServer:
        self.process.start()
        self.wait_ready(timeout)
        return self

    def stop(self) -> None:
        self.process.stop()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.process.running:
                raise RuntimeError(f"{self.process.name} exited:\n{self.process.tail()}")
            try:
                status, body = self.cluster.raw("GET", "/readyz", server=self)
                if status == 200:
                    return
                last = body.decode(errors="replace")[-400:]
            except OSError as exc:
                last = str(exc)
            time.sleep(0.25)
        raise RuntimeError(f"{self.process.name} not ready within {timeout}s ({last}):\n{self.process.tail()}")


class Cluster:
    def __init__(self, binaries: Binaries, directory: Path) -> None:
        self.binaries = binaries
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = TestCA(directory / "pki")
        self.serving = self.ca.issue("127.0.0.1", "localhost", "kubernetes.default.svc")
        self._write_credentials()
        # etcd fsyncs every write; on a loaded shared disk that dominates, so its data lives in memory when it can.
        shm = Path("/dev/shm")
        self._etcd_dir = Path(tempfile.mkdtemp(prefix="egw-etcd-", dir=shm if shm.is_dir() else None))
        self.etcd_url = f"http://127.0.0.1:{free_port()}"
        peer = f"http://127.0.0.1:{free_port()}"
        self.etcd = Process(
            "etcd",
            [
                str(binaries.etcd),
                "--name=egw-test",
                f"--data-dir={self._etcd_dir}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=egw-test={peer}",
                "--log-level=warn",
            ],
            directory / "etcd.log",
        )
        self.apiservers: list[ApiServer] = []
        self._context = ssl.create_default_context(cafile=str(self.ca.cert_path))

    def _write_credentials(self) -> None:
        d = self.directory
        lines = [f'{ADMIN_TOKEN},admin,admin-uid,"system:masters"']
        lines += [f"{token},{name},{name}-uid" for token, name in USERS.items()]
        (d / "tokens.csv").write_text("\n".join(lines) + "\n")
        (d / "audit-policy.yaml").write_text(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n"
        )
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (d / "sa.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        (d / "sa.pub").write_bytes(
            key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )

    # ---------------------------------------------------------------- lifecycle
    def start(self, apiservers: int = 1) -> Cluster:
        self.etcd.start()
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as response:
                    if json.loads(response.read()).get("health") == "true":
                        break
            except (OSError, ValueError):
                pass
            if not self.etcd.running or time.monotonic() > deadline:
                raise RuntimeError(f"etcd did not become healthy:\n{self.etcd.tail()}")
            time.sleep(0.1)
        for _ in range(apiservers):
            self.add_apiserver()
        return self

    def add_apiserver(self) -> ApiServer:
        server = ApiServer(self, len(self.apiservers))
        self.apiservers.append(server)
        return server.start()

    def stop(self) -> None:
        for server in self.apiservers:
            server.stop()
        self.etcd.stop()
        shutil.rmtree(self._etcd_dir, ignore_errors=True)

    @property
    def apiserver(self) -> ApiServer:
        return self.apiservers[0]

    def audit(self, user: str) -> list[dict[str, Any]]:
        """Audit events (stage ResponseComplete or Panic) of requests made by `user`, from every apiserver."""
        events = []
        for path in sorted(self.directory.glob("audit-*.log")):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if (event.get("user") or {}).get("username") == user and event.get("stage") != "ResponseStarted":
                    events.append(event)
        return events

    # ---------------------------------------------------------------- clients
    def kubeconfig(self, path: Path, token: str = ADMIN_TOKEN, server: ApiServer | None = None) -> Path:
        """A kubeconfig for one apiserver (the first by default) with a bearer token."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {
                        "server": (server or self.apiserver).url,
                        "certificate-authority": str(self.ca.cert_path),
                    },
                }
            ],
            "users": [{"name": "test", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
            "current-context": "test",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config))
        return path

    def kubectl(
        self,
        *args: str,
        stdin: str | None = None,
        token: str = ADMIN_TOKEN,
        server: ApiServer | None = None,
        check: bool = True,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        config = self.kubeconfig(self.directory / f"kubeconfig-{abs(hash((token, id(server))))}", token, server)
        done = subprocess.run(
            [str(self.binaries.kubectl), "--kubeconfig", str(config), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HOME": str(self.directory), **(env or {})},
        )
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({done.returncode}): {done.stderr}")
        return done

    def raw(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str = ADMIN_TOKEN,
        server: ApiServer | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{(server or self.apiserver).url}{path}", data=data, method=method)
        request.add_header("Authorization", f"Bearer {token}")
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=30, context=self._context) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def request(self, method: str, path: str, body: Any = None, **options: Any) -> dict[str, Any]:
        """A JSON API call; raises `ApiError` (with the server's Status) for anything but 2xx."""
        status, raw = self.raw(method, path, body, **options)
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = {"message": raw.decode(errors="replace")}
        if status >= 300:
            raise ApiError(status, answer)
        return dict(answer)

    # ---------------------------------------------------------------- objects
    def apply(self, *objects: dict[str, Any], **options: Any) -> None:
        """`kubectl apply` of the given objects."""
        self.kubectl(
            "apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}), **options
        )

    def namespace(self, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
        """Create a Namespace, or return the existing one."""
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}
        try:
            return self.request("POST", "/api/v1/namespaces", body)
        except ApiError as exc:
            if exc.status != 409:
                raise
        return self.request("GET", f"/api/v1/namespaces/{name}")

    def service_account(self, namespace: str, name: str) -> dict[str, Any]:
        body = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}
        return self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", body)

    def pod(
        self,
        namespace: str,
        name: str,
        ips: list[str],
        *,
        labels: dict[str, str] | None = None,
        service_account: str = "default",
        phase: str = "Running",
    ) -> dict[str, Any]:
        """Create a Pod object (nothing runs it) and give it IPs and a phase through the status subresource."""
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
            "spec": {
                "serviceAccountName": service_account,
                "nodeName": "node-1",
                "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
            },
        }
        self.request("POST", f"/api/v1/namespaces/{namespace}/pods", body)
        return self.set_pod_status(namespace, name, ips, phase=phase)

    def set_pod_status(self, namespace: str, name: str, ips: list[str], *, phase: str = "Running") -> dict[str, Any]:
        status = {"phase": phase, "podIP": ips[0] if ips else None, "podIPs": [{"ip": ip} for ip in ips]}
        return self.request(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/pods/{name}/status",
            {"status": status},
            content_type="application/merge-patch+json",
        )

    def token(
        self,
        namespace: str,
        service_account: str,
        audiences: list[str],
        *,
        pod: dict[str, Any] | None = None,
        seconds: int = 3600,
    ) -> str:
        """A ServiceAccount token from the TokenRequest API, bound to `pod` when given."""
        spec: dict[str, Any] = {"expirationSeconds": seconds}
        if audiences:  # none: the API server's own audience (a token for calling the API)
            spec["audiences"] = audiences
        if pod is not None:
            meta = pod["metadata"]
            spec["boundObjectRef"] = {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}
        answer = self.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        return str(answer["status"]["token"])
