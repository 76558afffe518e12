# batchscan in an image: a virtual environment installed from the lock files (every package at
# the version CI tests, each file checked against its sha256), a CycloneDX SBOM of that
# environment in /usr/share/doc/batchscan/sbom.cdx.json, a non-root user. With
# --build-arg EXTRAS=gpu the same file makes the GPU image (requirements/gpu.txt: TensorFlow's
# CUDA wheels; the host needs only the NVIDIA driver and container toolkit).
#
#   docker build -t batchscan .
#   docker build -t batchscan:gpu --build-arg EXTRAS=gpu .
#   docker run --rm -v /pacs/archive:/archive:ro -v /srv/batchscan:/reports \
#       batchscan scan /archive --out /reports
#
# BASE: any Debian-like image with Python 3.11, its venv module and useradd.
# tests/test_container.py builds it with podman on a Debian bookworm root filesystem it makes
# with mmdebstrap (python3, python3-venv), as docs/install.md shows.
ARG BASE=python:3.11-slim
FROM ${BASE}
# empty: requirements/prod.txt; gpu: requirements/gpu.txt; ray: requirements/ray.txt
ARG EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/batchscan/bin:$PATH
# Unset, pip downloads the locked files from the package index. A builder that already holds
# them (tests/test_container.py: the wheels CI's own install of the lock left in pip's cache)
# mounts them and skips the download, the same files checked against the same hashes:
#   podman build -v WHEELS:/wheels:ro --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels .
ARG PIP_NO_INDEX PIP_FIND_LINKS

WORKDIR /src
# The image's locks first: this layer (the large one) is rebuilt when one of them changes, not
# with the code (nor with ci.txt, which only CI installs).
COPY requirements/prod.txt requirements/gpu.txt requirements/ray.txt requirements/tools.txt \
    ./requirements/
RUN python3 -m venv /opt/batchscan \
    && /opt/batchscan/bin/pip install --require-hashes -r "requirements/${EXTRAS:-prod}.txt"
COPY pyproject.toml README.md ./
COPY batchscan ./batchscan
# The package alone, built by the locked setuptools; then the SBOM of the environment, made by
# cyclonedx-bom from its own locked venv, which goes again with the sources.
RUN /opt/batchscan/bin/pip install --no-deps --no-build-isolation . \
    && python3 -m venv /tmp/tools \
    && /tmp/tools/bin/pip install --require-hashes -r requirements/tools.txt \
    && mkdir -p /usr/share/doc/batchscan \
    && /tmp/tools/bin/cyclonedx-py environment --pyproject pyproject.toml --output-reproducible \
        -o /usr/share/doc/batchscan/sbom.cdx.json /opt/batchscan \
    && rm -rf /tmp/tools /src \
    && useradd --create-home --uid 10001 batchscan \
    && mkdir -p /reports && chown batchscan /reports
USER batchscan
WORKDIR /home/batchscan

# The archive is mounted read-only; reports go to a writable volume.
VOLUME ["/archive", "/reports"]
ENTRYPOINT ["batchscan"]
CMD ["--help"]
