#!/usr/bin/env sh
# The same streamed chat with grpcurl, through server reflection (no .proto files needed).
grpcurl -plaintext -d '{
  "chat": {"messages": [{"role": "user", "content": "Write a haiku about the sea"}]},
  "sampling": {"temperature": 0.7, "max_tokens": 200, "seed": 1}
}' 127.0.0.1:50051 tessera.v1.Tessera/Generate

# Health, as Kubernetes probes see it:
#   grpcurl -plaintext 127.0.0.1:50051 grpc.health.v1.Health/Check
