#!/usr/bin/env bash
# preStop hook of kvmesh's Ray pods (installed as /usr/local/bin/kvmesh-drain by k8s/Dockerfile).
#
# On a worker: ask Ray to drain this node, so Serve starts replacement replicas elsewhere and
# stops this node's replicas gracefully (each finishes its streams within its
# graceful_shutdown_timeout_s). Then, on any node, wait until no Serve replica runs here, at
# most KVMESH_DRAIN_S seconds (default 300: kvmesh's autoscaled drain time). The pod's
# terminationGracePeriodSeconds (330) must stay above it.
set -u
deadline_s=${KVMESH_DRAIN_S:-300}
if [ "${KVMESH_RAY_NODE:-worker}" != head ]; then  # the head cannot be drained
  # `ray drain-node` is Ray's (hidden) developer command; a refusal is not fatal here.
  timeout 30 ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION \
    --reason-message "kubernetes pod terminating" \
    --deadline-remaining-seconds "$deadline_s" >/dev/null 2>&1 || true
fi
end=$(($(date +%s) + deadline_s))
replicas_here() {
  grep -ls "ServeReplica" /proc/[0-9]*/cmdline 2>/dev/null | grep -q .
}
while replicas_here && [ "$(date +%s)" -lt "$end" ]; do
  sleep 2
done
exit 0
