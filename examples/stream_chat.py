"""Stream a chat completion from a running `tessera serve` through the generated stubs.

    make serve                      # in another terminal (or: tessera serve --port 50051)
    .venv/bin/python examples/stream_chat.py "Write a haiku about the sea"
"""

import sys

import grpc

from tessera.proto.tessera.v1 import generate_pb2 as pb
from tessera.proto.tessera.v1 import generate_pb2_grpc as pb_grpc


def main() -> None:
    question = " ".join(sys.argv[1:]) or "Write a haiku about the sea"
    with grpc.insecure_channel("127.0.0.1:50051") as channel:
        stub = pb_grpc.TesseraStub(channel)
        request = pb.GenerateRequest(
            chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=question)]),
            sampling=pb.SamplingParameters(temperature=0.7, top_p=0.95, max_tokens=200, seed=1),
        )
        for msg in stub.Generate(request):
            print(msg.text, end="", flush=True)
            if msg.finish_reason:
                print(f"\n[{pb.FinishReason.Name(msg.finish_reason)}, "
                      f"{msg.usage.completion_tokens} tokens]")


if __name__ == "__main__":
    main()
