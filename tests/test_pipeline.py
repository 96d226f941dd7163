"""Pipeline schedules as data (schedule/pipeline.py): 1F1B per LLM stage and the decoupled
encoder schedule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from entrain.schedule.pipeline import encoder_actions, one_f_one_b

CASES = [(P, s, M) for P in (1, 2, 3, 4, 7) for s in range(P) for M in (1, 2, 3, 4, 5, 8, 13)]


def _pos(actions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    pos = {a: i for i, a in enumerate(actions)}
    assert len(pos) == len(actions), f"an action repeats: {actions}"
    return pos


@pytest.mark.parametrize("P,s,M", CASES)
def test_one_f_one_b_each_microbatch_once_forward_before_backward(P, s, M):
    actions = one_f_one_b(P, s, M)
    assert sorted(actions) == sorted([("F", k) for k in range(M)] + [("B", k) for k in range(M)])
    pos = _pos(actions)
    for k in range(M):
        assert pos[("F", k)] < pos[("B", k)]
    # forwards and backwards each run in microbatch order
    assert [k for kind, k in actions if kind == "F"] == list(range(M))
    assert [k for kind, k in actions if kind == "B"] == list(range(M))


@pytest.mark.parametrize("P,s,M", CASES)
def test_one_f_one_b_warmup_and_in_flight_bound(P, s, M):
    actions = one_f_one_b(P, s, M)
    leading = next(i for i, (kind, _) in enumerate(actions) if kind == "B")
    # warm-up: min(P - s - 1, M) forwards, then the steady phase opens with one more forward
    # when microbatches remain (Megatron's 1F1B); so min(P - s, M) forwards precede the first B
    warmup = min(P - s - 1, M)
    assert leading == min(warmup + 1, M) == min(P - s, M)
    # a stage never holds more than P - s microbatches' activations at once
    live = peak = 0
    for kind, _ in actions:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    assert peak == min(P - s, M)


@pytest.mark.parametrize("P,M", [(1, 1), (2, 3), (4, 4), (5, 9)])
def test_one_f_one_b_last_stage_alternates(P, M):
    expected = [a for k in range(M) for a in (("F", k), ("B", k))]
    assert one_f_one_b(P, P - 1, M) == expected


def test_one_f_one_b_hand_written():
    got = " ".join(f"{kind}{k}" for kind, k in one_f_one_b(3, 0, 4))
    assert got == "F0 F1 F2 B0 F3 B1 B2 B3"
    got = " ".join(f"{kind}{k}" for kind, k in one_f_one_b(3, 1, 4))
    assert got == "F0 F1 B0 F2 B1 F3 B2 B3"
    # fewer microbatches than warm-up slots: all forwards, then all backwards
    got = " ".join(f"{kind}{k}" for kind, k in one_f_one_b(4, 0, 2))
    assert got == "F0 F1 B0 B1"


# ---------------------------------------------------------------------------------- encoder


def _needs(M: int, rng: np.random.Generator) -> np.ndarray:
    """A valid `need`: each encoder microbatch feeds LLM microbatches no earlier than itself;
    -1 marks an encoder microbatch without units."""
    need = np.array([rng.integers(k, M) for k in range(M)], dtype=np.int64)
    need[rng.random(M) < 0.2] = -1
    return need


@pytest.mark.parametrize("P,M,seed", list(itertools.product((1, 2, 4), (1, 3, 8), range(4))))
def test_encoder_actions_frozen_only_forwards(P, M, seed):
    need = _needs(M, np.random.default_rng(seed))
    assert encoder_actions(need, P, trains=False) == [("F", k) for k in range(M)]


@pytest.mark.parametrize("P,M,seed", list(itertools.product((1, 2, 4), (1, 3, 8, 12), range(6))))
def test_encoder_actions_trained_backward_after_its_gradients(P, M, seed):
    need = _needs(M, np.random.default_rng(seed))
    actions = encoder_actions(need, P, trains=True)
    assert sorted(actions) == sorted([("F", k) for k in range(M)] + [("B", k) for k in range(M)])
    assert [k for kind, k in actions if kind == "F"] == list(range(M))
    pos = _pos(actions)
    for k in range(M):
        after = min(M - 1, max(k, int(need[k])) + P)
        assert pos[("F", k)] < pos[("B", k)]
        assert pos[("F", after)] < pos[("B", k)]
        # ... and no later than it must: before the next forward
        if after + 1 < M:
            assert pos[("B", k)] < pos[("F", after + 1)]


def test_encoder_actions_deferred_backward_waits():
    # unit of encoder microbatch 0 feeds LLM microbatch 5: its backward goes after F(5 + P)
    need = np.array([5, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    actions = encoder_actions(need, 2, trains=True)
    pos = _pos(actions)
    assert pos[("B", 0)] > pos[("F", 7)]
    assert pos[("B", 0)] < pos[("F", 8)]
    # backwards run out of order: microbatch 1 does not wait for microbatch 0
    assert pos[("B", 1)] < pos[("B", 0)]


@pytest.mark.parametrize("P,M", [(1, 1), (1, 5), (2, 3), (3, 4), (3, 8), (6, 4)])
def test_encoder_actions_coupled_is_stage_zero_of_longer_pipeline(P, M):
    assert encoder_actions(np.arange(M), P, trains=True) == one_f_one_b(P + 1, 0, M)
