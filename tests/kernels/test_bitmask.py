"""The token-bitmask kernel against its torch reference and against a bit-by-bit reading
of the mask in plain Python (the outside reference for the bit order)."""

from __future__ import annotations

import pytest
import torch

from tessera.kernels.bitmask import apply_token_bitmask_, apply_token_bitmask_ref_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _allowed_by_hand(words: list[int], vocab: int) -> list[bool]:
    return [v // 32 < len(words) and bool((words[v // 32] >> (v % 32)) & 1) for v in range(vocab)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch, vocab, rows", [(4, 100, [1, 3]), (3, 64, [0, 1, 2]), (5, 37, [])])
def test_bitmask_matches_reference_and_bits(dtype, batch, vocab, rows) -> None:
    gen = torch.Generator().manual_seed(batch * 1000 + vocab)
    logits = torch.randn(batch, vocab, generator=gen).to(DEVICE, dtype)
    width = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (len(rows), width), generator=gen,
                            dtype=torch.int64).to(torch.int32).to(DEVICE)
    row_ids = torch.tensor(rows, dtype=torch.int64, device=DEVICE)
    expected = apply_token_bitmask_ref_(logits.clone(), bitmask, row_ids)
    actual = apply_token_bitmask_(logits.clone(), bitmask, row_ids)
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    for r, row in enumerate(rows):
        allowed = _allowed_by_hand([int(w) for w in bitmask[r].tolist()], vocab)
        for v in range(vocab):
            if allowed[v]:
                assert actual[row, v] == logits[row, v]
            else:
                assert actual[row, v] == float("-inf")
    untouched = [b for b in range(batch) if b not in rows]
    assert torch.equal(actual[untouched], logits[untouched])


def test_tokens_past_the_mask_are_forbidden() -> None:
    logits = torch.zeros(1, 40, device=DEVICE)
    bitmask = torch.full((1, 1), -1, dtype=torch.int32, device=DEVICE)  # 32 tokens, all allowed
    rows = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    out = apply_token_bitmask_(logits.clone(), bitmask, rows)
    assert torch.isfinite(out[0, :32]).all() and torch.isinf(out[0, 32:]).all()
    assert torch.equal(out, apply_token_bitmask_ref_(logits.clone(), bitmask, rows))


def test_shape_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="bitmask has 2 rows"):
        apply_token_bitmask_(
            torch.zeros(2, 8, device=DEVICE),
            torch.zeros(2, 1, dtype=torch.int32, device=DEVICE),
            torch.zeros(1, dtype=torch.int64, device=DEVICE),
        )
