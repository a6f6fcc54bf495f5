"""`tessera serve --cluster ray` on a real Ray head (issue 17): two CPU engine replicas
as Ray actors behind one gateway; 16 concurrent greedy streams over both; one replica's
actor killed with ``ray.kill`` mid-stream. Every stream completes with exactly the
tokens of the offline engine (itself checked against transformers), the supervisor
makes the lost replica again, every socket of Ray and Tessera stays on loopback, and
nothing is left behind: no process, no file in their TMPDIR (no key, no socket).

Ray binds its ports on every interface whatever node IP it is given (seen with
``ray start --node-ip-address 127.0.0.1``: its GCS listens on [::]), so the run happens
in a network namespace of its own with only ``lo`` (and a PID namespace, in which
``ray stop`` can only stop this run's processes): tests/cluster/ray_scenario.py, run
with ``unshare`` (root, as here and in CI). Not covered: GPU placement groups, and a
node's real death (the actor kill stands for it).
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tessera import LLM, SamplingParams
from tests.cluster.ray_scenario import NUM_STREAMS, is_loopback, max_tokens, prompt

pytestmark = pytest.mark.slow

SCENARIO = Path(__file__).with_name("ray_scenario.py")


@pytest.fixture(scope="module")
def expected() -> list[list[int]]:
    llm = LLM("smollm2-135m-instruct", device="cpu", show_progress=False)
    params = [SamplingParams(temperature=0.0, max_tokens=max_tokens(i), ignore_eos=True)
              for i in range(NUM_STREAMS)]  # fmt: skip
    outs = llm.generate([prompt(i) for i in range(NUM_STREAMS)], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_two_ray_replicas_one_actor_killed_mid_stream_every_stream_token_exact(
    tmp_path, request, expected
):
    unshare = shutil.which("unshare")
    assert unshare is not None, "this test needs unshare (util-linux) and root"
    out = tmp_path / "result.json"
    # Ray's unix socket paths must fit in 107 bytes: a short work directory
    work = Path(tempfile.mkdtemp(prefix="tray-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(work, ignore_errors=True))
    started = time.monotonic()
    # --kill-child: should this test be stopped, the namespace's first process dies,
    # and the kernel ends every process in it (Ray's daemons included).
    run = subprocess.run(
        [unshare, "--net", "--pid", "--fork", "--mount-proc", "--kill-child",
         sys.executable, "-P", str(SCENARIO), str(out), str(work / "run")],
        capture_output=True, text=True, timeout=480,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    log = work / "run" / "serve.log"
    tail = log.read_text()[-6000:] if log.exists() else ""
    assert run.returncode == 0, f"{run.stderr[-4000:]}\n--- serve.log ---\n{tail}"
    r = json.loads(out.read_text())
    print(f"ray scenario: {elapsed:.1f}s, replicas ready after {r['ready_s']:.1f}s; open at "
          f"the kill {r['open_at_kill']}, resumed {r['resumed']}")
    assert r["interfaces"] == ["lo"]

    # every stream complete and token-exact, across the kill
    assert not r["errors"], r["errors"]
    for i in range(NUM_STREAMS):
        assert r["tokens"][i] == expected[i], f"stream {i}: tokens lost, repeated or changed"
        assert 2 <= r["tokens_at_kill"][i] < len(expected[i]), f"stream {i}: not mid-stream"
    # both replicas ran streams when the kill came; the survivor resumed the victim's
    open_at_kill = r["open_at_kill"]
    assert len(open_at_kill) == 2 and all(n > 0 for n in open_at_kill), open_at_kill
    assert sum(open_at_kill) == NUM_STREAMS
    survivors = [a for a in r["addresses_at_kill"] if r["resumed"].get(a, 0) > 0]
    assert len(survivors) == 1, r["resumed"]
    victim_open = open_at_kill[1 - r["addresses_at_kill"].index(survivors[0])]
    assert r["resumed"][survivors[0]] == victim_open

    # every replica's scheduler, the first ones and the one made again, got the flags
    for command in r["schedulers"] + r["schedulers_after"]:
        assert f"--kv-cache-memory {256 << 20} " in command, command
    assert len(r["schedulers"]) == len(r["schedulers_after"]) == 2

    # the killed actor and its scheduler are gone; replica 1 was made again
    assert len(r["victim_pids"]) == 3, r["victim_pids"]  # the actor, its guard, its scheduler
    assert r["victim_pids_alive"] == []
    made = sorted(name.rpartition("-replica-")[2] for name in r["actors_after"])
    assert made == ["0.0", "1.1"], r["actors_after"]
    assert len(r["replicas_after"]) == 2 and survivors[0] in r["replicas_after"]

    # sockets: Tessera's bind 127.0.0.1 itself; nothing talks to a non-loopback address
    tessera = {k: v for k, v in r["sockets"].items() if "tessera" in k}
    assert any("tessera.scheduler" in k for k in tessera), list(r["sockets"])
    assert any("tessera serve" in k for k in tessera), list(r["sockets"])
    for process, pairs in r["sockets"].items():
        for local, remote in pairs:
            wildcard = ipaddress.ip_address(local).is_unspecified
            assert is_loopback(local) or (wildcard and process not in tessera), (process, local)
            assert is_loopback(remote) or ipaddress.ip_address(remote).is_unspecified, (
                process, remote)

    # a clean stop, and nothing left behind
    assert r["serve_rc"] == 0
    assert r["left"] == []
    assert r["files_left"] == []
