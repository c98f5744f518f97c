#!/usr/bin/env bash
# End-to-end test of datalab-guard on a real Kubernetes cluster: kind + Calico.
#
# IT CANNOT RUN ON OUR CI OR DEVELOPMENT MACHINES, and has not been run there: they have no
# container engine, no kind, and no network beyond package registries. Run it on a Linux
# workstation or VM with Docker, kind >= 0.20 and kubectl, cgroup v2, kernel >= 5.8 with BTF,
# and internet access (it pulls kindest/node, Calico's manifest and images, busybox). See
# tests/e2e/README.md for what each check proves and what it does not.
#
#   tests/e2e/kind.sh            build, deploy, test, delete the cluster
#   KEEP=1 tests/e2e/kind.sh     keep the cluster afterwards (kind delete cluster --name dg-e2e)
#
# Nothing here touches the host's network: the fake metadata server answers on a dummy
# interface INSIDE the kind node, which is also where every test request is routed (local
# addresses win), so the machine's real metadata endpoint (on a cloud VM) is never reached.
set -euo pipefail

cd "$(dirname "$0")/../.."
CLUSTER=${CLUSTER:-dg-e2e}
CALICO_VERSION=${CALICO_VERSION:-v3.28.2}
BUSYBOX=${BUSYBOX:-busybox:1.36}
IMAGE=datalab-guard:$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
TENANT_NS=dg-e2e-tenant    # an environment: guarded
OTHER_NS=dg-e2e-other      # not an environment: exempt by default
IMDS_NS=dg-e2e-imds        # the fake metadata server (hostNetwork)
IMDS=169.254.169.254       # blocked by default
CONTROL=169.254.169.253    # same fake server, not blocked

failures=0
say() { printf '\n==> %s\n' "$*"; }
pass() { printf '  PASS  %s\n' "$*"; }
fail() { printf '  FAIL  %s\n' "$*"; failures=$((failures + 1)); }
need() { command -v "$1" >/dev/null || { echo "kind.sh: $1 is required" >&2; exit 2; }; }
need docker; need kind; need kubectl
# poll SECONDS COMMAND...: true once COMMAND succeeds within SECONDS.
poll() { local end=$((SECONDS + $1)); shift; until "$@"; do [ $SECONDS -lt "$end" ] || return 1; sleep 5; done; }

cleanup() {
    if [ "${KEEP:-0}" = 1 ]; then
        echo "kind.sh: cluster kept: kind delete cluster --name $CLUSTER"
    else
        kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

say "kind cluster $CLUSTER without its default CNI (Calico enforces NetworkPolicy; kindnet does not)"
kind create cluster --name "$CLUSTER" --wait 0s --config - <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  disableDefaultCNI: true
  podSubnet: 192.168.0.0/16
nodes:
  - role: control-plane
  - role: worker
EOF
kubectl config use-context "kind-$CLUSTER" >/dev/null
WORKER=$(kubectl get nodes -l '!node-role.kubernetes.io/control-plane' -o jsonpath='{.items[0].metadata.name}')

say "Calico $CALICO_VERSION"
kubectl apply -f "https://raw.githubusercontent.com/projectcalico/calico/$CALICO_VERSION/manifests/calico.yaml" >/dev/null
kubectl -n kube-system rollout status ds/calico-node --timeout=300s
kubectl wait --for=condition=Ready nodes --all --timeout=300s

say "nodes: bpffs mounted (shared), fake metadata addresses on a dummy interface in $WORKER"
for node in $(kind get nodes --name "$CLUSTER"); do
    # The DaemonSet mounts the host's /sys/fs/bpf with HostToContainer propagation, which
    # needs a bpffs that is a shared mount; systemd nodes have one, kind nodes may not.
    docker exec "$node" sh -c 'mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf; mount --make-shared /sys/fs/bpf'
done
docker exec "$WORKER" sh -c "ip link add dg-imds type dummy && ip addr add $IMDS/32 dev dg-imds && ip addr add $CONTROL/32 dev dg-imds && ip link set dg-imds up"

# The image CI tests under containerd: `cargo xtask image` (buildah, no registry) saves it as
# an OCI archive tagged docker.io/library/$IMAGE, which kind imports as is. IMAGE_ARCHIVE
# names another archive; DOCKER_BUILD=1 builds with docker from the Containerfile instead.
if [ "${DOCKER_BUILD:-0}" = 1 ]; then
    say "image $IMAGE (docker build -f Containerfile), loaded into the kind nodes"
    docker build -f Containerfile -t "$IMAGE" .
    kind load docker-image "$IMAGE" --name "$CLUSTER"
else
    ARCHIVE=${IMAGE_ARCHIVE:-target/image/${IMAGE/:/-}.oci.tar}
    say "image $IMAGE from $ARCHIVE (cargo xtask image), loaded into the kind nodes"
    [ -f "$ARCHIVE" ] || cargo xtask image
    kind load image-archive "$ARCHIVE" --name "$CLUSTER"
fi

say "kubectl apply -k deploy/"
kubectl apply -k deploy/
kubectl -n datalab-guard rollout status ds/datalab-guard --timeout=300s
kubectl -n datalab-guard rollout status deploy/datalab-guard-controller --timeout=300s
AGENT=$(kubectl -n datalab-guard get pods -l app.kubernetes.io/name=datalab-guard,app.kubernetes.io/component=node-agent \
    --field-selector "spec.nodeName=$WORKER" -o jsonpath='{.items[0].metadata.name}')
echo "agent on $WORKER: $AGENT"

say "the agent found kind's pods root and its container runtime on its own"
# kind's kubelet runs with --cgroup-root=/kubelet and the systemd driver: the pods' root is
# kubelet.slice/kubelet-kubepods.slice on the node's cgroup mount (cgroup.root: auto).
if kubectl -n datalab-guard logs "$AGENT" -c agent | grep -q 'kubelet.slice/kubelet-kubepods.slice'; then
    pass "cgroup.root auto: kubelet.slice/kubelet-kubepods.slice"
else fail "the agent did not attach at kind's kubelet.slice/kubelet-kubepods.slice"; fi
runtime_up() {
    kubectl get --raw "/api/v1/namespaces/datalab-guard/pods/$AGENT:9090/proxy/metrics" 2>/dev/null |
        grep -q '^datalab_guard_runtime_up 1'
}
if poll 60 runtime_up; then pass "runtime.socket auto: containerd answers CRI (datalab_guard_runtime_up 1)"
else fail "datalab_guard_runtime_up is not 1: the agent cannot ask kind's containerd"; fi

say "workloads: fake metadata server, a tenant pod, a pod outside the environments"
kubectl create namespace "$IMDS_NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl create namespace "$OTHER_NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $TENANT_NS
  labels:
    datalab.io/environment: "true"
    pod-security.kubernetes.io/enforce: baseline
---
apiVersion: v1
kind: Pod
metadata: {name: imds, namespace: $IMDS_NS}
spec:
  nodeName: $WORKER
  hostNetwork: true
  containers:
    - name: httpd
      image: $BUSYBOX
      command: [sh, -c]
      args:
        - mkdir -p /www/latest/meta-data && echo fake-credentials > /www/latest/meta-data/iam &&
          httpd -p $IMDS:80 -h /www && httpd -f -p $CONTROL:80 -h /www
---
apiVersion: v1
kind: Pod
metadata: {name: tenant, namespace: $TENANT_NS}
spec:
  nodeName: $WORKER
  containers:
    - {name: shell, image: $BUSYBOX, command: [sleep, "86400"]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: $OTHER_NS}
spec:
  nodeName: $WORKER
  containers:
    - {name: shell, image: $BUSYBOX, command: [sleep, "86400"]}
EOF
for p in "$IMDS_NS/imds" "$TENANT_NS/tenant" "$OTHER_NS/other"; do
    kubectl -n "${p%/*}" wait --for=condition=Ready "pod/${p#*/}" --timeout=180s
done
sleep 5 # let the agent classify the new pods (it also does so within a rescan interval)

# fetch NS POD ADDR: one HTTP GET of the fake credentials; prints the outcome, never fails.
fetch() {
    kubectl -n "$1" exec "$2" -- sh -c "wget -q -T 5 -O - http://$3/latest/meta-data/iam 2>&1; echo rc=\$?" 2>&1 | tr '\n' ' '
}

say "checks"
out=$(fetch "$TENANT_NS" tenant "$IMDS")
if [[ $out == *"Operation not permitted"* ]]; then pass "tenant -> $IMDS refused at connect (EPERM): $out"
else fail "tenant -> $IMDS should be refused with EPERM, got: $out"; fi

out=$(fetch "$TENANT_NS" tenant "$CONTROL")
if [[ $out == *fake-credentials* ]]; then pass "tenant -> $CONTROL (not blocked) answered"
else fail "tenant -> $CONTROL should answer (routing works, the block is by destination), got: $out"; fi

out=$(fetch "$OTHER_NS" other "$IMDS")
if [[ $out == *fake-credentials* ]]; then pass "non-environment pod -> $IMDS answered (exempt by default)"
else fail "non-environment pod -> $IMDS should answer, got: $out"; fi

metrics=$(kubectl get --raw "/api/v1/namespaces/datalab-guard/pods/$AGENT:9090/proxy/metrics")
blocked=$(grep "^datalab_guard_blocked_total{.*namespace=\"$TENANT_NS\"" <<<"$metrics" | awk '{s += $NF} END {print s + 0}')
if [ "$blocked" -ge 1 ]; then pass "metrics: datalab_guard_blocked_total{namespace=\"$TENANT_NS\"} = $blocked"
else fail "metrics: no blocked_total for $TENANT_NS:"$'\n'"$(grep '^datalab_guard_' <<<"$metrics")"; fi

logs=$(kubectl -n datalab-guard logs "$AGENT" -c agent)
if grep '"event":"egress_blocked"' <<<"$logs" | grep "\"namespace\":\"$TENANT_NS\"" | grep -q '"pod":"tenant"'; then
    pass "audit line: $(grep '"event":"egress_blocked"' <<<"$logs" | grep "\"namespace\":\"$TENANT_NS\"" | head -1)"
else fail "no egress_blocked audit line naming $TENANT_NS/tenant in kubectl logs"; fi

events=$(kubectl -n "$TENANT_NS" get events --field-selector reason=MetadataAccessBlocked -o name)
if [ -n "$events" ]; then pass "Event MetadataAccessBlocked on the tenant pod"
else fail "no MetadataAccessBlocked Event in $TENANT_NS"; fi

say "restart: enforcement survives the agent (pinned programs and maps)"
kubectl -n datalab-guard delete pod "$AGENT" --wait=false >/dev/null
out=$(fetch "$TENANT_NS" tenant "$IMDS")
if [[ $out == *"Operation not permitted"* ]]; then pass "tenant still refused while the agent restarts"
else fail "tenant not refused during the agent restart: $out"; fi
kubectl -n datalab-guard rollout status ds/datalab-guard --timeout=180s

say "controller (leader): NetworkPolicy provisioned; every node: CNI probe (probe.interval is 5m: up to 7 min)"
if poll 120 kubectl -n "$TENANT_NS" get networkpolicy allow-web-egress -o name >/dev/null 2>&1; then
    pass "NetworkPolicy allow-web-egress provisioned in $TENANT_NS"
else fail "no NetworkPolicy allow-web-egress in $TENANT_NS after 2 minutes"; fi
probe_enforced() {
    local agent
    agent=$(kubectl -n datalab-guard get pods -l app.kubernetes.io/name=datalab-guard,app.kubernetes.io/component=node-agent \
        --field-selector "spec.nodeName=$WORKER" -o jsonpath='{.items[0].metadata.name}')
    kubectl get --raw "/api/v1/namespaces/datalab-guard/pods/$agent:9090/proxy/metrics" 2>/dev/null |
        grep -q "^datalab_guard_cni_enforcement{namespace=\"$TENANT_NS\",state=\"enforced\"} 1"
}
if poll 420 probe_enforced; then pass "CNI probe: Calico enforces the policy in $TENANT_NS"
else fail "no cni_enforcement{namespace=\"$TENANT_NS\",state=\"enforced\"} 1 after 7 minutes"; fi

say "result"
if [ "$failures" -gt 0 ]; then
    echo "kind.sh: $failures check(s) failed"
    exit 1
fi
echo "kind.sh: all checks passed"
