#!/usr/bin/env bash
# Builds the image's base for machines without Docker Hub: Debian bookworm
# (minbase, Python 3.11 from Debian, CA certificates, uv) with debootstrap,
# committed into buildah's storage. `bentoml containerize` then starts from it
# through the BASE_IMAGE build argument (container/Dockerfile.template); with
# Docker and Docker Hub, the default python:3.11-slim is used instead.
#
#   container/build-base.sh [IMAGE]     default: localhost/inception-v3-base:bookworm
#
# Does nothing when IMAGE is already in buildah's storage. Needs root, debootstrap,
# buildah, and a python with pip (PYTHON) to fetch uv's wheel from the package index.
# Environment: DEBIAN_MIRROR, UV_VERSION, PYTHON, STORAGE_DRIVER (vfs where
# overlay is unavailable), BUILDAH_ISOLATION (chroot where OCI runtimes fail).
set -euo pipefail

IMAGE=${1:-localhost/inception-v3-base:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
UV_VERSION=${UV_VERSION:-0.13.8}
PYTHON=${PYTHON:-python3}

if buildah inspect --type image "$IMAGE" >/dev/null 2>&1; then
    echo "base image $IMAGE already built"
    exit 0
fi

case "$(uname -m)" in
x86_64) debian_arch=amd64 wheel_platform=manylinux2014_x86_64 ;;
aarch64) debian_arch=arm64 wheel_platform=manylinux2014_aarch64 ;;
*) echo "unsupported architecture $(uname -m)" >&2; exit 1 ;;
esac

work=$(mktemp -d /tmp/inception-v3-base.XXXXXX)
container=""
cleanup() {
    if [ -n "$container" ]; then buildah rm "$container" >/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

echo "debootstrap bookworm ($debian_arch) from $DEBIAN_MIRROR"
debootstrap --variant=minbase --arch="$debian_arch" --include=python3,ca-certificates \
    bookworm "$work/rootfs" "$DEBIAN_MIRROR"
cat >"$work/rootfs/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR bookworm main
deb $DEBIAN_MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
# Certificate authorities this machine trusts beyond Debian's (a TLS-inspecting
# egress proxy, for instance): without them uv cannot reach the package index
# during the build. They stay trusted in images built from this base.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$work/rootfs/usr/local/share/ca-certificates/"
fi

# Debian's pip refuses `pip install uv` (externally managed): take the binary from its wheel.
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --platform "$wheel_platform" \
    --dest "$work/uv" "uv==$UV_VERSION"
"$PYTHON" -m zipfile -e "$work"/uv/uv-*.whl "$work/uv/wheel"
install -m 0755 "$work"/uv/wheel/uv-*.data/scripts/uv "$work/rootfs/usr/local/bin/uv"

container=$(buildah from scratch)
tar -C "$work/rootfs" -cf "$work/rootfs.tar" --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' .
buildah add "$container" "$work/rootfs.tar" /
buildah run "$container" -- sh -c '
    set -e
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get upgrade -q -y
    update-ca-certificates
    apt-get clean
    rm -rf /var/lib/apt/lists/* /var/log/*.log /var/cache/debconf/*-old
'
buildah config \
    --env LANG=C.UTF-8 \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --env UV_SYSTEM_CERTS=1 \
    --label org.opencontainers.image.description="Debian bookworm, Python 3.11, uv $UV_VERSION (inception_v3 base)" \
    --cmd python3 \
    "$container"
buildah commit --rm "$container" "$IMAGE"
container=""
echo "built $IMAGE"
