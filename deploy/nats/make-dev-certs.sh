#!/bin/sh
# A throwaway CA, a server certificate for localhost/127.0.0.1 and a client certificate, for
# trying secure-tls.conf on one machine (valid 30 days). Never use these on a real mesh.
#   deploy/nats/make-dev-certs.sh [DIR]        (default .servemesh/tls)
set -eu
dir=${1:-.servemesh/tls}
mkdir -p "$dir"
cd "$dir"
umask 077
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key ca-key.pem
openssl req -x509 -new -key ca-key.pem -days 30 -subj "/CN=servemesh dev CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.pem

leaf() {  # name, common name, extended key usage, subjectAltName (or empty)
    key "$1-key.pem"
    openssl req -new -key "$1-key.pem" -subj "/CN=$2" -out "$1.csr"
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature"
        echo "extendedKeyUsage=$3"
        echo "authorityKeyIdentifier=keyid"
        [ -z "$4" ] || echo "subjectAltName=$4"
    } > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 30 \
        -extfile "$1.ext" -out "$1.pem" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}
leaf server localhost serverAuth "DNS:localhost,IP:127.0.0.1"
leaf client servemesh-client clientAuth ""
rm -f ca.srl
echo "CA, server and client certificates in $(pwd)"
