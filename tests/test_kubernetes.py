"""Kubernetes: the manifests under deploy/kubernetes and the objects the Kubernetes manager builds.

Everything here runs offline: each kustomization is rendered (``kubectl
kustomize``, or, where kubectl is missing, by reading its resources and
generators here) and every object is validated against the Kubernetes JSON
schemas (``kubernetes-validate``, strict: an unknown field fails). Then what a
schema cannot say: names, labels, probes on the frontend's real endpoints,
security contexts, NetworkPolicies evaluated for who reaches which port, the
frontend's config and command line parsed by Clipper itself, and a model
Deployment's container run as a local process against a real frontend.

``test_cluster_end_to_end`` runs against a real cluster when ``KUBECONFIG``
names one (image: ``CLIPPER_K8S_TEST_IMAGE``, default ``clipper-serving:0.1.0``;
namespace: ``CLIPPER_K8S_TEST_NAMESPACE``, default ``default``) and skips
otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is in the test extra: scripts/setup.sh test")
kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra: scripts/setup.sh test")

from clipper.config import FrontendConfig, load_config_file  # noqa: E402
from clipper.errors import InvalidConfigError  # noqa: E402
from clipper.management import kubernetes_manager as km  # noqa: E402
from clipper.management.registry import Application, ModelVersion  # noqa: E402
from clipper.security.container_keys import SERVER_KEY_NAME, ContainerCredentials, ContainerKeyring  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KDIR = ROOT / "deploy" / "kubernetes"
KUBECTL = shutil.which("kubectl")
# The oldest Kubernetes the manifests promise to work with (the kubernetes client >= 29), and the newest
# schemas the validator knows.
K8S_VERSIONS = ["1.29", kv.utils.latest_version()]
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
NAMESPACED = {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Secret", "Service", "Deployment",
              "StatefulSet", "NetworkPolicy"}


# ------------------------------------------------------------------ rendering
def _fill_generated_files(folder: Path) -> None:
    """The files the generator kustomizations read (the operator makes them; here, test values)."""
    if (folder / "secrets").is_dir():
        import zmq.auth

        zmq.auth.create_certificates(str(folder / "secrets"), SERVER_KEY_NAME)
        (folder / "secrets" / "admin-token").write_text("t" * 43)
        (folder / "secrets" / "redis-password").write_text("p" * 32)
    if (folder / "model-container").is_dir():
        keyring = ContainerKeyring.open("curve", None)
        grant, secret = keyring.issue("digits-logreg", "1")
        doc = ContainerCredentials.document(grant, secret, keyring.public_key, "tcp://clipper-rpc:7000")
        (folder / "model-container" / "credentials.json").write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def deploy_copy(tmp_path_factory) -> Path:
    """deploy/kubernetes copied, with the git-ignored input files of its generators made."""
    dest = tmp_path_factory.mktemp("deploy") / "kubernetes"
    shutil.copytree(KDIR, dest)
    _fill_generated_files(dest)
    return dest


def _kustomizations(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("kustomization.yaml"))


def render_kubectl(folder: Path) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {folder}: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def render_by_hand(folder: Path) -> list[dict]:
    """What kustomize makes of the features these kustomizations use: resources, namespace, labels
    (not in selectors), secretGenerator (without the name hash when disabled), images (newTag)."""
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(k) <= {"apiVersion", "kind", "namespace", "labels", "resources", "images", "secretGenerator",
                      "generatorOptions"}, f"{folder}: a kustomize feature this fallback does not know"
    objs = []
    for res in k.get("resources", []):
        objs += [d for d in yaml.safe_load_all((folder / res).read_text()) if d]
    opts = k.get("generatorOptions", {})
    for gen in k.get("secretGenerator", []):
        data = {Path(f).name: base64.b64encode((folder / f).read_bytes()).decode() for f in gen["files"]}
        objs.append({"apiVersion": "v1", "kind": "Secret", "type": gen.get("type", "Opaque"),
                     "metadata": {"name": gen["name"], **({"labels": dict(opts["labels"])} if "labels" in opts
                                                          else {})},
                     "data": data})
    extra = {}
    for entry in k.get("labels", []):
        extra.update(entry["pairs"])
    for obj in objs:
        meta = obj["metadata"]
        if k.get("namespace") and obj["kind"] in NAMESPACED:
            meta["namespace"] = k["namespace"]
        if extra:
            meta["labels"] = {**meta.get("labels", {}), **extra}
        for c in _containers(obj):
            for img in k.get("images", []):
                if c["image"] == img["name"]:
                    c["image"] = f"{img.get('newName', img['name'])}:{img['newTag']}"
    return objs


RENDERERS = {"kubectl": render_kubectl, "by-hand": render_by_hand}


def renderers() -> list:
    return [pytest.param("kubectl", marks=pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed "
                                                             "(the by-hand rendering still runs)")), "by-hand"]


def _pod_spec(obj: dict) -> dict | None:
    if obj["kind"] in ("Deployment", "StatefulSet"):
        return obj["spec"]["template"]["spec"]
    return None


def _containers(obj: dict, init: bool = True) -> list[dict]:
    spec = _pod_spec(obj)
    if spec is None:
        return []
    return list(spec.get("initContainers", []) if init else []) + list(spec["containers"])


def validate(obj: dict) -> None:
    for version in K8S_VERSIONS:
        kv.validate(obj, version, strict=True)


def find(objs: list[dict], kind: str, name: str) -> dict:
    for o in objs:
        if o["kind"] == kind and o["metadata"]["name"] == name:
            return o
    raise AssertionError(f"no {kind} {name} in {[(o['kind'], o['metadata']['name']) for o in objs]}")


@pytest.fixture(scope="module")
def base(deploy_copy) -> list[dict]:
    return render_kubectl(deploy_copy) if KUBECTL else render_by_hand(deploy_copy)


# ------------------------------------------------------------------ every manifest is valid
def test_every_kustomization_is_found():
    assert {p.relative_to(KDIR).as_posix() for p in _kustomizations(KDIR)} == {".", "secrets", "model-container"}


@pytest.mark.parametrize("how", renderers())
def test_every_kustomization_renders_and_validates(deploy_copy, how):
    kinds = set()
    for folder in _kustomizations(deploy_copy):
        objs = RENDERERS[how](folder)
        assert objs, f"{folder} rendered nothing"
        for obj in objs:
            validate(obj)  # raises with the path of the bad field
            kinds.add(obj["kind"])
            meta = obj["metadata"]
            assert DNS_LABEL.match(meta["name"]), meta["name"]
            if obj["kind"] in NAMESPACED:
                assert meta.get("namespace") == "clipper", (obj["kind"], meta["name"])
            assert all(LABEL_VALUE.match(v) and len(v) <= 63 for v in meta.get("labels", {}).values())
    assert kinds >= {"Namespace", "Deployment", "StatefulSet", "Service", "NetworkPolicy", "Secret", "ConfigMap",
                     "Role", "RoleBinding", "ServiceAccount"}


def test_the_two_renderings_agree(deploy_copy):
    """The by-hand rendering (for machines without kubectl) makes what kustomize makes, object for object
    (kustomize's hash suffix on generated names aside)."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: only the by-hand rendering runs")
    for folder in _kustomizations(deploy_copy):
        k = yaml.safe_load((folder / "kustomization.yaml").read_text())
        text = json.dumps(render_kubectl(folder))
        for gen in k.get("secretGenerator", []):
            text = re.sub(rf'"{re.escape(gen["name"])}-[a-z0-9]{{10}}"', f'"{gen["name"]}"', text)

        def normal(objs):
            for o in objs:
                if "data" in o and o["kind"] == "Secret":  # (kustomize wraps its base64 lines)
                    o["data"] = {k: base64.b64decode(v) for k, v in o["data"].items()}
            return sorted(objs, key=lambda o: (o["kind"], o["metadata"]["name"]))

        assert normal(json.loads(text)) == normal(render_by_hand(folder)), folder


def test_every_yaml_file_parses_and_its_objects_validate():
    files = sorted(KDIR.rglob("*.yaml"))
    assert len(files) >= 10
    for f in files:
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d]
        assert docs, f
        for d in docs:
            if d.get("kind") == "Kustomization":
                assert d["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
                for res in d.get("resources", []):
                    assert (f.parent / res).is_file(), f"{f}: resource {res} is missing"
                continue
            validate(d)


def test_the_validator_rejects_what_it_should():
    """Strict validation is what makes the checks above worth something: an unknown field, a missing
    required one and a wrong type each fail."""
    good = find(render_by_hand(KDIR), "Service", "clipper-query")
    validate(good)
    for bad in (
        {**good, "spec": {**good["spec"], "portz": []}},
        {**good, "spec": {**good["spec"], "ports": [{"name": "rest"}]}},
        {**good, "spec": {**good["spec"], "publishNotReadyAddresses": "yes"}},
    ):
        with pytest.raises(kv.ValidationError):
            kv.validate(bad, K8S_VERSIONS[0], strict=True)


# ------------------------------------------------------------------ what a schema cannot say
def test_pods_are_locked_down(base, deploy_copy):
    """Non-root, no privilege escalation, read-only root, every capability dropped, the runtime's seccomp
    profile, requests and limits: the "restricted" Pod Security Standard the namespace enforces."""
    ns = find(base, "Namespace", "clipper")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    model = render_by_hand(deploy_copy / "model-container")
    workloads = [o for o in base + model if _pod_spec(o) is not None]
    assert {o["metadata"]["name"] for o in workloads} == {"clipper-frontend", "redis", "digits-logreg-1"}
    for o in workloads:
        spec = _pod_spec(o)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] > 0
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in _containers(o):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert set(c["resources"]) == {"requests", "limits"}
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) & set(c["resources"]["limits"])


def test_frontend_command_and_config_are_clipper_s_own(base, deploy_copy):
    """The frontend's args parse with `clipper`'s own parser, its config file loads as a FrontendConfig that
    runs containers in the cluster, and what they name (Redis, the image) exists in the rendering."""
    from clipper.cli import build_parser

    fe = find(base, "Deployment", "clipper-frontend")
    assert fe["spec"]["replicas"] >= 2
    c = fe["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][:2] == ["clipper", "start"]
    args = build_parser().parse_args(c["args"][1:])
    assert args.config == "/var/lib/clipper/clipper.toml"
    m = re.match(r"^redis://:\$\(REDIS_PASSWORD\)@([a-z0-9-]+):(\d+)/0$", args.state_path)
    assert m, args.state_path
    redis_svc = find(base, "Service", m.group(1))
    assert [p["port"] for p in redis_svc["spec"]["ports"]] == [int(m.group(2))]
    env = {e["name"]: e for e in c["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "clipper-secrets"
    assert {"CLIPPER_POD_NAME", "CLIPPER_POD_UID", "CLIPPER_POD_IP", "CLIPPER_POD_NAMESPACE"} <= set(env)
    assert env["CLIPPER_POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"

    cm = find(base, "ConfigMap", "clipper-frontend")
    mount = next(v for v in c["volumeMounts"] if v["mountPath"] == args.config)
    cfg_file = deploy_copy / "clipper.toml"
    cfg_file.write_text(cm["data"][mount["subPath"]])
    cfg = load_config_file(cfg_file)["frontend"]
    assert cfg.container_manager == "kubernetes" and cfg.rpc_security == "curve"
    assert cfg.host == "0.0.0.0" and cfg.rpc_host == "0.0.0.0" and cfg.admin_host == "127.0.0.1"
    assert cfg.kubernetes_image == c["image"], "models must run the image the frontends run (kustomize's tag)"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"rest": cfg.rest_port, "msgpack": cfg.query_port, "admin": cfg.admin_port,
                     "metrics": cfg.metrics_port, "rpc": cfg.rpc_port}
    # The manager's settings as the pod would make them: containers dial this pod, which owns them.
    mgr = km.KubernetesManager.from_config(cfg, keyring=ContainerKeyring.open("curve", None), environ={
        "CLIPPER_POD_NAME": "clipper-frontend-5d9c-x2x7q", "CLIPPER_POD_UID": "0b5e", "CLIPPER_POD_IP": "10.1.2.3",
        "CLIPPER_POD_NAMESPACE": "clipper"})
    assert mgr.settings.rpc_address == f"tcp://10.1.2.3:{cfg.rpc_port}"
    assert mgr.settings.namespace == "clipper" and mgr.settings.owner == {"name": "clipper-frontend-5d9c-x2x7q",
                                                                          "uid": "0b5e"}


def test_frontend_secrets_reach_the_folder_the_frontend_reads(base, deploy_copy):
    """The Secret's files are those the keyring and the admin API read, copied by the init container into
    the secrets folder beside the config file (where a frontend with a Redis store looks)."""
    secret = render_by_hand(deploy_copy / "secrets")[0]
    assert set(secret["data"]) == {"admin-token", f"{SERVER_KEY_NAME}.key", f"{SERVER_KEY_NAME}.key_secret",
                                   "redis-password"}
    spec = find(base, "Deployment", "clipper-frontend")["spec"]["template"]["spec"]
    vol = next(v for v in spec["volumes"] if v.get("secret"))
    assert vol["secret"]["secretName"] == secret["metadata"]["name"]
    copied = {i["path"] for i in vol["secret"]["items"]}
    assert copied == {"admin-token", f"{SERVER_KEY_NAME}.key", f"{SERVER_KEY_NAME}.key_secret"}
    init = spec["initContainers"][0]
    script = init["command"][-1]
    for name in copied:
        assert f"/etc/clipper/secrets/{name}" in script
    assert "install -d -m 0700 /var/lib/clipper/clipper-secrets" in script and "install -m 0600" in script
    # The copied key pair loads as the frontend loads it (a 0700 folder of ours, 0600 files).
    folder = deploy_copy / "home" / "clipper-secrets"
    folder.mkdir(parents=True, mode=0o700)
    for name in copied:
        (folder / name).write_bytes(base64.b64decode(secret["data"][name]))
        os.chmod(folder / name, 0o600)
    keyring = ContainerKeyring.open("curve", folder)
    assert keyring.public_key.decode() in base64.b64decode(secret["data"][f"{SERVER_KEY_NAME}.key"]).decode()


def test_frontend_probes_hit_the_frontend_s_real_endpoints(base, frontend_factory):
    """Readiness on /readyz (503 until every application has a connected replica), liveness on /healthz,
    both on the REST port, asked of a real frontend."""
    c = find(base, "Deployment", "clipper-frontend")["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports[c["readinessProbe"]["httpGet"]["port"]] == 1337
    assert ports[c["livenessProbe"]["httpGet"]["port"]] == 1337
    rf = frontend_factory()

    def get(path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{rf.fe.rest_port}{path}", timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    ready, live, start = (c[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe", "startupProbe"))
    assert get(ready) == 200 and get(live) == 200 and get(start) == 200
    rf.call(rf.fe.register_application(Application("probe-app", "float32", [4], slo_ms=100)))
    assert get(ready) == 503, "an application without a replica here: no queries for this frontend"
    assert get(live) == 200


def test_services_select_the_frontends_and_name_their_ports(base):
    fe = find(base, "Deployment", "clipper-frontend")
    labels = fe["spec"]["template"]["metadata"]["labels"]
    c = fe["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"] for p in c["ports"]}
    wanted = {"clipper-query": {1337, 1339}, "clipper-rpc": {7000}, "clipper-metrics": {1390}}
    for name, numbers in wanted.items():
        svc = find(base, "Service", name)
        assert svc["spec"]["selector"].items() <= labels.items()
        assert {p["port"] for p in svc["spec"]["ports"]} == numbers
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
    assert find(base, "Service", "clipper-rpc")["spec"]["publishNotReadyAddresses"] is True
    assert not any(p["port"] == 1338 for o in base if o["kind"] == "Service" for p in o["spec"]["ports"]), \
        "the admin API has no Service: it listens on loopback (kubectl port-forward)"


def test_rbac_grants_what_the_manager_calls_and_no_more(base):
    role = find(base, "Role", "clipper-container-manager")
    rules = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert set(rules) == {("apps", "deployments"), ("", "secrets")}
    assert {"get", "create", "patch", "delete"} <= rules[("apps", "deployments")]
    assert {"get", "create", "update", "delete"} <= rules[("", "secrets")]
    assert "list" not in rules[("", "secrets")], "the frontends read only the Secrets they name"
    binding = find(base, "RoleBinding", "clipper-frontend-container-manager")
    fe_sa = find(base, "Deployment", "clipper-frontend")["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": fe_sa, "namespace": "clipper"}]
    assert find(base, "ServiceAccount", fe_sa)
    model_sa = find(base, "ServiceAccount", km.KubernetesSettings("clipper", "x:1", "tcp://a:7000").service_account)
    assert model_sa["automountServiceAccountToken"] is False


# ------------------------------------------------------------------ NetworkPolicies, evaluated
def _matches(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "this evaluator knows matchLabels only"
    return selector.get("matchLabels", {}).items() <= labels.items()


def allowed(policies: list[dict], src: dict | None, dst: dict, port: int, *, dst_here: bool = True) -> bool:
    """May a pod with labels ``src`` in this namespace (None: anything outside it) open ``port`` on a pod
    with labels ``dst`` (in this namespace, or another one: ``dst_here`` False)? Ingress on ``dst``'s side
    and egress on ``src``'s, as NetworkPolicies say."""
    def peer_ok(peers, labels, here) -> bool:
        for peer in peers:
            if "namespaceSelector" in peer:  # (every namespaceSelector here is {}: any namespace)
                if labels is None or "podSelector" not in peer or _matches(peer["podSelector"], labels):
                    return True
            elif "podSelector" in peer and here and labels is not None and _matches(peer["podSelector"], labels):
                return True
        return False

    def rule_ok(rules, key, labels, here=True) -> bool:
        for rule in rules:
            ports = [p["port"] for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            if key not in rule or peer_ok(rule[key], labels, here):
                return True
        return False

    ingress = [p["spec"] for p in policies if dst_here and "Ingress" in p["spec"]["policyTypes"]
               and _matches(p["spec"]["podSelector"], dst)]
    if ingress and not any(rule_ok(s.get("ingress", []), "from", src) for s in ingress):
        return False
    if src is not None:
        egress = [p["spec"] for p in policies if "Egress" in p["spec"]["policyTypes"]
                  and _matches(p["spec"]["podSelector"], src)]
        if egress and not any(rule_ok(s.get("egress", []), "to", dst, dst_here) for s in egress):
            return False
    return True


def test_network_policies(base):
    """Only model containers reach the container RPC; only frontends reach Redis; the admin and metrics
    ports only from this namespace; queries from anywhere; models reach nothing but the RPC (and DNS)."""
    policies = [o for o in base if o["kind"] == "NetworkPolicy"]
    labels = {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"] for o in base if _pod_spec(o)}
    fe, redis = labels["clipper-frontend"], labels["redis"]
    settings = km.KubernetesSettings("clipper", "clipper-serving:0.1.0", "tcp://10.0.0.1:7000",
                                     owner={"name": "clipper-frontend-1", "uid": "u"})
    model = km.build_deployment(ModelVersion("m", "1", "float32", [4], entry="x:f"),
                                settings)["spec"]["template"]["metadata"]["labels"]
    other = {"app": "something-else"}  # another pod of the namespace
    dns = {"k8s-app": "kube-dns"}
    outside = None
    assert allowed(policies, model, fe, 7000)
    assert not allowed(policies, other, fe, 7000) and not allowed(policies, outside, fe, 7000)
    assert not allowed(policies, fe, fe, 7000)
    assert allowed(policies, fe, redis, 6379)
    for src in (model, other, outside):
        assert not allowed(policies, src, redis, 6379)
    for port in (1337, 1339):
        assert allowed(policies, outside, fe, port) and allowed(policies, other, fe, port)
    for port in (1338, 1390):
        assert allowed(policies, other, fe, port) and not allowed(policies, outside, fe, port)
    assert not allowed(policies, model, redis, 6379) and not allowed(policies, model, fe, 1338)
    assert not allowed(policies, model, other, 80), "a model container reaches nothing but the RPC"
    assert allowed(policies, model, dns, 53, dst_here=False)
    assert not allowed(policies, model, dns, 443, dst_here=False)
    assert not allowed(policies, model, fe, 7000, dst_here=False), "another namespace's frontends: no"
    assert not allowed(policies, outside, model, 8080), "nothing reaches a model container"


# ------------------------------------------------------------------ the manager's objects
SETTINGS = km.KubernetesSettings("clipper", "registry.example/clipper-serving:0.1.0", "tcp://10.1.2.3:7000",
                                 owner={"name": "clipper-frontend-5d9c-x2x7q", "uid": "7c0e-11"})


def _mv(**kw) -> ModelVersion:
    base = dict(name="Digits_LogReg", version="3", input_dtype="float64", input_shape=[64],
                entry="model.py:predict", replicas=3, env={"OMP_NUM_THREADS": "1"})
    base.update(kw)
    return ModelVersion(**base)


def test_built_deployment_and_secret_validate_and_say_what_they_run():
    mv = _mv()
    keyring = ContainerKeyring.open("curve", None)
    mgr = km.KubernetesManager(SETTINGS, keyring=keyring)
    doc = mgr.issue_document(mv)
    secret = km.build_credentials_secret(mv, SETTINGS, doc)
    dep = km.build_deployment(mv, SETTINGS)
    validate(secret)
    validate(dep)

    name = dep["metadata"]["name"]
    assert name == km.deployment_name(mv.name, mv.version, SETTINGS.owner["name"])
    assert DNS_LABEL.match(name) and len(name) <= km.MAX_DEPLOYMENT_NAME and name.startswith("clipper-digits-logreg-3-")
    assert dep["metadata"]["namespace"] == secret["metadata"]["namespace"] == "clipper"
    labels = dep["metadata"]["labels"]
    assert labels["app.kubernetes.io/instance"] == name
    assert labels["app.kubernetes.io/component"] == "model-container"
    assert labels["app.kubernetes.io/managed-by"] == "clipper-frontend"
    assert labels["app.kubernetes.io/version"] == "3" and labels["clipper.io/model-name"] == "Digits_LogReg"
    assert labels["clipper.io/frontend"] == SETTINGS.owner["name"]
    assert all(LABEL_VALUE.match(v) for v in labels.values())
    spec = dep["spec"]
    assert spec["replicas"] == 3
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert dep["metadata"]["annotations"] == {"clipper.io/model": "Digits_LogReg", "clipper.io/model-version": "3"}
    assert dep["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "name": SETTINGS.owner["name"],
                                                   "uid": SETTINGS.owner["uid"], "controller": False}]

    pod = spec["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"] == "clipper-model"
    (c,) = pod["containers"]
    assert c["image"] == SETTINGS.image
    assert c["command"] == ["python", "-m", "clipper.container"]
    assert c["args"] == ["model.py:predict", "--name", "Digits_LogReg", "--version", "3", "--frontend",
                         "tcp://10.1.2.3:7000", "--input-dtype", "float64", "--input-shape", "64"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["OMP_NUM_THREADS"] == "1"
    # The credentials: the Secret's one key, mounted read-only where CLIPPER_CREDENTIALS_FILE points.
    vol = next(v for v in pod["volumes"] if v["name"] == "credentials")
    assert vol["secret"]["secretName"] == secret["metadata"]["name"] == km.credentials_secret_name(mv.name, mv.version)
    mount = next(m for m in c["volumeMounts"] if m["name"] == "credentials")
    assert mount["readOnly"] is True
    assert env["CLIPPER_CREDENTIALS_FILE"] == f"{mount['mountPath']}/{vol['secret']['items'][0]['path']}"
    assert vol["secret"]["items"][0]["key"] in secret["stringData"]
    creds = ContainerCredentials.loads(secret["stringData"][vol["secret"]["items"][0]["key"]])
    assert (creds.model, creds.version, creds.mechanism) == ("Digits_LogReg", "3", "curve")
    assert creds.server_public_key == keyring.public_key and creds.frontend == SETTINGS.rpc_address
    grant = keyring.get(creds.id)
    assert grant is not None and grant.origin == "operator" and grant.public_key == creds.public_key
    assert secret["metadata"]["annotations"]["clipper.io/credential-id"] == creds.id


def test_replicas_and_names_follow_the_model():
    for n in (0, 1, 2, 64):
        assert km.build_deployment(_mv(replicas=n), SETTINGS)["spec"]["replicas"] == n
    # Names that sanitize alike stay apart; each frontend has its own Deployment; the Secret is shared.
    a = km.deployment_name("Digits_LogReg", "3", "fe-a")
    assert a != km.deployment_name("digits-logreg", "3", "fe-a")
    assert a != km.deployment_name("Digits_LogReg", "3", "fe-b")
    assert a != km.deployment_name("Digits_LogReg", "3")
    assert km.credentials_secret_name("Digits_LogReg", "3") != km.credentials_secret_name("digits-logreg", "3")
    for name, version in (("a" * 128, "v" * 128), ("X.", "-1"), ("9", "_"), ("Ünï", "1")):
        for fe in (None, "clipper-frontend-5d9c-x2x7q"):
            d = km.deployment_name(name, version, fe)
            assert DNS_LABEL.match(d) and len(d) <= km.MAX_DEPLOYMENT_NAME, d
        assert DNS_LABEL.match(km.credentials_secret_name(name, version))
    # Model and version names as labels: sanitized, never invalid.
    odd = km.build_deployment(ModelVersion("x" * 100 + ".", "1.0-", "float32", [1], entry="m:f"), SETTINGS)
    validate(odd)
    assert all(LABEL_VALUE.match(v) and len(v) <= 63 for v in odd["metadata"]["labels"].values())


def test_without_an_owner_and_with_a_command():
    settings = km.KubernetesSettings("models", "clipper-serving:0.1.0", "tcp://clipper-rpc.clipper.svc:7000")
    mv = _mv(entry=None, command=["python", "/models/serve.py", "--port", "0"], workdir="/models")
    dep = km.build_deployment(mv, settings)
    validate(dep)
    assert "ownerReferences" not in dep["metadata"] and "clipper.io/frontend" not in dep["metadata"]["labels"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == mv.command and "args" not in c
    assert "workingDir" not in c, "a folder of the deploying machine means nothing in the image"
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["CLIPPER_FRONTEND"] == "tcp://clipper-rpc.clipper.svc:7000"


def test_what_the_manager_will_not_run():
    mgr = km.KubernetesManager(SETTINGS, keyring=ContainerKeyring.open("curve", None))
    closure = _mv(entry="closure:/var/lib/clipper/clipper-closures/f.pkl", closure={"python": "3.11"})
    assert not mgr.manages(closure) and not mgr.manages(_mv(entry=None))
    with pytest.raises(InvalidConfigError, match="closure"):
        km.build_deployment(closure, SETTINGS)
    with pytest.raises(InvalidConfigError, match="no entry or command"):
        km.build_deployment(_mv(entry=None), SETTINGS)
    # Credentials given in a model's env never reach the pod's environment.
    dep = km.build_deployment(_mv(env={"CLIPPER_CREDENTIALS": "{}", "CLIPPER_ADMIN_TOKEN": "x", "A": "b"}), SETTINGS)
    names = [e["name"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert "CLIPPER_CREDENTIALS" not in names and "CLIPPER_ADMIN_TOKEN" not in names and "A" in names
    # The interface the frontend calls: no processes, no kill, stats of nothing yet.
    assert mgr.kill(object()) is False and mgr.pids("m:1") == [] and mgr.stats() == {}
    asyncio.run(mgr.close())  # no client made yet: nothing to close, nothing deleted


def test_a_built_container_serves_a_real_frontend(frontend_factory, tmp_path):
    """The Deployment's container (its command, args and environment, its credentials file from the
    Secret) run as a local process: it connects to a real frontend over CURVE and answers queries."""
    from clipper.client import Client

    rf = frontend_factory(rpc_host="127.0.0.1")
    rf.call(rf.fe.register_application(Application("k8s-app", "float32", [4], slo_ms=5000)))
    mv = ModelVersion("k8s-model", "1", "float32", [4], entry=f"{ROOT}/tests/model_zoo.py:row_sum", replicas=1)
    rf.call(rf.fe.deploy_model(ModelVersion(mv.name, mv.version, mv.input_dtype, mv.input_shape, replicas=0)))
    rf.call(rf.fe.link("k8s-app", mv.name))
    settings = km.KubernetesSettings("clipper", "clipper-serving:0.1.0", f"tcp://127.0.0.1:{rf.fe.rpc_port}")
    mgr = km.KubernetesManager(settings, keyring=rf.fe.keyring)
    doc = rf.call(lambda: mgr.issue_document(mv))
    secret, dep = km.build_credentials_secret(mv, settings, doc), km.build_deployment(mv, settings)
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "credentials")["mountPath"]
    local = tmp_path / "credentials"
    local.mkdir(mode=0o700)
    for key, value in secret["stringData"].items():
        (local / key).write_text(value)
        os.chmod(local / key, 0o600)
    env = {**os.environ, **{e["name"]: e["value"].replace(mount, str(local)) for e in c["env"]}, "HOME": str(tmp_path)}
    argv = [sys.executable if a == "python" else a for a in c["command"]] + c["args"]
    proc = subprocess.Popen(argv, env=env, cwd=str(ROOT / "tests"), stderr=subprocess.PIPE)
    try:
        rf.call(rf.fe.wait_ready(mv.name, mv.version, replicas=1, timeout_s=60))
        with Client("127.0.0.1", rf.port) as client:
            p = client.predict("k8s-app", [1.0, 2.0, 3.0, 4.0])
        assert not p.is_default and p.output == 10.0 and list(p.models) == ["k8s-model:1"]
        # Deleting the version revokes the Secret's credentials: the container is dropped and told to exit.
        rf.call(rf.fe.delete_model(mv.name, mv.version))
        assert rf.call(lambda: rf.fe.keyring.get(doc["id"])) is None
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    assert proc.returncode is not None, err


# ------------------------------------------------------------------ configuration errors, typed
@pytest.mark.parametrize("field,value,match", [
    ("container_manager", "docker", "container_manager"),
    ("kubernetes_namespace", "Bad_NS", "kubernetes_namespace"),
    ("kubernetes_namespace", "x" * 64, "kubernetes_namespace"),
    ("kubernetes_namespace", "-lead", "kubernetes_namespace"),
    ("kubernetes_image", "img; rm -rf /", "kubernetes_image"),
    ("kubernetes_image", "", "kubernetes_image"),
    ("kubernetes_namespace", "clipper\n", "kubernetes_namespace"),  # a trailing newline ($ matched it)
    ("kubernetes_image", "clipper-serving:0.1.0\n", "kubernetes_image"),
    ("kubernetes_rpc_address", "clipper-rpc:7000", "kubernetes_rpc_address"),
    ("kubernetes_rpc_address", "tcp://clipper-rpc:70000", "kubernetes_rpc_address"),
])
def test_bad_settings_are_typed_errors(field, value, match):
    kw = {"container_manager": "kubernetes", "kubernetes_image": "clipper-serving:0.1.0", field: value}
    with pytest.raises(InvalidConfigError, match=match) as info:
        FrontendConfig(**kw)
    assert isinstance(info.value, ValueError) and info.value.code == 206


def test_settings_that_cannot_work_are_refused_at_start():
    with pytest.raises(InvalidConfigError, match="needs kubernetes_image"):
        FrontendConfig(container_manager="kubernetes")
    keyring = ContainerKeyring.open("curve", None)
    pod = {"CLIPPER_POD_NAME": "fe-0", "CLIPPER_POD_UID": "u", "CLIPPER_POD_IP": "10.0.0.9"}
    cfg = FrontendConfig(container_manager="kubernetes", kubernetes_image="clipper-serving:0.1.0")
    with pytest.raises(InvalidConfigError, match="loopback"):
        km.KubernetesManager.from_config(cfg, keyring=keyring, environ=pod)
    cfg.rpc_host = "0.0.0.0"
    with pytest.raises(InvalidConfigError, match="kubernetes_rpc_address"):
        km.KubernetesManager.from_config(cfg, keyring=keyring, environ={})
    with pytest.raises(InvalidConfigError, match="curve"):
        km.KubernetesManager.from_config(cfg, keyring=ContainerKeyring.open("none", None), environ=pod)
    mgr = km.KubernetesManager.from_config(cfg, keyring=keyring, environ={**pod, "CLIPPER_POD_IP": "fd00::9"})
    assert mgr.settings.rpc_address == "tcp://[fd00::9]:7000"
    cfg.kubernetes_rpc_address, cfg.kubernetes_namespace = "tcp://clipper-rpc.ml.svc:7000", "ml"
    mgr = km.KubernetesManager.from_config(cfg, keyring=keyring, environ={})
    assert (mgr.settings.rpc_address, mgr.settings.namespace, mgr.settings.owner) == (
        "tcp://clipper-rpc.ml.svc:7000", "ml", None)
    with pytest.raises(InvalidConfigError, match="owner"):
        km.KubernetesSettings("ml", "img:1", "tcp://a:1", owner={"name": "Not A Pod", "uid": "u"})


def test_a_missing_client_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "kubernetes", None)  # what `import kubernetes` meets when not installed
    with pytest.raises(InvalidConfigError, match=re.escape("pip install 'clipper-serving[kubernetes]'")):
        km._Api()


def test_a_frontend_without_a_cluster_says_so(frontend_factory, tmp_path, monkeypatch):
    """The frontend makes a KubernetesManager from its config; with no cluster to reach, a deploy fails
    with a typed error that says why (and the frontend goes on)."""
    empty = tmp_path / "kubeconfig"
    empty.write_text("")
    monkeypatch.setenv("KUBECONFIG", str(empty))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    rf = frontend_factory(rpc_host="0.0.0.0", container_manager="kubernetes", kubernetes_image="clipper-serving:0.1.0",
                          kubernetes_rpc_address="tcp://clipper-rpc:7000")
    assert isinstance(rf.fe.manager, km.KubernetesManager)
    mv = ModelVersion("nocluster", "1", "float32", [4], entry="model.py:f")
    with pytest.raises(InvalidConfigError, match="no Kubernetes cluster"):
        rf.call(rf.fe.deploy_model(mv, wait=False))
    assert rf.call(rf.fe.status)["processes"] == {}


# ------------------------------------------------------------------ a real cluster
def test_cluster_end_to_end():
    """Deploy a model as a Deployment, scale it to 2, see 2 ready pods, delete it."""
    kubeconfig = os.environ.get("KUBECONFIG")
    if not kubeconfig or not all(Path(p).is_file() for p in kubeconfig.split(os.pathsep) if p):
        reason = "no cluster: KUBECONFIG does not name a kubeconfig file"
        print(f"test_cluster_end_to_end skipped: {reason}")
        pytest.skip(reason)
    pytest.importorskip("kubernetes")
    image = os.environ.get("CLIPPER_K8S_TEST_IMAGE", "clipper-serving:0.1.0")
    namespace = os.environ.get("CLIPPER_K8S_TEST_NAMESPACE", "default")
    settings = km.KubernetesSettings(namespace, image, "tcp://clipper-rpc:7000")
    mgr = km.KubernetesManager(settings, keyring=ContainerKeyring.open("curve", None))
    mv = ModelVersion(f"e2e-{os.getpid()}", "1", "float32", [4], entry="/opt/clipper/examples/noop.py:predict",
                      replicas=1)

    async def run() -> None:
        try:
            await mgr.ensure(mv)
            mv.replicas = 2
            await mgr.ensure(mv)
            deadline = time.monotonic() + 300
            while True:
                status = await mgr.refresh(mv.key)
                if status and status["replicas"] == 2 and status["ready_replicas"] == 2:
                    break
                assert time.monotonic() < deadline, f"2 ready pods did not come within 300 s: {status}"
                await asyncio.sleep(2)
        finally:
            info = mgr.deployments.get(mv.key)
            await mgr.remove(mv.key)
            api = await mgr._client()
            if info is not None:
                deadline = time.monotonic() + 120
                while await asyncio.to_thread(api.deployment_status, namespace, info["deployment"]) is not None:
                    assert time.monotonic() < deadline, "the Deployment was not deleted"
                    await asyncio.sleep(1)
                assert await asyncio.to_thread(api.read_secret_document, namespace, info["secret"]) is None
            await mgr.close()

    asyncio.run(run())
