"""The Kubernetes container manager: model containers as Deployments in a cluster.

``container_manager = "kubernetes"`` (``[frontend]`` in the config file) puts
each deployed model version's replicas in a Kubernetes Deployment instead of
child processes. The module has two halves:

* **Pure builders** (:func:`build_deployment`, :func:`build_credentials_secret`,
  :func:`deployment_name`, the ``check_*`` functions): plain ``dict``
  manifests, no client and no cluster needed, so they can be validated
  offline against the Kubernetes schemas (``tests/test_kubernetes.py`` does).
* :class:`KubernetesManager`: the interface the frontend uses for every
  manager (``ensure``, ``remove``, ``close``, ``manages``, ``kill``, ``pids``,
  ``stats``), calling the API with the official ``kubernetes`` client
  (``pip install 'clipper-serving[kubernetes]'``, imported only when a
  manager is made). Every client call blocks, so each runs on a worker
  thread (:func:`asyncio.to_thread`), never on the event loop.

How a replica proves who it is: the manager issues one CURVE credential per
model version through the frontend's keyring with origin ``"operator"``, so
its public half goes to the state store and every frontend sharing that
store accepts it (the frontends of one system share their RPC server key
pair, ``rpc-server.key``/``rpc-server.key_secret``, so one credential works
with all of them). The credentials document lives in a Secret
(``<deployment>-credentials`` without the frontend's suffix: one per model
version) that the Deployment mounts read-only; the container reads it from
``CLIPPER_CREDENTIALS_FILE``. A frontend that finds the Secret already made
(by itself before a restart, or by another frontend) reuses it while the
credential it holds is still valid.

Which frontend a container serves: a container holds one RPC connection. In a
pod (``CLIPPER_POD_NAME``, ``CLIPPER_POD_UID`` and ``CLIPPER_POD_IP`` from the
downward API, as ``deploy/kubernetes`` sets them) each frontend runs its own
Deployment per model version, named with the pod's name, whose containers dial
that pod's address and which the pod owns (an ``ownerReference``): the
cluster's garbage collector deletes them with the pod, and every frontend gets
the replica count it asked for, as with local processes. A frontend outside the
cluster names its Deployments from the model alone and its containers dial
``kubernetes_rpc_address``.

What the manager does not do: it never signals a container (:meth:`kill`
returns False; the frontend drops a hung replica and the kubelet restarts a
container that exits), and :meth:`close` leaves the Deployments running (the
cluster owns them; a restarted frontend finds them again), unless made with
``delete_on_close=True``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ContainerFailedError, InvalidConfigError
from .registry import ModelVersion

log = logging.getLogger("clipper.manager.kubernetes")

__all__ = [
    "KubernetesSettings", "KubernetesManager", "build_deployment", "build_credentials_secret",
    "deployment_name", "credentials_secret_name", "check_namespace", "check_image", "check_rpc_address",
    "check_config", "CREDENTIALS_DIR", "CREDENTIALS_KEY", "MODEL_UID",
]

# The RFC 1123 label (namespaces, Deployment and Secret names here): lowercase letters, digits and '-',
# starting and ending with a letter or digit, at most 63 characters.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
# A label value: at most 63 characters of letters, digits, '-', '_', '.', alphanumeric at both ends.
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?\Z")
# An image reference: [registry[:port]/]path[:tag][@digest], no spaces or shell characters.
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,511}\Z")
# Pods' names are Deployment name + "-" + 10 (ReplicaSet hash) + "-" + 5 characters: keep the
# Deployment's short enough that a pod's name stays a DNS label too.
MAX_DEPLOYMENT_NAME = 46
CREDENTIALS_DIR = "/var/run/clipper/credentials"  # where a model pod mounts its credentials Secret
CREDENTIALS_KEY = "credentials.json"
MODEL_UID = 10001  # the image's unprivileged user (deploy/Dockerfile)
PART_OF = "clipper"
MANAGED_BY = "clipper-frontend"
# The labels a model pod carries and the NetworkPolicies select on (deploy/kubernetes/networkpolicies.yaml).
COMPONENT_MODEL = "model-container"
ANNOTATION_MODEL = "clipper.io/model"  # the exact model name and version (labels must be sanitized)
ANNOTATION_VERSION = "clipper.io/model-version"
ANNOTATION_CREDENTIAL = "clipper.io/credential-id"
LABEL_FRONTEND = "clipper.io/frontend"  # the frontend pod a Deployment serves (absent: one outside the cluster)


# ------------------------------------------------------------------ settings and their checks
def check_namespace(value) -> str:
    if not isinstance(value, str) or not _DNS_LABEL.match(value):
        raise InvalidConfigError(f"kubernetes_namespace {value!r} is not a namespace name: 1-63 lowercase "
                                 f"letters, digits and '-', starting and ending with a letter or digit")
    return value


def check_image(value) -> str:
    if not isinstance(value, str) or not _IMAGE.match(value):
        raise InvalidConfigError(f"kubernetes_image {value!r} is not an image reference like "
                                 f"registry.example/clipper:0.1.0")
    return value


def check_rpc_address(value) -> str:
    """``tcp://HOST:PORT``, what a container dials."""
    m = re.match(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]{0,252}):(\d{1,5})$", value) \
        if isinstance(value, str) else None
    if m is None or not 0 < int(m.group(2)) < 65536:
        raise InvalidConfigError(f"kubernetes_rpc_address {value!r} is not an address like "
                                 f"tcp://clipper-rpc.clipper.svc:7000")
    return value


def check_config(cfg) -> None:
    """Check the ``kubernetes_*`` settings of a :class:`~clipper.config.FrontendConfig` (the values alone;
    what needs the environment, like a default namespace, is settled at start)."""
    if cfg.container_manager not in ("local", "kubernetes"):
        raise InvalidConfigError(f"container_manager {cfg.container_manager!r} is not 'local' or 'kubernetes'")
    if cfg.kubernetes_namespace is not None:
        check_namespace(cfg.kubernetes_namespace)
    if cfg.kubernetes_image is not None:
        check_image(cfg.kubernetes_image)
    if cfg.kubernetes_rpc_address is not None:
        check_rpc_address(cfg.kubernetes_rpc_address)
    if cfg.container_manager == "kubernetes" and cfg.kubernetes_image is None:
        raise InvalidConfigError("container_manager = \"kubernetes\" needs kubernetes_image: the image model "
                                 "containers run (the Clipper SDK and the models' code)")


def _default_resources() -> dict:
    return {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"cpu": "2", "memory": "2Gi"}}


@dataclass
class KubernetesSettings:
    """Where and how the manager runs model containers.

    ``owner``: the frontend's own Pod (``{"name", "uid"}``) when it runs in
    the cluster; its Deployments then carry the pod's name and an
    ``ownerReference`` to it. ``rpc_address``: what containers dial (the
    pod's own address when it has an owner).
    """

    namespace: str
    image: str
    rpc_address: str
    owner: dict | None = None
    image_pull_policy: str = "IfNotPresent"
    service_account: str | None = "clipper-model"  # no API token is mounted either way
    resources: dict = field(default_factory=_default_resources)

    def __post_init__(self) -> None:
        check_namespace(self.namespace)
        check_image(self.image)
        check_rpc_address(self.rpc_address)
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise InvalidConfigError(f"image pull policy {self.image_pull_policy!r} is not Always, "
                                     f"IfNotPresent or Never")
        if self.owner is not None:
            if not (isinstance(self.owner, dict) and isinstance(self.owner.get("name"), str)
                    and _DNS_LABEL.match(self.owner["name"]) and isinstance(self.owner.get("uid"), str)
                    and self.owner["uid"]):
                raise InvalidConfigError(f"owner {self.owner!r} is not a pod's {{'name', 'uid'}}")


# ------------------------------------------------------------------ names and labels
def _slug(text: str, max_len: int) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:max_len].strip("-") or "m"


def _digest(*parts: str, n: int = 8) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:n]


def credentials_secret_name(name: str, version: str) -> str:
    """The Secret holding the credentials of model ``name`` version ``version`` (one per model version,
    shared by the Deployments of every frontend). A DNS label; the digest of the exact name and version
    keeps two models whose names differ only in case or punctuation apart."""
    base = f"clipper-{_slug(f'{name}-{version}', MAX_DEPLOYMENT_NAME - 18)}-{_digest(name, version)}"
    return f"{base}-creds"


def deployment_name(name: str, version: str, frontend: str | None = None) -> str:
    """The Deployment running model ``name`` version ``version`` (for the frontend pod ``frontend``, if
    given): ``clipper-<slug>-<digest>``, a DNS label short enough for its pods' names."""
    digest = _digest(name, version, *( [frontend] if frontend else []))
    return f"clipper-{_slug(f'{name}-{version}', MAX_DEPLOYMENT_NAME - 8 - 1 - len(digest))}-{digest}"


def _label_value(text: str) -> str:
    v = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    v = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", v)
    return v


def model_labels(mv: ModelVersion, instance: str, frontend: str | None = None) -> dict:
    """The labels of a model's Deployment and pods (the selector is ``app.kubernetes.io/instance``)."""
    labels = {
        "app.kubernetes.io/name": "clipper-model",
        "app.kubernetes.io/instance": instance,
        "app.kubernetes.io/version": _label_value(mv.version) or "unknown",
        "app.kubernetes.io/component": COMPONENT_MODEL,
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "clipper.io/model-name": _label_value(mv.name) or "unknown",
    }
    if frontend:
        labels[LABEL_FRONTEND] = frontend
    return labels


# ------------------------------------------------------------------ manifests
def container_args(mv: ModelVersion, rpc_address: str) -> list[str]:
    """``python -m clipper.container``'s arguments for ``mv`` (a model with an ``entry``)."""
    assert mv.entry is not None
    args = [mv.entry, "--name", mv.name, "--version", mv.version, "--frontend", rpc_address,
            "--input-dtype", mv.input_dtype]
    if mv.input_shape:
        args += ["--input-shape", ",".join(str(d) for d in mv.input_shape)]
    return args


def build_credentials_secret(mv: ModelVersion, settings: KubernetesSettings, document: dict) -> dict:
    """The Secret holding ``document`` (a container credentials document, secret key included)."""
    name = credentials_secret_name(mv.name, mv.version)
    labels = model_labels(mv, name)
    labels["app.kubernetes.io/component"] = "model-credentials"
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": labels,
                     "annotations": {ANNOTATION_MODEL: mv.name, ANNOTATION_VERSION: mv.version,
                                     ANNOTATION_CREDENTIAL: str(document.get("id", ""))}},
        "type": "Opaque",
        "stringData": {CREDENTIALS_KEY: json.dumps(document, sort_keys=True)},
    }


def build_deployment(mv: ModelVersion, settings: KubernetesSettings) -> dict:
    """The Deployment running ``mv.replicas`` containers of ``mv``, mounting its credentials Secret."""
    if not (mv.entry or mv.command):
        raise InvalidConfigError(f"model {mv.key} has no entry or command: nothing to run in a container")
    if mv.closure is not None:
        raise InvalidConfigError(f"model {mv.key} is a closure, kept in a file on the frontend's disk; with "
                                 f"the kubernetes manager deploy an entry (module:function) in an image instead")
    frontend = settings.owner["name"] if settings.owner else None
    name = deployment_name(mv.name, mv.version, frontend)
    labels = model_labels(mv, name, frontend)
    env = [{"name": k, "value": v} for k, v in sorted(mv.env.items())
           if not k.startswith(("CLIPPER_CREDENTIALS", "CLIPPER_ADMIN_TOKEN"))]
    env += [{"name": "CLIPPER_CREDENTIALS_FILE", "value": f"{CREDENTIALS_DIR}/{CREDENTIALS_KEY}"},
            {"name": "CLIPPER_FRONTEND", "value": settings.rpc_address},
            {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},  # the root file system is read-only
            {"name": "HOME", "value": "/tmp"}]
    container = {
        "name": "model",
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "env": env,
        "resources": json.loads(json.dumps(settings.resources)),
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "credentials", "mountPath": CREDENTIALS_DIR, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }
    if mv.command:  # a full argv, run in the image
        container["command"] = list(mv.command)
    else:
        container["command"] = ["python", "-m", "clipper.container"]
        container["args"] = container_args(mv, settings.rpc_address)
    # (mv.workdir is ignored: it names a folder of the machine the deploy came from, which `clipper deploy`
    # always sends; a container runs in its image's WORKDIR, where relative entries are found.)
    pod_spec = {
        "automountServiceAccountToken": False,  # a model needs no access to the cluster's API
        "securityContext": {"runAsNonRoot": True, "runAsUser": MODEL_UID, "runAsGroup": MODEL_UID,
                            "fsGroup": MODEL_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [
            # 0440 and the pod's group: readable by the container's user only (fsGroup), no one else.
            {"name": "credentials", "secret": {"secretName": credentials_secret_name(mv.name, mv.version),
                                               "defaultMode": 0o440,
                                               "items": [{"key": CREDENTIALS_KEY, "path": CREDENTIALS_KEY}]}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
        ],
    }
    if settings.service_account:
        pod_spec["serviceAccountName"] = settings.service_account
    metadata = {"name": name, "namespace": settings.namespace, "labels": labels,
                "annotations": {ANNOTATION_MODEL: mv.name, ANNOTATION_VERSION: mv.version}}
    if settings.owner:
        # The frontend pod owns its Deployments: they go with it (no blockOwnerDeletion: that would need
        # the right to set finalizers on pods).
        metadata["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": settings.owner["name"],
                                        "uid": settings.owner["uid"], "controller": False}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": mv.replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/instance": name}},
            "template": {"metadata": {"labels": labels,
                                      "annotations": {ANNOTATION_MODEL: mv.name, ANNOTATION_VERSION: mv.version}},
                         "spec": pod_spec},
        },
    }


# ------------------------------------------------------------------ the API (blocking: call off the loop)
_SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class _Api:
    """The few calls the manager makes, on the official client. Every method blocks."""

    def __init__(self) -> None:
        try:
            import kubernetes
        except ImportError:
            raise InvalidConfigError("container_manager = \"kubernetes\" needs the kubernetes client: "
                                     "pip install 'clipper-serving[kubernetes]'") from None
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config()
            except (config.ConfigException, OSError) as exc:
                raise InvalidConfigError(f"no Kubernetes cluster to manage containers in: not in a pod, and no "
                                         f"kubeconfig ({exc})") from None
        self.ApiException = kubernetes.client.exceptions.ApiException
        self.client = client.ApiClient()
        self.apps = client.AppsV1Api(self.client)
        self.core = client.CoreV1Api(self.client)

    def read_secret_document(self, namespace: str, name: str) -> dict | None:
        try:
            s = self.core.read_namespaced_secret(name, namespace)
        except self.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        import base64

        raw = (s.data or {}).get(CREDENTIALS_KEY)
        try:
            return json.loads(base64.b64decode(raw)) if raw else None
        except ValueError:
            return None

    def put_secret(self, body: dict) -> None:
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        try:
            self.core.create_namespaced_secret(ns, body)  # type: ignore[arg-type]  # (the client takes a dict body)
        except self.ApiException as exc:
            if exc.status != 409:
                raise
            self.core.replace_namespaced_secret(name, ns, body)  # type: ignore[arg-type]

    def apply_deployment(self, body: dict) -> dict:
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        try:
            d = self.apps.create_namespaced_deployment(ns, body)  # type: ignore[arg-type]
        except self.ApiException as exc:
            if exc.status != 409:
                raise
            d = self.apps.patch_namespaced_deployment(name, ns, body)  # a strategic merge of the whole object
        return {"replicas": d.spec.replicas, "ready_replicas": (d.status.ready_replicas or 0) if d.status else 0}

    def deployment_status(self, namespace: str, name: str) -> dict | None:
        try:
            d = self.apps.read_namespaced_deployment(name, namespace)
        except self.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        st = d.status
        return {"replicas": d.spec.replicas, "ready_replicas": (st.ready_replicas or 0) if st else 0,
                "available_replicas": (st.available_replicas or 0) if st else 0}

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        call = self.apps.delete_namespaced_deployment if kind == "Deployment" else self.core.delete_namespaced_secret
        try:
            # Background: the object goes now (a redeploy under the same name can create it again at
            # once); the garbage collector then deletes its ReplicaSets and pods.
            call(name, namespace, propagation_policy="Background")
        except self.ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def close(self) -> None:
        self.client.close()


def _reason(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status is not None:
        body = getattr(exc, "body", None)
        try:
            message = json.loads(body).get("message") if body else None
        except (ValueError, AttributeError):
            message = None
        return f"HTTP {status} {reason}" + (f": {message}" if message else "")
    return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------ the manager
class KubernetesManager:
    """Runs each model version's replicas as a Deployment (see the module's docstring)."""

    def __init__(self, settings: KubernetesSettings, *, keyring, store=None, delete_on_close: bool = False,
                 api=None) -> None:
        self.settings = settings
        self.keyring = keyring
        self.store = store  # the shared state store: is a credential another frontend issued still valid?
        self.delete_on_close = delete_on_close
        # (model key, return code, text): the frontend sets it; the kubelet restarts pods
        self.on_failure: Callable[[str, int, str], None] | None = None
        self._api = api
        self._locks: dict[str, asyncio.Lock] = {}
        self.deployments: dict[str, dict] = {}  # model key -> {"deployment", "secret", "replicas", ...}

    @classmethod
    def from_config(cls, cfg, *, keyring, store=None, environ=None) -> "KubernetesManager":
        """Settings from the frontend's config and, in a pod, the downward API's variables
        (``CLIPPER_POD_NAME``, ``CLIPPER_POD_UID``, ``CLIPPER_POD_IP``, ``CLIPPER_POD_NAMESPACE``)."""
        env = os.environ if environ is None else environ
        check_config(cfg)
        if keyring is None or keyring.mode != "curve":
            raise InvalidConfigError("container_manager = \"kubernetes\" needs rpc_security = \"curve\": model "
                                     "containers reach the frontend over the network")
        from ..security.net import is_loopback_host

        if is_loopback_host(cfg.rpc_host):
            raise InvalidConfigError(f"container_manager = \"kubernetes\": rpc_host {cfg.rpc_host!r} is a loopback "
                                     f"address, which containers in other pods cannot reach (use \"0.0.0.0\")")
        owner = None
        pod_name, pod_uid, pod_ip = (env.get("CLIPPER_POD_NAME"), env.get("CLIPPER_POD_UID"),
                                     env.get("CLIPPER_POD_IP"))
        if pod_name and pod_uid:
            owner = {"name": pod_name, "uid": pod_uid}
        address = cfg.kubernetes_rpc_address
        if address is None:
            if not pod_ip:
                raise InvalidConfigError("container_manager = \"kubernetes\" outside a pod needs "
                                         "kubernetes_rpc_address: where model containers reach this frontend")
            host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
            address = f"tcp://{host}:{cfg.rpc_port}"
        namespace = cfg.kubernetes_namespace or env.get("CLIPPER_POD_NAMESPACE") or _pod_namespace() or "default"
        return cls(KubernetesSettings(namespace, cfg.kubernetes_image, address, owner=owner),
                   keyring=keyring, store=store)

    # ---------------------------------------------------------------- the manager interface
    def manages(self, mv: ModelVersion) -> bool:
        return bool(mv.entry or mv.command) and mv.closure is None

    async def ensure(self, mv: ModelVersion) -> None:
        """Make this frontend's Deployment of ``mv`` run ``mv.replicas`` containers (creating it, and the
        credentials Secret when none holds a valid credential, the first time)."""
        if not self.manages(mv):
            if mv.closure is not None:
                log.error("model %s is a closure: the kubernetes manager runs entries in images, not closures "
                          "kept on the frontend's disk; no containers started", mv.key)
            return
        deployment = build_deployment(mv, self.settings)  # checks what can be checked before any call
        async with self._lock(mv.key):
            api = await self._client()
            secret = credentials_secret_name(mv.name, mv.version)
            ns = self.settings.namespace
            try:
                doc = await asyncio.to_thread(api.read_secret_document, ns, secret)
                if not await self._still_valid(doc, mv):
                    doc = self.issue_document(mv)
                    await asyncio.to_thread(api.put_secret, build_credentials_secret(mv, self.settings, doc))
                status = await asyncio.to_thread(api.apply_deployment, deployment)
                assert doc is not None  # (valid, or issued just now)
            except (InvalidConfigError, ContainerFailedError):
                raise
            except Exception as exc:
                raise ContainerFailedError(f"kubernetes: cannot run model {mv.key} as Deployment "
                                           f"{deployment['metadata']['name']} in namespace {ns}: "
                                           f"{_reason(exc)}") from None
            self.deployments[mv.key] = {"deployment": deployment["metadata"]["name"], "secret": secret,
                                        "namespace": ns, "replicas": mv.replicas,
                                        "credential_id": doc.get("id"), **status}
            log.info("model %s: Deployment %s/%s at %d replicas", mv.key, ns, deployment["metadata"]["name"],
                     mv.replicas)

    async def remove(self, key: str, *, keep_secret: bool = False) -> None:
        """Delete this frontend's Deployment of model version ``key`` and the version's credentials Secret
        (its credentials were revoked with the version; ``keep_secret``: other frontends still use them).
        Errors are logged, not raised: the model is gone from the registry whatever the cluster says."""
        name, _, version = key.rpartition(":")
        info = self.deployments.pop(key, None)
        frontend = self.settings.owner["name"] if self.settings.owner else None
        targets = [("Deployment", info["deployment"] if info else deployment_name(name, version, frontend))]
        if not keep_secret:
            targets.append(("Secret", credentials_secret_name(name, version)))
        async with self._lock(key):
            for kind, obj in targets:
                try:
                    api = await self._client()
                    await asyncio.to_thread(api.delete, kind, self.settings.namespace, obj)
                except Exception as exc:
                    log.error("kubernetes: cannot delete the %s %s of model %s: %s", kind, obj, key, _reason(exc))
        self._locks.pop(key, None)

    async def close(self) -> None:
        """Leave the Deployments running (the cluster owns them), unless made with ``delete_on_close``."""
        if self.delete_on_close:  # this frontend's Deployments; the models' credentials stay for the others
            for key in list(self.deployments):
                await self.remove(key, keep_secret=True)
        if self._api is not None:
            api, self._api = self._api, None
            await asyncio.to_thread(api.close)

    def kill(self, grant) -> bool:
        """Never: the manager holds no process handle, and a pod is the kubelet's. The frontend has dropped
        the hung replica already; a container that exits is restarted by Kubernetes."""
        return False

    def pids(self, key: str) -> list[int]:
        return []  # containers run in pods, not as processes of this machine

    def stats(self) -> dict:
        """Per model version, this frontend's Deployment as last seen (``refresh`` reads it again)."""
        return {key: [dict(info)] for key, info in self.deployments.items()}

    async def refresh(self, key: str) -> dict | None:
        """Read the Deployment of ``key`` from the cluster (its ready replicas), off the loop."""
        info = self.deployments.get(key)
        if info is None:
            return None
        api = await self._client()
        status = await asyncio.to_thread(api.deployment_status, info["namespace"], info["deployment"])
        if status is not None:
            info.update(status)
        return status

    # ---------------------------------------------------------------- helpers
    def issue_document(self, mv: ModelVersion) -> dict:
        """New credentials for ``mv``'s containers, as the document its Secret holds. Origin "operator":
        the public half goes to the state store, so every frontend sharing it accepts them, and deleting
        the model version revokes them."""
        from ..security.container_keys import ContainerCredentials

        grant, secret = self.keyring.issue(mv.name, mv.version, origin="operator",
                                           label=f"kubernetes Deployments of {mv.key} in {self.settings.namespace}")
        return ContainerCredentials.document(grant, secret, self.keyring.public_key, self.settings.rpc_address)

    def _lock(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    async def _client(self) -> _Api:
        if self._api is None:
            self._api = await asyncio.to_thread(_Api)  # reads the kubeconfig or the pod's token: off the loop
        return self._api

    async def _still_valid(self, doc: dict | None, mv: ModelVersion) -> bool:
        """Whether the credentials in an existing Secret may be used again: made for this model version,
        for this frontend's server key, and not revoked (known here, or to the shared store)."""
        if not isinstance(doc, dict) or doc.get("model") != mv.name or doc.get("version") not in (None, mv.version):
            return False
        if doc.get("server_public_key") != self.keyring.public_key.decode():
            return False  # issued by frontends with another server key pair: useless against this one
        gid = doc.get("id")
        grant = self.keyring.get(gid)
        if grant is not None:
            return grant.origin == "operator"
        if getattr(self.store, "subscribe", None) is None or not isinstance(gid, str):
            return False  # no store shared with other frontends: what this keyring does not know is gone
        from ..security.container_keys import STORE_NAMESPACE

        # Another frontend issued it a moment ago and this one has not caught up yet: the store knows.
        try:
            return await asyncio.to_thread(self.store.load, STORE_NAMESPACE, gid) is not None
        except Exception:
            return False


def _pod_namespace() -> str | None:
    try:
        return _SA_NAMESPACE_FILE.read_text().strip() or None
    except OSError:
        return None
