"""The deploy/ files: real tools check them, and they only name what Quiver really has.

- promtool checks the Prometheus config and alert rules;
- systemd-analyze verifies the unit (when the machine has systemd);
- every YAML and JSON file parses;
- every metric the alerts and the dashboard query appears in a real scrape of Quiver;
- every QUIVER_* variable the files set is one `quiver` documents in --help.
"""

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

import pyarrow.flight as flight
from cryptography import x509

from conftest import REPO, Server, quiver_binary
from test_transport import Certs

DEPLOY = REPO / "deploy"
REQUIRED = [
    "docker/Dockerfile",
    "compose/compose.yaml",
    "kubernetes/deployment.yaml",
    "kubernetes/service.yaml",
    "kubernetes/poddisruptionbudget.yaml",
    "kubernetes/servicemonitor.yaml",
    "kubernetes/configmap.yaml",
    "kubernetes/secret.yaml",
    "systemd/quiver.service",
    "systemd/quiver.env",
    "prometheus/prometheus.yml",
    "prometheus/alerts.rules.yml",
    "grafana/quiver-dashboard.json",
    "grafana/provisioning/datasources/prometheus.yaml",
    "grafana/provisioning/dashboards/quiver.yaml",
]
# PromQL words that are not metric names.
PROMQL = {
    "sum", "rate", "by", "histogram_quantile", "time", "le", "job", "instance", "method", "code",
    "outcome", "table", "up", "and", "or", "unless", "on", "ignoring", "max", "min", "avg", "count",
}


def test_the_files_exist_and_parse():
    for rel in REQUIRED:
        assert (DEPLOY / rel).is_file(), rel
    for path in DEPLOY.rglob("*"):
        if path.suffix in (".yaml", ".yml"):
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
            assert docs, f"{path} is empty"
        elif path.suffix == ".json":
            json.loads(path.read_text())


def promtool(*args):
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def test_promtool_checks_config_and_rules():
    out = promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout
    out = promtool("check", "rules", str(DEPLOY / "prometheus" / "alerts.rules.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_catches_a_broken_rule(tmp_path):
    """The check above can fail: a rule with bad PromQL is refused."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.rules.yml").read_text())
    rules["groups"][0]["rules"][0]["expr"] = "sum(rate(quiver_queries_total[5m]"
    bad = tmp_path / "bad.rules.yml"
    bad.write_text(yaml.safe_dump(rules))
    assert promtool("check", "rules", str(bad)).returncode != 0


def test_systemd_unit_verifies(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not available")
    # The unit points at /usr/local/bin/quiver; verify it against the binary under test.
    unit = (DEPLOY / "systemd" / "quiver.service").read_text()
    assert "ExecStart=/usr/local/bin/quiver serve" in unit
    path = tmp_path / "quiver.service"
    path.write_text(unit.replace("/usr/local/bin/quiver", str(quiver_binary().resolve())))
    out = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    # systemd-analyze exits 0 on unknown keys but warns: a clean unit prints nothing.
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr
    for hardening in ("ProtectSystem=strict", "ReadOnlyPaths=/srv/quiver", "LimitNOFILE=", "NoNewPrivileges=yes"):
        assert hardening in unit


def queried_metrics() -> dict[str, set[str]]:
    """Metric names in each file's PromQL expressions."""
    exprs = {}
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.rules.yml").read_text())
    exprs["alerts.rules.yml"] = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads((DEPLOY / "grafana" / "quiver-dashboard.json").read_text())
    exprs["quiver-dashboard.json"] = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    names = {}
    for file, texts in exprs.items():
        assert texts, file
        found = set()
        for text in texts:
            text = re.sub(r'\{[^}]*\}', "", text)  # label matchers
            text = re.sub(r'"[^"]*"', "", text)
            text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
            text = re.sub(r"\b(by|without)\s*\([^)]*\)", "", text)  # grouping labels
            text = re.sub(r"(?<![A-Za-z0-9_:])\d+(\.\d+)?([eE][+-]?\d+)?", "", text)  # numbers
            for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
                if word not in PROMQL and not word.startswith("__"):
                    found.add(word)
        names[file] = found
    return names


def test_alerts_and_dashboard_query_only_metrics_quiver_exports(dataset, tmp_path):
    # A real scrape of a TLS server (the certificate expiry exists only with TLS), after a
    # query so every family has samples.
    certs = Certs(tmp_path)
    server = Server(["--data-dir", str(dataset), "--tls-cert", str(certs.cert), "--tls-key", str(certs.key)], tmp_path, connect=False)
    try:
        client = flight.connect(f"grpc+tls://localhost:{server.port}", tls_root_certs=certs.ca_pem)
        client.do_get(flight.Ticket(b"SELECT COUNT(*) FROM requests")).read_all()
        text = server.scrape_text()
        expiry = server.metrics().get("quiver_tls_certificate_expiry_timestamp_seconds")
    finally:
        server.stop()
    cert = x509.load_pem_x509_certificate(certs.cert.read_bytes())
    assert expiry == cert.not_valid_after_utc.timestamp()
    families = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            families.add(name)
            if kind == "histogram":
                families.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
    families.add("up")  # Prometheus's own, per target
    for file, names in queried_metrics().items():
        missing = names - families - {"up"}
        assert not missing, f"{file} queries metrics Quiver does not export: {sorted(missing)}"
        assert len(names) >= 5, file
    # The alerts cover what an operator pages on.
    rules = (DEPLOY / "prometheus" / "alerts.rules.yml").read_text()
    for needle in ("outcome=\"error\"", "histogram_quantile(0.99", "quiver_memory_pool_limit_bytes", "outcome=\"rejected\""):
        assert needle in rules


def help_variables() -> set[str]:
    variables = set()
    for sub in ("serve", "query", "health"):
        out = subprocess.run([str(quiver_binary()), sub, "--help"], capture_output=True, text=True, check=True)
        variables.update(re.findall(r"env: (QUIVER_[A-Z0-9_]+)", out.stdout))
    return variables


def test_environment_variables_are_real_flags():
    known = help_variables()
    assert "QUIVER_LISTEN" in known and "QUIVER_SERVER" in known
    used = {}
    texts = {
        "systemd/quiver.env": (DEPLOY / "systemd" / "quiver.env").read_text(),
        "systemd/quiver.service": (DEPLOY / "systemd" / "quiver.service").read_text(),
        "docker/Dockerfile": (DEPLOY / "docker" / "Dockerfile").read_text(),
        "compose/compose.yaml": (DEPLOY / "compose" / "compose.yaml").read_text(),
        "kubernetes/configmap.yaml": (DEPLOY / "kubernetes" / "configmap.yaml").read_text(),
    }
    for file, text in texts.items():
        used[file] = set(re.findall(r"\b(QUIVER_[A-Z0-9_]+)\s*[=:]", text))
        assert used[file], file
        unknown = used[file] - known - {"QUIVER_DATA"}  # compose's own host-path variable
        assert not unknown, f"{file} sets variables quiver does not read: {sorted(unknown)}"


def test_kubernetes_objects_fit_together():
    docs = {}
    for path in (DEPLOY / "kubernetes").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    deployment = docs[("Deployment", "quiver")]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget", "ServiceMonitor"):
        obj = next(d for (k, _), d in docs.items() if k == kind)
        selector = obj["spec"]["selector"].get("matchLabels", obj["spec"]["selector"])
        assert selector.items() <= labels.items(), f"{kind} does not select the pods"
    container = pod["spec"]["containers"][0]
    # Health probes: gRPC health through `quiver health`, which needs no credentials.
    assert container["readinessProbe"]["exec"]["command"] == ["quiver", "health"]
    assert container["resources"]["limits"]["memory"] == container["resources"]["requests"]["memory"]
    # Everything mounted comes from an object defined here.
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for mount in container["volumeMounts"]:
        assert mount["name"] in volumes
    for v in volumes.values():
        if "secret" in v:
            assert ("Secret", v["secret"]["secretName"]) in docs
        if "configMap" in v:
            assert ("ConfigMap", v["configMap"]["name"]) in docs
    ports = {p["name"] for p in container["ports"]}
    service = docs[("Service", "quiver")]
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    # The catalog the ConfigMap carries is valid TOML in Quiver's shape.
    catalog = tomllib.loads(docs[("ConfigMap", "quiver")]["data"]["catalog.toml"])
    assert catalog["tables"]["requests"]["path"].startswith("/data/")


def test_compose_mounts_files_that_exist():
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    assert set(compose["services"]) == {"quiver", "prometheus", "grafana"}
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("../"):
                assert (DEPLOY / "compose" / source).resolve().exists(), source
    build = compose["services"]["quiver"]["build"]
    assert (DEPLOY / "compose" / build["context"] / build["dockerfile"]).resolve().is_file()
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    dashboard = json.loads((DEPLOY / "grafana" / "quiver-dashboard.json").read_text())
    uid = datasource["datasources"][0]["uid"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid


def test_dockerfile_builds_like_the_readme_and_runs_unprivileged():
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    readme = (REPO / "README.md").read_text()
    install = (REPO / "scripts" / "install.sh").read_text()
    assert "./scripts/install.sh /out" in dockerfile and "./scripts/install.sh" in readme
    assert "COPY --from=build /out/bin/quiver /usr/local/bin/quiver" in dockerfile
    assert "cargo build --release --locked" in install
    assert re.search(r"^USER (?!root)", dockerfile, re.M)
    assert "HEALTHCHECK" in dockerfile and 'CMD ["quiver", "health"]' in dockerfile
    assert re.search(r"^FROM .* AS build$", dockerfile, re.M), "multi-stage"
    assert "VOLUME" in dockerfile


def sections(path: Path) -> set[str]:
    out = subprocess.run(["readelf", "-S", "-W", str(path)], check=True, capture_output=True, text=True).stdout
    return set(re.findall(r"\]\s+(\.\S+)", out))


@pytest.mark.skipif(shutil.which("objcopy") is None or shutil.which("readelf") is None, reason="binutils missing")
def test_install_ships_the_binary_without_debug_info(tmp_path):
    built = quiver_binary()
    env = {**os.environ, "QUIVER_BIN": str(built)}
    done = subprocess.run([str(REPO / "scripts" / "install.sh"), str(tmp_path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    shipped, debug = tmp_path / "bin" / "quiver", tmp_path / "lib" / "debug" / "quiver.debug"
    # .debug_gdb_scripts is loaded with the program (gdb's pretty-printer hook), not debug info.
    assert not {s for s in sections(shipped) if s.startswith(".debug_") and s != ".debug_gdb_scripts"}
    assert ".gnu_debuglink" in sections(shipped)
    assert ".debug_line" in sections(debug), "the line tables are kept beside it"
    assert shipped.stat().st_size < built.stat().st_size / 2
    version = subprocess.run([str(shipped), "--version"], check=True, capture_output=True, text=True).stdout
    assert version.startswith("quiver "), version


def test_cluster_deployments_fit_together():
    """The three-node compose file and the Kubernetes StatefulSet: every variable is a real
    flag, nodes find each other on the cluster port, and the secret comes from where it
    is mounted."""
    known = help_variables()
    compose = yaml.safe_load((DEPLOY / "compose" / "cluster.yaml").read_text())
    nodes = compose["services"]
    assert len(nodes) == 3
    for name, node in nodes.items():
        env = node["environment"]
        assert set(env) <= known | {"QUIVER_DATA"}, set(env) - known
        workers = env["QUIVER_WORKERS"].split(",")
        assert f"http://{name}:7001" in workers and len(workers) == 3
        assert env["QUIVER_CLUSTER_LISTEN"].endswith(":7001")
        mounts = {v.split(":")[1] for v in node["volumes"]}
        assert env["QUIVER_CLUSTER_SECRET_FILE"] in mounts
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "cluster" / "statefulset.yaml").read_text())}
    sts = docs[("StatefulSet", "quiver-cluster")]
    headless = docs[("Service", sts["spec"]["serviceName"])]
    assert headless["spec"]["clusterIP"] == "None"
    labels = sts["spec"]["template"]["metadata"]["labels"]
    for (kind, _), doc in docs.items():
        if kind == "Service":
            assert doc["spec"]["selector"].items() <= labels.items()
    container = sts["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) <= known, set(env) - known
    host, port = env["QUIVER_WORKERS_DNS"].rsplit(":", 1)
    assert host == headless["metadata"]["name"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["cluster"] == int(port) == int(env["QUIVER_CLUSTER_LISTEN"].rsplit(":", 1)[1])
    assert {p["targetPort"] for p in headless["spec"]["ports"]} == {"cluster"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    secret_volume = next(n for n, v in volumes.items() if "secret" in v)
    assert env["QUIVER_CLUSTER_SECRET_FILE"].startswith(mounts[secret_volume] + "/")
    assert ("Secret", volumes[secret_volume]["secret"]["secretName"]) in docs
