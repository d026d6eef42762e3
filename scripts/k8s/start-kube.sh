#!/usr/bin/env bash
# Start a real etcd (Debian etcd-server 3.4) + kube-apiserver v1.20.2 (built by build-kube.sh) on
# 127.0.0.1, with TLS, token authentication and RBAC; WITH_KCM=1 adds kube-controller-manager with
# the deployment and replicaset controllers (no scheduler, no kubelet: pods stay Pending unless a
# test plays kubelet). tests/k8s/conftest.py runs this from a session fixture.
# Usage: KBIN=DIR/bin [WITH_KCM=1] start-kube.sh RUN_DIR
#   writes RUN_DIR/kubeconfig (admin), RUN_DIR/scaler.kubeconfig (user "dist-exec-scaler", no
#   rights until a RoleBinding grants some), RUN_DIR/api_port, RUN_DIR/pids, logs; prints timings
#   stop: kill $(cat RUN_DIR/pids); rm -rf RUN_DIR/etcd-data (or the /dev/shm dir it names)
set -euo pipefail
RUN="${1:?run dir}"; mkdir -p "$RUN"; RUN="$(cd "$RUN" && pwd)"
KBIN="${KBIN:?dir containing kube-apiserver}"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ETCD_PORT="${ETCD_PORT:-$(free_port)}"; ETCD_PEER_PORT="${ETCD_PEER_PORT:-$(free_port)}"; API_PORT="${API_PORT:-$(free_port)}"
WITH_KCM="${WITH_KCM:-0}"
ms() { echo $(( $(date +%s%N) / 1000000 )); }
t0=$(ms)
# --- PKI: CA, serving cert (127.0.0.1/localhost), service-account key, admin + limited tokens
PKI="$RUN/pki"; mkdir -p "$PKI"
if [ ! -f "$PKI/ca.crt" ]; then
  # Extensions as Python 3.13's strict verification (VERIFY_X509_STRICT) wants them: a CA with
  # key usage, a serving certificate that names its issuer's key.
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=test-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$PKI/ca.key" -out "$PKI/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout "$PKI/apiserver.key" -out "$PKI/apiserver.csr" 2>/dev/null
  printf "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc,IP:10.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\nauthorityKeyIdentifier=keyid\n" > "$PKI/ext.cnf"
  openssl x509 -req -in "$PKI/apiserver.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial -days 3650 -extfile "$PKI/ext.cnf" -out "$PKI/apiserver.crt" 2>/dev/null
  openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  ADMIN_TOKEN=$(openssl rand -hex 16); SCALER_TOKEN=$(openssl rand -hex 16); KCM_TOKEN=$(openssl rand -hex 16)
  { echo "$ADMIN_TOKEN,admin,uid-admin,\"system:masters\""; echo "$SCALER_TOKEN,dist-exec-scaler,uid-scaler,\"\""; echo "$KCM_TOKEN,system:kube-controller-manager,uid-kcm,\"system:masters\""; } > "$PKI/tokens.csv"
fi
ADMIN_TOKEN=$(sed -n 1p "$PKI/tokens.csv" | cut -d, -f1); SCALER_TOKEN=$(sed -n 2p "$PKI/tokens.csv" | cut -d, -f1); KCM_TOKEN=$(sed -n 3p "$PKI/tokens.csv" | cut -d, -f1)
t1=$(ms)
# --- etcd (data on tmpfs when available, it is throwaway)
if [ -z "${ETCD_DATA:-}" ]; then
  if [ -d /dev/shm ] && [ -w /dev/shm ]; then ETCD_DATA="/dev/shm/etcd-$API_PORT"; else ETCD_DATA="$RUN/etcd-data"; fi
fi
DATA="$ETCD_DATA"; rm -rf "$DATA"; mkdir -p "$DATA"; echo "$DATA" > "$RUN/etcd_data"
etcd --name test --data-dir "$DATA" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "test=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync --logger zap --log-level error \
  > "$RUN/etcd.log" 2>&1 &
echo $! > "$RUN/pids"
wait_for() { # pid description command...   (60 s deadline; fails fast if the process died)
  local pid=$1 what=$2; shift 2; local deadline=$(( $(ms) + 60000 ))
  until "$@"; do
    kill -0 "$pid" 2>/dev/null || { echo "$what died, log:" >&2; tail -20 "$RUN/$what.log" >&2; exit 1; }
    [ "$(ms)" -lt "$deadline" ] || { echo "$what not ready after 60 s" >&2; exit 1; }
    sleep 0.05
  done
}
wait_for "$(tail -1 "$RUN/pids")" etcd curl -fs -o /dev/null "http://127.0.0.1:$ETCD_PORT/health"
t2=$(ms)
# --- kube-apiserver
"$KBIN/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" --insecure-port 0 \
  --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" --client-ca-file "$PKI/ca.crt" \
  --token-auth-file "$PKI/tokens.csv" --authorization-mode RBAC \
  --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$PKI/sa.pub" \
  --service-account-signing-key-file "$PKI/sa.key" --api-audiences https://kubernetes.default.svc \
  --service-cluster-ip-range 10.0.0.0/24 --allow-privileged=false \
  --enable-priority-and-fairness=false --disable-admission-plugins ServiceAccount --endpoint-reconciler-type none \
  > "$RUN/apiserver.log" 2>&1 &
echo $! >> "$RUN/pids"
wait_for "$(tail -1 "$RUN/pids")" apiserver curl -fs -o /dev/null --cacert "$PKI/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" "https://127.0.0.1:$API_PORT/readyz"
t3=$(ms)
mk_kubeconfig() { # file user token
cat > "$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {server: "https://127.0.0.1:$API_PORT", certificate-authority: "$PKI/ca.crt"}
users:
- name: $2
  user: {token: "$3"}
contexts:
- name: test
  context: {cluster: test, user: $2, namespace: default}
current-context: test
KC
}
mk_kubeconfig "$RUN/kubeconfig" admin "$ADMIN_TOKEN"
mk_kubeconfig "$RUN/scaler.kubeconfig" dist-exec-scaler "$SCALER_TOKEN"
mk_kubeconfig "$RUN/kcm.kubeconfig" system:kube-controller-manager "$KCM_TOKEN"
if [ "$WITH_KCM" = "1" ]; then
  "$KBIN/kube-controller-manager" --kubeconfig "$RUN/kcm.kubeconfig" --bind-address 127.0.0.1 --secure-port 0 --port 0 \
    --controllers deployment,replicaset --leader-elect=false --use-service-account-credentials=false \
    > "$RUN/kcm.log" 2>&1 &
  echo $! >> "$RUN/pids"
fi
for p in $(cat "$RUN/pids"); do kill -0 "$p" 2>/dev/null || { echo "process $p exited early (port clash?), see $RUN/*.log" >&2; exit 1; }; done
echo "$API_PORT" > "$RUN/api_port"
echo "pki=$((t1-t0))ms etcd=$((t2-t1))ms apiserver_ready=$((t3-t2))ms total=$((t3-t0))ms"
