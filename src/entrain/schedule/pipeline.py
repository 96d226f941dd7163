"""Pipeline schedules as data: for each device, the ordered list of its actions.

An action is (kind, microbatch) with kind "F" or "B". The simulator replays these lists and
the runtime executes the same lists, so the two cannot drift apart.
"""

from __future__ import annotations

import numpy as np

Action = tuple[str, int]


def one_f_one_b(num_stages: int, stage: int, microbatches: int) -> list[Action]:
    """Non-interleaved 1F1B in its three phases (as Megatron-LM writes it): warm-up forwards,
    steady one-forward-one-backward, cool-down backwards."""
    warmup = min(num_stages - stage - 1, microbatches)
    actions: list[Action] = [("F", k) for k in range(warmup)]
    for i in range(microbatches - warmup):  # steady state
        actions += [("F", warmup + i), ("B", i)]
    actions += [("B", k) for k in range(microbatches - warmup, microbatches)]  # cool-down
    return actions


def encoder_actions(need: np.ndarray, llm_stages: int, trains: bool) -> list[Action]:
    """An encoder's actions when its microbatches are decoupled from the LLM's.

    `need[k]` is the last LLM microbatch that uses a unit of encoder microbatch k. The
    encoder is the stage before the LLM's `llm_stages` stages, so in plain 1F1B it runs its
    backward of k after forward k + llm_stages. With deferral, the gradients of k come back
    only after LLM microbatch need[k] has run its backward, which needs the encoder's forwards
    up to need[k] + llm_stages - 1 first: so B(k) goes after F(max(k, need[k]) + llm_stages).
    Backwards may therefore run out of order: a microbatch whose units were pulled far ahead
    does not hold up the backwards of the ones after it. Waiting there cannot deadlock; it
    costs activation memory for the microbatches in between. A frozen encoder only runs
    forwards.
    """
    M = int(need.shape[0])
    if not trains:
        return [("F", k) for k in range(M)]
    after = np.minimum(np.maximum(np.arange(M), need) + llm_stages, M - 1)
    order = np.lexsort((np.arange(M), after))
    actions: list[Action] = []
    i = 0
    for f in range(M):
        actions.append(("F", f))
        while i < M and after[order[i]] == f:
            actions.append(("B", int(order[i])))
            i += 1
    return actions
