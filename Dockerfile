# The mpilaunch task container image: Open MPI, OpenSSH (the coordination service), and a Python virtual
# environment with mpi4py and the node side of this project only (the `node-runtime` command and the checkpoint
# API; none of the client's or the emulator's code or dependencies). Build with scripts/build-image, or
#   docker build -t mpilaunch:latest .            (legacy builder; no BuildKit features are used)
# See docs/container-image.md for extending it, running as root, extra CA certificates and pushing it.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

# The default (non-root) user; tasks may run as root instead (`--user root`, see docs/container-image.md).
ARG USER_NAME=mpi
ARG USER_UID=1000

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Distribution packages track the base image's suite, so they are not pinned (DL3008).
# No SSH host keys are kept: the node runtime generates per-task keys at run time.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates iproute2 openmpi-bin openssh-client openssh-server python3 python3-venv \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/log/apt/* /var/log/dpkg.log /etc/ssh/ssh_host_* \
    && mkdir -p /run/sshd \
    && useradd --create-home --uid "${USER_UID}" --shell /bin/bash "${USER_NAME}"

# Optional extra CA certificates (TLS-inspecting proxies): every certs/*.crt in the build context is trusted,
# by the system, pip and the Azure SDK alike. The directory may hold none.
COPY certs/ /tmp/certs/
RUN find /tmp/certs -maxdepth 1 -name '*.crt' -type f -exec cp -t /usr/local/share/ca-certificates/ {} + \
    && rm -rf /tmp/certs \
    && update-ca-certificates >/dev/null
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# The virtual environment. Dependencies first (from pyproject.toml only: the node install and the checkpoint
# extra), so that source changes rebuild little.
ENV VIRTUAL_ENV=/opt/mpilaunch
ENV PATH=${VIRTUAL_ENV}/bin:${PATH}
COPY pyproject.toml /tmp/src/
RUN python3 -m venv "${VIRTUAL_ENV}" \
    && python3 -c 'import sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb"))["project"]; \
print(*p["dependencies"], *p["optional-dependencies"]["checkpoint"], sep="\n")' \
        /tmp/src/pyproject.toml >/tmp/requirements.txt \
    && pip install --quiet -r /tmp/requirements.txt "setuptools>=70.1" \
    && rm /tmp/requirements.txt
COPY README.md /tmp/src/
COPY node_runtime /tmp/src/node_runtime
# the programs' name for the checkpoint API (mpilaunch.checkpoint), the errors, and the entry point that tells a
# node install how to get the client: the client itself is not in the image
COPY mpilaunch/__init__.py mpilaunch/checkpoint.py mpilaunch/errors.py mpilaunch/entry.py /tmp/src/mpilaunch/
RUN pip install --quiet --no-deps --no-build-isolation /tmp/src \
    && pip uninstall --quiet --yes setuptools \
    && rm -rf /tmp/src \
    && node-runtime --version

# Open MPI defaults that work in containers: TCP between nodes, shared memory within one (no CMA: containers lack
# ptrace rights), and mpirun allowed as root when a task runs as root.
ENV OMPI_MCA_pml=ob1 \
    OMPI_MCA_btl=self,vader,tcp \
    OMPI_MCA_btl_vader_single_copy_mechanism=none \
    OMPI_ALLOW_RUN_AS_ROOT=1 \
    OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

LABEL org.opencontainers.image.title="mpilaunch task image" \
      org.opencontainers.image.description="Open MPI, OpenSSH, mpi4py and the mpilaunch node runtime (no client)"

USER ${USER_NAME}
WORKDIR /home/${USER_NAME}
CMD ["bash"]
