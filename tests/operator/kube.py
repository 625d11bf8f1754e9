"""A real Kubernetes control plane for the operator tests: etcd, kube-apiserver and
kube-controller-manager built from Go modules (tools/k8s, scripts/build-k8s.sh), on loopback.

Why: the operator's claims (schema and CEL validation, defaults, the status subresource, RBAC, garbage
collection by ownerReferences, the Deployment and ReplicaSet controllers) hold only if a real API server
says so. kmock (tests/operator/emulator.py) is kept only for fault injection a real server cannot do.

What runs (one control plane per test session, `ControlPlane`):

* etcd on a free loopback port with a temporary data dir;
* kube-apiserver on a free loopback port, TLS with certificates made here (a CA, the serving
  certificate, client certificates for the admin and the controller-manager), service-account signing
  keys, ``--authorization-mode=Node,RBAC``, the default admission plugins plus
  OwnerReferencesPermissionEnforcement;
* kube-controller-manager with the garbage collector, namespace, serviceaccount, deployment and
  replicaset controllers, each controller under its own service account (as kubeadm runs it).

No kubelet and no scheduler: pods are created and stay Pending. Readiness is waited for by condition
(``/readyz``, the first ServiceAccount the controller-manager creates), never by sleeping. The test
session installs the chart's CRDs before it starts the controller-manager (`start_controller_manager`).

The admin talks to the server with a client certificate in ``system:masters``; the operator gets a
kubeconfig holding a token of its ServiceAccount from the TokenRequest API (`service_account_kubeconfig`),
so it runs with the chart's RBAC, never as admin.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import ipaddress
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.devtools.natsproc import die_with_parent
from tests.support.ports import free_port
from tests.support.wait import eventually, eventually_sync

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-k8s.sh"
CHART = REPO / "charts" / "wsgateway-operator"
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"  # the `kubernetes` Service: first address of the range
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
CONTROLLERS = (
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "deployment-controller",
    "replicaset-controller",
)


def k8s_bin_dir() -> Path:
    """The directory holding etcd, kube-apiserver, kube-controller-manager and helm.

    Runs scripts/build-k8s.sh: a no-op returning the cached directory when the binaries exist, else a
    build of several minutes (its progress goes to stderr). A failed build fails the test session.
    """
    result = subprocess.run([str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=False, timeout=3600)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{BUILD_SCRIPT} failed with exit code {result.returncode}: {result.stdout}")
    return Path(lines[-1])


# ------------------------------------------------------------------------------------ certificates


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class Pki:
    """A CA and certificates signed by it, written as PEM files into `directory`."""

    directory: Path
    ca_key: ec.EllipticCurvePrivateKey = field(init=False)
    ca_cert: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("wsgateway-test-ca")).issuer_name(_name("wsgateway-test-ca"))
            .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca_file.write_bytes(self.ca_pem)

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_pem(self) -> bytes:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, stem: str, cn: str, *, org: str | None = None, server: bool = False,
              dns: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> tuple[Path, Path]:
        """A client (or, with `server`, serving) certificate; returns (cert file, key file)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn, org)).issuer_name(self.ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        if server:
            sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
            sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        cert_file, key_file = self.directory / f"{stem}.crt", self.directory / f"{stem}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(_pem_key(key))
        key_file.chmod(0o600)
        return cert_file, key_file

    def signing_key(self, stem: str) -> tuple[Path, Path]:
        """A key pair for signing service-account tokens; returns (public key file, private key file)."""
        key = ec.generate_private_key(ec.SECP256R1())
        pub, priv = self.directory / f"{stem}.pub", self.directory / f"{stem}.key"
        pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
        priv.write_bytes(_pem_key(key))
        priv.chmod(0o600)
        return pub, priv


def kubeconfig(server: str, ca_pem: bytes, *, user: dict[str, str], name: str = "test") -> str:
    """A kubeconfig with one cluster, one user (token or client certificate data) and one context."""
    doc = {
        "apiVersion": "v1", "kind": "Config", "current-context": name,
        "clusters": [{"name": name, "cluster": {
            "server": server, "certificate-authority-data": base64.b64encode(ca_pem).decode()}}],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
    }
    return yaml.safe_dump(doc)


def _cert_user(cert: Path, key: Path) -> dict[str, str]:
    return {"client-certificate-data": base64.b64encode(cert.read_bytes()).decode(),
            "client-key-data": base64.b64encode(key.read_bytes()).decode()}


# ------------------------------------------------------------------------------------- processes


class Process:
    """One control-plane binary; output in a log file (shown when it fails), stopped with SIGTERM."""

    def __init__(self, name: str, command: list[str], log: Path) -> None:
        self.name, self.command, self.log = name, command, log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=die_with_parent, start_new_session=True)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")

    def lost_its_port(self) -> bool:
        """Whether it exited because another process took one of its ports first (see `free_port`)."""
        return self.proc.poll() is not None and "address already in use" in self.tail(200)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_for(check: Callable[[], bool], *, what: str, procs: tuple[Process, ...], timeout: float = 90.0) -> None:
    """Poll `check` until it is true; fail at once when one of `procs` died (with its log)."""
    def alive_and(check: Callable[[], bool]) -> bool:
        for p in procs:
            p.check_alive()
        return check()

    eventually_sync(lambda: alive_and(check), what=what, timeout=timeout, interval=0.1,
                    ignore=(httpx.HTTPError, OSError), info=lambda: "\n".join(p.tail() for p in procs))


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on loopback (see the module docstring)."""

    def __init__(self, bin_dir: Path, workdir: Path) -> None:
        self.bin_dir = bin_dir
        self.workdir = workdir
        self.pki = Pki(workdir / "pki")
        self.procs: list[Process] = []
        self.admin_cert = self.pki.issue("admin", "wsgateway-test-admin", org="system:masters")
        self.admin_kubeconfig = workdir / "admin.kubeconfig"
        self.attempt = 0
        self._choose_port()
        self.version: dict[str, Any] = {}

    def _choose_port(self) -> None:
        self.port = free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        self.admin_kubeconfig.write_text(kubeconfig(self.server, self.pki.ca_pem, user=_cert_user(*self.admin_cert)))

    def binary(self, name: str) -> str:
        return str(self.bin_dir / name)

    def start(self, *, controller_manager: bool = True) -> ControlPlane:
        """etcd and kube-apiserver, then (unless told not to) kube-controller-manager.

        Their ports come from `free_port`, which only says a port was free a moment ago: on a busy machine
        another process (an outgoing connection, too) can take it first. Then the one that lost its port
        exits with "address already in use", and both start again on other ports (at most three times)."""
        try:
            for attempt in range(1, 4):
                self.attempt = attempt
                try:
                    self._start_etcd()
                    self._start_apiserver()
                    break
                except RuntimeError:
                    lost = any(p.lost_its_port() for p in self.procs)
                    self.stop()
                    if not lost or attempt == 3:
                        raise
                    self._choose_port()
            if controller_manager:
                self.start_controller_manager()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        etcd = Process("etcd", [
            self.binary("etcd"), "--name", "test", "--data-dir", str(self.workdir / f"etcd-{self.attempt}"),
            "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"test=http://127.0.0.1:{peer}",
            "--unsafe-no-fsync",  # a throw-away store: durability costs time and buys nothing here
            "--log-level", "warn",
        ], self.workdir / "etcd.log")
        self.procs.append(etcd)

        def healthy() -> bool:
            r = httpx.get(f"{self.etcd_url}/health", timeout=2, trust_env=False)
            return r.status_code == 200 and r.json().get("health") == "true"

        wait_for(healthy, what="etcd /health", procs=(etcd,))

    def _start_apiserver(self) -> None:
        serving = self.pki.issue(
            "apiserver", "kube-apiserver", server=True,
            dns=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 "kubernetes.default.svc.cluster.local"),
            ips=("127.0.0.1", SERVICE_IP),
        )
        sa_pub, sa_key = self.pki.signing_key("service-account")
        apiserver = Process("kube-apiserver", [
            self.binary("kube-apiserver"),
            "--etcd-servers", self.etcd_url,
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1", "--secure-port", str(self.port),
            "--cert-dir", str(self.workdir / "apiserver-certs"),
            "--tls-cert-file", str(serving[0]), "--tls-private-key-file", str(serving[1]),
            "--client-ca-file", str(self.pki.ca_file),
            "--service-account-issuer", SA_ISSUER,
            "--service-account-key-file", str(sa_pub), "--service-account-signing-key-file", str(sa_key),
            "--service-cluster-ip-range", SERVICE_CIDR,
            # The `kubernetes` Service's endpoints would point at the advertise address, which may not
            # be loopback; nothing in the tests reaches the API server through that Service.
            "--endpoint-reconciler-type", "none",
            "--authorization-mode", "Node,RBAC",
            # The default admission plugins, plus the one that makes setting blockOwnerDeletion on an
            # ownerReference require `update` on the owner's finalizers (the chart grants exactly that;
            # OpenShift enables this plugin by default).
            "--enable-admission-plugins", "OwnerReferencesPermissionEnforcement",
            "--profiling=false", "--v=1",
        ], self.workdir / "kube-apiserver.log")
        self.procs.append(apiserver)

        with self.sync_client() as http:
            def ready() -> bool:
                return http.get("/readyz").status_code == 200

            wait_for(ready, what="kube-apiserver /readyz", procs=tuple(self.procs))
            self.version = http.get("/version").json()

    def start_controller_manager(self) -> None:
        """Start it once the CRDs are installed: its garbage collector discovers resources added later only
        every 30 s (a period hard-coded in kube-controller-manager), and until then it cannot collect the
        children of a deleted WebSocketGateway."""
        cert = self.pki.issue("controller-manager", "system:kube-controller-manager")
        config = self.workdir / "controller-manager.kubeconfig"
        config.write_text(kubeconfig(self.server, self.pki.ca_pem, user=_cert_user(*cert)))
        kcm = Process("kube-controller-manager", [
            self.binary("kube-controller-manager"),
            "--kubeconfig", str(config),
            "--controllers", ",".join(CONTROLLERS),
            "--use-service-account-credentials=true",  # each controller with its own RBAC, as kubeadm does
            "--leader-elect=false", "--secure-port=0",
            "--concurrent-gc-syncs=5", "--v=1",
        ], self.workdir / "kube-controller-manager.log")
        self.procs.append(kcm)

        # The serviceaccount controller runs once it creates the `default` ServiceAccounts; the pods of
        # the Deployments need that account (ServiceAccount admission).
        with self.sync_client() as http:
            def serviceaccount_created() -> bool:
                return http.get("/api/v1/namespaces/default/serviceaccounts/default").status_code == 200

            wait_for(serviceaccount_created, what="kube-controller-manager (the default ServiceAccount)",
                     procs=tuple(self.procs))

    # --- clients ---------------------------------------------------------------------------------

    def ssl_context(self, *, client_cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_file))
        if client_cert is not None:
            ctx.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
        return ctx

    def sync_client(self) -> httpx.Client:
        return httpx.Client(base_url=self.server, verify=self.ssl_context(client_cert=self.admin_cert),
                            timeout=10, trust_env=False)

    def admin(self) -> Kube:
        """An async client as cluster admin (system:masters)."""
        return Kube(self.server, self.ssl_context(client_cert=self.admin_cert))

    def as_token(self, token: str) -> Kube:
        return Kube(self.server, self.ssl_context(), headers={"Authorization": f"Bearer {token}"})

    def token_kubeconfig(self, token: str, path: Path) -> Path:
        path.write_text(kubeconfig(self.server, self.pki.ca_pem, user={"token": token}))
        path.chmod(0o600)
        return path

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.tail()}" for p in self.procs)


# ----------------------------------------------------------------------------------------- client


class ApiFailure(Exception):
    """A refused API call with the server's Status (code, reason, message, details.causes)."""

    def __init__(self, method: str, path: str, status: dict[str, Any], code: int) -> None:
        self.code = code
        self.reason = str(status.get("reason") or "")
        self.message = str(status.get("message") or "")
        self.causes: list[dict[str, Any]] = list((status.get("details") or {}).get("causes") or [])
        super().__init__(f"{method} {path}: {code} {self.reason}: {self.message}")


def path(api_version: str, plural: str, namespace: str | None = None, name: str | None = None,
         sub: str | None = None) -> str:
    """The REST path of a resource collection or object (`api_version` as in manifests: v1, apps/v1)."""
    p = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespace:
        p += f"/namespaces/{namespace}"
    p += f"/{plural}"
    if name:
        p += f"/{name}"
    if sub:
        p += f"/{sub}"
    return p


class Kube:
    """A small async REST client for the tests (admin or a service account)."""

    def __init__(self, server: str, verify: ssl.SSLContext, headers: dict[str, str] | None = None) -> None:
        self.http = httpx.AsyncClient(base_url=server, verify=verify, headers=headers or {}, timeout=15,
                                      trust_env=False)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> Kube:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def call(self, method: str, url: str, *, body: Any = None, content_type: str | None = None,
                   params: dict[str, str] | None = None, missing_ok: bool = False) -> dict[str, Any] | None:
        headers = {"Content-Type": content_type} if content_type else {}
        r = await self.http.request(method, url, json=body, headers=headers, params=params)
        if missing_ok and r.status_code == 404:
            return None
        if r.status_code >= 400:
            try:
                status = r.json()
            except ValueError:
                status = {"message": r.text}
            raise ApiFailure(method, url, status if isinstance(status, dict) else {"message": str(status)},
                             r.status_code)
        result: dict[str, Any] = r.json() if r.content else {}
        return result

    async def get(self, url: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        return await self.call("GET", url, missing_ok=True)

    async def items(self, url: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else None
        body = await self.call("GET", url, params=params) or {}
        return list(body.get("items") or [])

    async def create(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.call("POST", url, body=body) or {}

    async def replace(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.call("PUT", url, body=body) or {}

    async def patch(self, url: str, patch: Any, *, kind: str = "merge") -> dict[str, Any]:
        types = {"merge": "application/merge-patch+json", "json": "application/json-patch+json",
                 "strategic": "application/strategic-merge-patch+json"}
        return await self.call("PATCH", url, body=patch, content_type=types[kind]) or {}

    async def delete(self, url: str, *, propagation: str = "Background") -> bool:
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        return await self.call("DELETE", url, body=body, missing_ok=True) is not None

    async def allowed(self, user: str, verb: str, resource: str, namespace: str | None = None,
                      group: str = "") -> bool:
        """The API server's authoriser (RBAC, a SubjectAccessReview): may this service account user do it?

        RBAC objects reach the authoriser through its informers, asynchronously: after a write of a
        Role or binding, wait for the answer with `until_allowed`, never read it once."""
        attributes: dict[str, Any] = {"verb": verb, "resource": resource, "group": group}
        if namespace:
            attributes["namespace"] = namespace
        review = await self.create("/apis/authorization.k8s.io/v1/subjectaccessreviews", {
            "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": user, "groups": ["system:serviceaccounts"], "resourceAttributes": attributes}})
        return bool(review["status"].get("allowed"))

    async def until_allowed(self, user: str, verb: str, resource: str, namespace: str | None = None,
                            group: str = "", *, allowed: bool = True) -> None:
        """Wait until the authoriser's answer is `allowed` (a grant or a removal has taken effect)."""
        async def answered() -> bool:
            return await self.allowed(user, verb, resource, namespace, group) is allowed

        await eventually(answered, what=f"the authoriser to {'allow' if allowed else 'refuse'} {user}: "
                                        f"{verb} {group or 'core'}/{resource} in {namespace or 'the cluster'}")

    async def token(self, namespace: str, service_account: str, seconds: int = 3600) -> str:
        """A token of the ServiceAccount from the TokenRequest API."""
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"expirationSeconds": seconds}}
        result = await self.create(path("v1", "serviceaccounts", namespace, service_account, "token"), body)
        return str(result["status"]["token"])


# -------------------------------------------------------------------------------------------- helm


@dataclass
class Helm:
    """The helm built by scripts/build-k8s.sh, with its own config/cache/data dirs."""

    binary: Path
    home: Path
    kubeconfig: Path | None = None

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HELM_", "KUBECONFIG"))}
        env.update({"HELM_CACHE_HOME": str(self.home / "cache"), "HELM_CONFIG_HOME": str(self.home / "config"),
                    "HELM_DATA_HOME": str(self.home / "data"),
                    "KUBECONFIG": str(self.kubeconfig or self.home / "no-kubeconfig")})
        return env

    def run(self, *args: str, values: dict[str, Any] | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.binary), *args]
        if values is not None:
            self.home.mkdir(parents=True, exist_ok=True)
            values_file = self.home / f"values-{time.monotonic_ns()}.yaml"
            values_file.write_text(yaml.safe_dump(values))
            cmd += ["-f", str(values_file)]
        result = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=180, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result


# ------------------------------------------------------------------------------- the operator


class OperatorProcess:
    """`wsgateway operator` as its own process, logged in with a kubeconfig (the SA token)."""

    def __init__(self, kubeconfig_file: Path, namespace: str, log: Path, *, resync: float = 1.0,
                 metrics_port: int | None = None) -> None:
        self.log = log
        self.metrics_port = metrics_port if metrics_port is not None else free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("WSGATEWAY_", "KUBECONFIG"))}
        self.env.update({
            "KUBECONFIG": str(kubeconfig_file),
            "WSGATEWAY_OPERATOR_RESYNC_S": str(resync), "WSGATEWAY_OPERATOR_SCRAPE_TIMEOUT_S": "0.5",
            "WSGATEWAY_OPERATOR_NATS_TIMEOUT_S": "1", "WSGATEWAY_OPERATOR_RETRY_BASE_S": "0.5",
            "WSGATEWAY_OPERATOR_RETRY_MAX_S": "1", "WSGATEWAY_OPERATOR_METRICS_HOST": "127.0.0.1",
            "WSGATEWAY_OPERATOR_METRICS_PORT": str(self.metrics_port),
        })
        self.command = [str(Path(sys.executable).parent / "wsgateway"), "operator", "--namespace", namespace,
                        "--standalone", "--verbose"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
                                         start_new_session=True)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (kopf stops gracefully); returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextlib.asynccontextmanager
async def operator_running(kubeconfig_file: Path, namespace: str, log: Path,
                           **kw: Any) -> AsyncIterator[OperatorProcess]:
    op = OperatorProcess(kubeconfig_file, namespace, log, **kw).start()
    try:
        yield op
    finally:
        await asyncio.to_thread(op.stop)
