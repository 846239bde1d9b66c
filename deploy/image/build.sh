#!/usr/bin/env bash
# Builds the container image from the repository's Dockerfile and tags it (default
# region-supervisor:latest), with whichever of docker, podman or buildah works here.
#
#   deploy/image/build.sh            # `make image`
#   IMAGE=name:tag IMAGE_TOOL=buildah deploy/image/build.sh
#
# The base image (debian:bookworm-slim) is taken from the builder's local storage. When it is not
# there and mmdebstrap is installed, it is made here from Debian's packages (minbase bookworm with
# bookworm-updates and bookworm-security, documentation and locales left out as in Debian's own slim
# image) and stored as localhost/debian:bookworm-slim; otherwise docker or podman pull it as usual.
# buildah and podman build with --isolation chroot (no container runtime is needed) and in the docker
# image format, the only one in which they keep HEALTHCHECK. An index of Python packages set on this
# machine (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL as http(s) URLs) is passed into the build, and the CA
# bundle pip is told to use (PIP_CERT, pip's global.cert, SSL_CERT_FILE) as the build secret pip_cert;
# nothing of this machine is written into the image.
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE=${IMAGE:-region-supervisor:latest}
BASE=debian:bookworm-slim
LOCAL_BASE=localhost/$BASE
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

pick_tool() {
    if [ -n "${IMAGE_TOOL:-}" ]; then echo "$IMAGE_TOOL"; return; fi
    # A docker client without a reachable daemon cannot build: ask the daemon, not the PATH.
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then echo docker; return; fi
    if command -v buildah >/dev/null 2>&1; then echo buildah; return; fi
    if command -v podman >/dev/null 2>&1; then echo podman; return; fi
    echo "no image builder: install docker, podman or buildah (Debian: apt-get install buildah mmdebstrap)" >&2
    exit 69
}

TOOL=$(pick_tool)
case $TOOL in
    docker|podman|buildah) ;;
    *) echo "IMAGE_TOOL must be docker, podman or buildah, not ${TOOL@Q}" >&2; exit 2 ;;
esac
if ! command -v "$TOOL" >/dev/null 2>&1; then
    echo "IMAGE_TOOL=$TOOL: $TOOL is not installed" >&2; exit 69
fi
if [ "$TOOL" = docker ] && ! docker info >/dev/null 2>&1; then
    echo "IMAGE_TOOL=docker: no docker daemon answers (docker info); buildah builds without one" >&2; exit 69
fi

has_image() {
    case $TOOL in
        docker) docker image inspect "$1" >/dev/null 2>&1 ;;
        *) "$TOOL" inspect --type image "$1" >/dev/null 2>&1 ;;
    esac
}

make_base() {
    local dir
    dir=$(mktemp -d)
    trap 'rm -rf "$dir"' RETURN
    echo "making $LOCAL_BASE from Debian packages (mmdebstrap, $MIRROR)"
    # The dpkg excludes stay in the image (/etc/dpkg/dpkg.cfg.d), so that what the Dockerfile installs
    # is slim too; apt's lists are dropped, as in Debian's image.
    # merged-usr: /bin -> usr/bin set up by mmdebstrap itself, without the usrmerge package (and the perl
    # it pulls in); apt.conf.d/: no .deb files or caches kept after an install, as in Debian's image.
    mmdebstrap --variant=minbase --quiet \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --dpkgopt='path-exclude=/usr/share/lintian/*' \
        --customize-hook='copy-in deploy/image/apt.conf.d/docker-clean deploy/image/apt.conf.d/docker-no-languages /etc/apt/apt.conf.d' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb "$1"/var/log/*.log' \
        bookworm "$dir/rootfs.tar" \
        "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" "deb $SECURITY_MIRROR bookworm-security main"
    printf 'FROM scratch\nADD rootfs.tar /\nCMD ["bash"]\n' > "$dir/Dockerfile"
    case $TOOL in
        docker) docker build -q -t "$LOCAL_BASE" -f "$dir/Dockerfile" "$dir" >/dev/null ;;
        *) "$TOOL" build --isolation chroot --quiet -t "$LOCAL_BASE" -f "$dir/Dockerfile" "$dir" >/dev/null ;;
    esac
}

base_arg=()
if has_image "$LOCAL_BASE"; then
    base_arg=(--build-arg "BASE_IMAGE=$LOCAL_BASE")
elif ! has_image "$BASE"; then
    if command -v mmdebstrap >/dev/null 2>&1; then
        make_base
        base_arg=(--build-arg "BASE_IMAGE=$LOCAL_BASE")
    else
        echo "$BASE is not in $TOOL's storage and mmdebstrap is not installed (apt-get install mmdebstrap" \
             "makes it here): pulling it from its registry" >&2
    fi
fi

pip_args=()
for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
    value=${!var:-}
    case $value in
        http://*|https://*) pip_args+=(--build-arg "$var=$value") ;;
    esac
done

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)
revision=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
label_args=(--build-arg "VERSION=${version:-unknown}" --build-arg "REVISION=$revision")

# A CA bundle pip uses on this machine (a proxy re-signing TLS, say) goes in as a build secret.
secret_args=()
cert=${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
cert=${cert:-${SSL_CERT_FILE:-}}
if [ -n "$cert" ] && [ -f "$cert" ]; then
    secret_args=(--secret "id=pip_cert,src=$cert")
fi

started=$(date +%s)
case $TOOL in
    docker)
        docker build "${base_arg[@]}" "${pip_args[@]}" "${label_args[@]}" "${secret_args[@]}" -t "$IMAGE" . ;;
    buildah)
        buildah build --isolation chroot --format docker --layers --pull=false \
            "${base_arg[@]}" "${pip_args[@]}" "${label_args[@]}" "${secret_args[@]}" -t "$IMAGE" . ;;
    podman)
        podman build --isolation chroot --format docker --layers --pull=false \
            "${base_arg[@]}" "${pip_args[@]}" "${label_args[@]}" "${secret_args[@]}" -t "$IMAGE" . ;;
esac
echo "built $IMAGE with $TOOL in $(( $(date +%s) - started )) s"
