# shellcheck shell=bash
# Shared by scripts/build-image and scripts/build-vm-image (sourced, not run): quiet steps, the local Debian base
# image, this machine's extra CA certificates, and "build only when an input changed".
#
# The sourcing script sets: ME (its name, for messages), BASE (the FROM image), CA_SRC (where extra *.crt come from;
# empty for none) and is run from the repository root.

LOG_DIR=$PWD/.tools/logs
mkdir -p "$LOG_DIR"
export DOCKER_BUILDKIT=0  # the legacy builder: Debian's docker.io has no buildx

step() {  # step NAME CMD...: run quietly, show the log if it fails
    local name=$1; shift
    if ! "$@" >"$LOG_DIR/$ME-$name.log" 2>&1; then
        echo "$ME: step '$name' failed; its log ($LOG_DIR/$ME-$name.log):" >&2
        tail -n 40 "$LOG_DIR/$ME-$name.log" >&2
        exit 1
    fi
}

debian_mirror() {  # the first Debian archive this machine's apt uses, else deb.debian.org
    local uri
    uri=$(grep -hoE '(URIs:|^deb) +[a-z]+://[^ ]+/debian/?( |$)' /etc/apt/sources.list.d/*.sources \
        /etc/apt/sources.list.d/*.list /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -n1 || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

make_debian_base() {  # make_debian_base SUITE SLIM(0|1): debootstrap + docker import, tagged $BASE (own process)
    local suite=$1 slim=$2
    rootfs=$(mktemp -d "${TMPDIR:-/tmp}/mpilaunch-rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase "$suite" "$rootfs" "$(debian_mirror)"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/*
    if ((slim)); then  # what the official -slim images do: no docs, man pages or translations, now or later
        cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'SLIM'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
SLIM
        find "$rootfs/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
        find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
        rm -rf "$rootfs"/usr/share/{man,info,lintian,linda}/*
        find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    fi
    # apt inside containers: no recommends, no apt caches kept (as in the official images)
    printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
        >"$rootfs/etc/apt/apt.conf.d/90mpilaunch-norecommends"
    tar -C "$rootfs" --numeric-owner -c . | docker import --change 'CMD ["bash"]' - "$BASE"
}

ensure_base() {  # $BASE exists locally: made with debootstrap when it is a Debian image, else pulled
    docker image inspect "$BASE" >/dev/null 2>&1 && return 0
    if [[ $BASE =~ ^(docker\.io/)?(library/)?debian:([a-z]+)(-slim)?$ ]]; then
        command -v debootstrap >/dev/null || { echo "$ME: debootstrap is missing (run scripts/setup)" >&2; exit 1; }
        local slim=0
        [[ -z ${BASH_REMATCH[4]} ]] || slim=1
        # A separate bash, so that `set -e` holds inside the function (it does not under `if`, as in step).
        step base-image bash -euo pipefail -c "$(declare -f debian_mirror make_debian_base)
            BASE=$(printf %q "$BASE"); make_debian_base $(printf %q "${BASH_REMATCH[3]}") $slim"
    else
        step base-image docker pull "$BASE"
    fi
}

stage_ca_certs() {  # mirror $CA_SRC/*.crt into certs/host-*.crt (the images install certs/*.crt)
    mkdir -p certs
    local want=() f
    if [[ -n $CA_SRC && -d $CA_SRC ]]; then
        while IFS= read -r -d '' f; do want+=("host-$(basename "$f")"); done \
            < <(find "$CA_SRC" -maxdepth 2 -name '*.crt' -type f -print0 | sort -z)
        for f in "${want[@]}"; do
            local src
            src=$(find "$CA_SRC" -maxdepth 2 -name "${f#host-}" -type f | head -n1)
            cmp -s "$src" "certs/$f" || cp "$src" "certs/$f"
        done
    fi
    for f in certs/host-*.crt; do
        [[ -e $f ]] || continue
        [[ " ${want[*]} " == *" $(basename "$f") "* ]] || rm -f "$f"
    done
}

build_if_changed() {  # build_if_changed TAG FILE... -- DOCKER-BUILD-ARGS...: build TAG unless it was built from
    # exactly these inputs (the base image id, TAG, the FILEs' contents), recorded in its org.mpilaunch.inputs label
    local tag=$1 files=() inputs
    shift
    while [[ $1 != -- ]]; do files+=("$1"); shift; done
    shift
    inputs=$( { docker image inspect -f '{{.Id}}' "$BASE"; echo "$BASE $tag";
                find "${files[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z \
                    | xargs -0 sha256sum; } | sha256sum | cut -c1-32)
    if [[ "$(docker image inspect -f '{{index .Config.Labels "org.mpilaunch.inputs"}}' "$tag" 2>/dev/null)" \
          == "$inputs" ]]; then
        return 0
    fi
    step build docker build --build-arg "BASE_IMAGE=$BASE" --label "org.mpilaunch.inputs=$inputs" -t "$tag" "$@"
    # Images that earlier builds left untagged go, unless a container still uses them.
    docker image prune -f --filter label=org.mpilaunch.inputs >/dev/null 2>&1 || true
}

docker info >/dev/null 2>&1 || { echo "$ME: docker is not running (run scripts/setup)" >&2; exit 1; }
