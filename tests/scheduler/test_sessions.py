"""GatewaySessions.route_token_rows, a step's running rows queued whole, against
route() for each row (the path it replaced): on random rows, owners (several
gateways, gone ones) and queue times, every gateway reads back the same outputs, and
the same queue times are left."""

from __future__ import annotations

import random

import pytest

from tessera.common.wire import sequence_outputs
from tessera.scheduler.outputs import RequestOutput
from tessera.scheduler.sessions import GatewaySessions

GATEWAYS = [b"gw-a", b"gw-b", b"gw-c"]


def read_back(sessions: GatewaySessions) -> dict[bytes, tuple[dict[str, object], list]]:
    """What each gateway would read: its outputs by request id (the order of rows is
    no promise) and its rejections."""
    return {
        gateway: ({seq.request_id: seq for seq in sequence_outputs(message)},
                  list(message.rejected))
        for gateway, message in sessions.take_outbox().items()
    }  # fmt: skip


@pytest.mark.parametrize("seed", range(30))
def test_token_rows_read_back_as_one_output_each(seed):
    rng = random.Random(seed)
    num_gateways = rng.choice([1, 1, 2, 3])
    rows = {}
    owners = {}
    for index in range(rng.randint(0, 40)):
        request_id = f"r{index}"
        rows[request_id] = (rng.randrange(32000), rng.randint(1, 99), rng.randint(1, 99),
                            rng.choice([0, 16, 32]))  # fmt: skip
        if rng.random() < 0.95:  # else its gateway is gone
            owners[request_id] = rng.choice(GATEWAYS[:num_gateways])
    queue_seconds = {rid: rng.uniform(0.01, 2) for rid in rows if rng.random() < 0.2}
    queue_seconds["never-output"] = 0.5  # admitted, no token yet: left alone

    batched, reference = GatewaySessions(socket=None), GatewaySessions(socket=None)
    for sessions in (batched, reference):
        sessions.owners = dict(owners)
    # What is queued for a gateway already stays in its message, either way.
    for sessions in (batched, reference):
        sessions.reject(GATEWAYS[0], ["x"], "overloaded", "busy")
        sessions.owners["done"] = GATEWAYS[-1]
        sessions.route(RequestOutput("done", [7], [], True, "length", None, 3, 4))
    left_reference = dict(queue_seconds)
    for request_id, (token_id, num_prompt, num_output, num_cached) in rows.items():
        output = RequestOutput(request_id, [token_id], [], False, None, None, num_prompt,
                               num_output, num_cached)  # fmt: skip
        seconds = left_reference.pop(request_id, 0.0) if request_id in owners else 0.0
        reference.route(output, queue_seconds=seconds)
    left_batched = dict(queue_seconds)
    batched.route_token_rows(dict(rows), left_batched)

    assert left_batched == left_reference
    assert read_back(batched) == read_back(reference)
