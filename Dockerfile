# The image every node of the Ray cluster runs (cluster.yaml): Ray on Python 3.11 with CUDA, this service, and coturn.
#
#   docker build -t seedvc-serve:0.1.0 .
#   docker tag seedvc-serve:0.1.0 your-registry.example.com/seedvc-serve:0.1.0
#   docker push your-registry.example.com/seedvc-serve:0.1.0
#
# The tag is the package version (pyproject.toml). cluster.yaml names this image; tests/test_cluster_config.py checks
# that the two agree, and that this base image's Ray and Python versions are the ones requirements.txt and
# pyproject.toml pin.
#
# The base tag follows Ray's naming for its official images (<ray version>-py<python>-gpu; the CUDA variants are
# -cu12x). It could not be pulled where this file was written (no registry access): check it with `docker pull`.
# Ray's ML images (rayproject/ray-ml) stopped after 2.49.x, hence the plain Ray image.
FROM rayproject/ray:2.60.0-py311-gpu

# coturn: the TURN server that the head node runs for WebRTC. curl: the start command asks EC2's instance metadata for
# the head's addresses to configure it. The Debian package's service is never started: the start command runs it.
USER root
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends coturn curl \
    && rm -rf /var/lib/apt/lists/*
USER ray

WORKDIR /home/ray/seedvc

# Dependencies first, so that a code change does not reinstall torch. requirements.txt pins every direct dependency.
# s3fs lets the voice store live in S3 (SEEDVC_VOICE_STORE=s3://...) and downloads model bundles; boto3 is what the
# Ray autoscaler on the head node launches EC2 instances with. Both are pinned to the versions pip resolves together
# with requirements.txt (s3fs follows fsspec's version).
COPY --chown=ray:users requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt s3fs==2026.9.0 boto3==1.43.117

# The package itself, editable: the ingress serves the web client from client/web next to its code, and those files
# are not Python modules a regular wheel would carry. .dockerignore keeps tests, fixtures, voices and secrets out.
COPY --chown=ray:users . .
RUN pip install --no-cache-dir --no-deps -e .

# The Hugging Face hub cache for the official weights. cluster.yaml mounts a host directory at /home/ray/cache, so
# the ~1.5 GB download survives container restarts and stopped-and-restarted nodes.
ENV HF_HOME=/home/ray/cache/huggingface
