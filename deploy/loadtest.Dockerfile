# The load-test image the tritonvision-loadtest chart runs: Locust, the SDK and loadtest/ (no server, no GPU).
#
#   docker build -f deploy/loadtest.Dockerfile -t <registry>/tritonvision-loadtest:0.1.0 .
FROM python:3.11-slim
WORKDIR /opt/tritonvision
COPY . .
RUN pip install --no-cache-dir '.[loadtest]' -c constraints.txt
# The chart runs as this user with a read-only root filesystem; Locust's web UI on 8089, workers on 5557.
USER 1000:1000
EXPOSE 8089 5557
