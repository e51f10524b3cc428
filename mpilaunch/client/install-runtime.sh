#!/bin/bash
# The StartTask of `mpilaunch pool create --install-runtime`: installs on an Azure Batch node (Ubuntu or Debian,
# run as the pool's admin auto-user) Open MPI, OpenSSH and the mpilaunch node runtime from the wheel staged next
# to this script, exactly the client's version.
#
#   install-runtime.sh WHEEL
#
# Idempotent: Batch re-runs StartTasks after every reboot and reimage, and may re-run one without either. Packages
# already present are not reinstalled, and a runtime already installed from the same wheel (same sha256) is kept.
# A half-made installation (StartTask killed mid-way) is made again. Package scripts may not start services: the
# StartTask must leave no process behind (Batch cannot re-run a StartTask whose processes outlive it).
# Every failure ends with one line `install-runtime: error: ...` on stderr and a non-zero exit code.
set -euo pipefail

PREFIX=${MPILAUNCH_PREFIX:-/opt/mpilaunch}
PACKAGES=(openmpi-bin openssh-server openssh-client python3 python3-venv util-linux ca-certificates)
MIN_PYTHON=3.10

say() { echo "install-runtime: $*"; }
fail() { echo "install-runtime: error: $*" >&2; exit 1; }
step=starting
trap 'fail "step \"$step\" failed (exit code $?); its output is above"' ERR
made_policy=0  # 1 while our policy-rc.d is in place: removed on any exit, failures included
trap '((made_policy)) && rm -f /usr/sbin/policy-rc.d' EXIT

[[ $# -eq 1 ]] || fail "usage: install-runtime.sh WHEEL"
wheel=$1
[[ -f $wheel ]] || fail "wheel '$wheel' not found in $PWD (the StartTask's resource files did not arrive)"
[[ $(id -u) -eq 0 ]] || fail "runs as $(id -un), not root: give the StartTask an admin auto-user"
command -v apt-get >/dev/null || fail "this image has no apt-get: use an Ubuntu or Debian image (see docs/azure.md)"

step="install packages"
missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # No service may be started by the packages' scripts (sshd would outlive the StartTask): policy-rc.d, the
    # Debian way to say so, for the duration of the install only.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
    fi
    # At boot, unattended-upgrades may hold the dpkg lock for minutes: wait for it rather than fail.
    lock=(-o DPkg::Lock::Timeout=600)
    apt-get "${lock[@]}" update -qq
    apt-get "${lock[@]}" install -y -qq --no-install-recommends "${missing[@]}"
    if ((made_policy)); then rm -f /usr/sbin/policy-rc.d && made_policy=0; fi
fi

step="check python3"
python3 -c "import sys; sys.exit(sys.version_info < tuple(map(int, '$MIN_PYTHON'.split('.'))))" \
    || fail "python3 is $(python3 -V 2>&1); the node runtime needs >= $MIN_PYTHON: use a newer image"

step="install the runtime"
digest=$(sha256sum "$wheel" | cut -c1-16)
target=$PREFIX/$digest
if [[ -f $target/.installed ]]; then
    say "runtime from $(basename "$wheel") already installed in $target"
else
    rm -rf "$target"
    mkdir -p "$PREFIX"
    python3 -m venv --system-site-packages "$target"  # packages of the image stay importable
    "$target/bin/pip" install -q --disable-pip-version-check --no-input "$(realpath "$wheel")[checkpoint]"
    touch "$target/.installed"
    say "installed $(basename "$wheel") in $target"
fi

step="activate the runtime"
ln -sfn "$target" "$PREFIX/current.new" && mv -Tf "$PREFIX/current.new" "$PREFIX/current"
ln -sfn "$PREFIX/current/bin/node-runtime" /usr/local/bin/node-runtime
for old in "$PREFIX"/*; do  # runtimes of earlier wheels go; the one in use stays
    [[ $old == "$target" || $old == "$PREFIX/current" ]] || rm -rf "$old"
done
say "$(node-runtime --version) ready; $(mpirun --version 2>&1 | head -n1); $(python3 -V)"
