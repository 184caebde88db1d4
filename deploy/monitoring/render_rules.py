"""Write the Kubernetes forms of alerts.yaml: prometheusrule.yaml (prometheus-operator) and gmp-rules.yaml
(GKE Managed Prometheus), so the rules live in one file.

Both CRDs take the Prometheus rule groups unchanged under ``spec.groups``. The text of alerts.yaml from its
``groups:`` line on is copied and indented, comments included; GMP's ``Rules`` also gets the ``interval`` its
CRD requires on each group (plain Prometheus and the operator use the global evaluation interval).

Usage: ``python deploy/monitoring/render_rules.py`` rewrites both files; ``--check`` only exits 1 when one
is out of date (tests/unit/deploy/test_monitoring.py fails the same way).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "alerts.yaml"
GMP_INTERVAL = "30s"  # the PodMonitoring's scrape interval

_HEADER = """\
# GENERATED from alerts.yaml by render_rules.py: edit alerts.yaml, then run
#   python deploy/monitoring/render_rules.py
# {what}
apiVersion: {api_version}
kind: {kind}
metadata:
  name: apigee-authz
  namespace: apigee
  labels:
    app.kubernetes.io/name: apigee-authz
    app.kubernetes.io/component: ext-authz
spec:
"""

TARGETS = {
    "prometheusrule.yaml": {
        "what": "prometheus-operator: add the labels your Prometheus's ruleSelector wants "
        "(kube-prometheus-stack: release: <its Helm release>).",
        "api_version": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "interval": None,
    },
    "gmp-rules.yaml": {
        "what": "GKE Managed Prometheus: namespaced Rules evaluate only the metrics of the namespace apigee.",
        "api_version": "monitoring.googleapis.com/v1",
        "kind": "Rules",
        "interval": GMP_INTERVAL,
    },
}


def _groups(source: str) -> str:
    """The text of alerts.yaml from its top-level ``groups:`` line on."""
    match = re.search(r"^groups:\s*$", source, re.MULTILINE)
    if match is None:
        raise ValueError("alerts.yaml: no top-level groups: line")
    return source[match.start() :]


def render(name: str, source: str) -> str:
    """The text of the CRD file ``name`` (a key of TARGETS) for the rules text ``source``."""
    target = TARGETS[name]
    header = _HEADER.format(**{k: v for k, v in target.items() if k != "interval"})
    body = _groups(source)
    if target["interval"] is not None:  # right after each group's name (the only "  - name:" lines)
        body = re.sub(
            r"^(  - name: .*)$", rf"\1\n    interval: {target['interval']}", body, flags=re.MULTILINE
        )
    indented = "".join(f"  {line}" if line.strip() else line for line in body.splitlines(keepends=True))
    return header + indented


def main(argv: list[str]) -> int:
    source = SOURCE.read_text()
    stale = []
    for name in TARGETS:
        path = HERE / name
        text = render(name, source)
        if path.exists() and path.read_text() == text:
            continue
        stale.append(name)
        if "--check" not in argv:
            path.write_text(text)
    if stale and "--check" in argv:
        print(
            f"out of date: {', '.join(stale)}; run python deploy/monitoring/render_rules.py", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
