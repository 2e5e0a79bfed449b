#!/usr/bin/env sh
# Writes the credentials that deploy/k8s/base turns into Secrets, one per NATS user of
# deploy/nats/accounts.conf (admin, worker, each tenant, sys, and the cluster's route user), plus the
# gateway's API keys (one per tenant, each with that tenant's NATS credentials). Random values, in
# base/secrets/ (git-ignored); an existing file is kept, so running it again changes nothing.
#
#   deploy/k8s/secrets.sh            # then: kubectl apply -k deploy/k8s/overlays/cpu
#
# Tenants: TENANTS="tenant_a tenant_b" (accounts.conf's), as they are named there. Where a secret
# manager (External Secrets, Sealed Secrets, Vault) owns credentials, have it write these files or
# replace base/kustomization.yaml's secretGenerator with its objects, keeping the names.
set -eu

dir=$(cd "$(dirname "$0")" && pwd)/base/secrets
tenants=${TENANTS:-tenant_a tenant_b}
mkdir -p "$dir"

random() {  # hex only: accounts.conf's variables are parsed as config values
  od -An -tx1 -N24 /dev/urandom | tr -d ' \n'
}

role() {  # FILE USER
  [ -f "$dir/$1.env" ] && return 0
  printf 'user=%s\npassword=%s\n' "$2" "$(random)" > "$dir/$1.env"
  echo "wrote $dir/$1.env"
}

role admin admin
role worker worker
role sys sys
role route route
for tenant in $tenants; do
  role "$(echo "$tenant" | tr _ -)" "$tenant"
done

keys=$dir/gateway-keys.yaml
if [ ! -f "$keys" ]; then
  {
    echo "# The gateway's API keys (servemesh gateway --keys): each maps to its tenant's NATS credentials."
    echo "keys:"
    for tenant in $tenants; do
      password=$(sed -n 's/^password=//p' "$dir/$(echo "$tenant" | tr _ -).env")
      echo "  \"k-$(random)\": {tenant: $tenant, user: $tenant, password: \"$password\", inbox_prefix: _INBOX.$tenant}"
    done
  } > "$keys"
  echo "wrote $keys"
fi
