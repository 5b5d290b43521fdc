"""`make deploy-e2e`: the Helm chart played as real pods with podman, and the demo's job against them.

What it does (docs/runbook.md, "End-to-end deployment test", says what is stood in for and why):

1. Key ceremony with the `fibemrss` CLI (`certs init`, `keys init`) into a scratch folder.
2. `helm template` of the chart: release `fibemrss-central` (role central) and one release
   `fibemrss-<hospital>` per hospital (role hospital), each with the bundled PostgreSQL.
3. One isolated podman network per site (`central`, and per hospital its own network plus an
   uplink network that only its agent and the aggregator join), inside 198.18.0.0/15. Each pod
   joins exactly the networks that the chart's NetworkPolicies let it reach, with a static address;
   Service names are the pods' host entries (hostAliases), as cluster DNS would answer them.
4. The rendered Secrets become podman secrets, each Deployment (with its ConfigMap) is played
   with `podman kube play`; Services, NetworkPolicies, PodDisruptionBudgets, ServiceAccounts,
   ServiceMonitors and PrometheusRules are not played (podman has no use for them).
5. From the host, over mutual TLS: each hospital's CSV ingested through its gateway, a
   federation of ROUNDS rounds; during it one pod of each kind is killed (`podman kill`) and must
   come back by its restart policy; the federation must finish with the same model at every
   hospital, and inference must answer a diagnosis reference.
6. In the pods: a hospital's pods cannot reach another hospital's gateway, and nothing but the
   agents reaches the aggregator. Every pod's /metrics is scraped, and every Grafana dashboard
   query and PrometheusRule expression of the chart must name series that exist.
7. var/deploy-e2e.json, then everything it created is removed (also on failure or Ctrl-C).

Run with the project's virtualenv: .venv/bin/python -m fibemrss.tools.deploy_e2e [--rounds N] [--keep]
(`make deploy-e2e`). Modules: `sites` (the podman objects of one run: sites, networks, pods),
`chart` (key ceremony, helm template, playing the pods), `job` (the demo's job against the pods,
with the demo's and the study client's own code, and the pod kills), `checks` (securityContext,
NetworkPolicies, monitoring series).
"""
