# batchscan in a GPU-capable image: a slim Python base plus TensorFlow's CUDA extra
# (pip's nvidia-* wheels bring CUDA and cuDNN; the host needs only the NVIDIA driver and
# the NVIDIA container toolkit). Without a GPU the same image runs on the CPU.
#
#   docker build -t batchscan .
#   docker run --rm --gpus all -v /pacs/archive:/archive:ro -v /srv/batchscan:/reports \
#       batchscan scan /archive --out /reports
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY batchscan ./batchscan
# The same install as README's first command, plus the CUDA extra.
RUN pip install '.[gpu]' && rm -rf /src

RUN useradd --create-home --uid 10001 batchscan && mkdir -p /reports \
    && chown batchscan /reports
USER batchscan
WORKDIR /home/batchscan

# The archive is mounted read-only; reports go to a writable volume.
VOLUME ["/archive", "/reports"]
ENTRYPOINT ["batchscan"]
CMD ["--help"]
