"""The baselines stay as strong as they are: every baseline's worst_cv and stretch on fixed
batches, no worse than the values recorded when the simulator's copies were made fair
(issue 17). Entrain's gains are measured against these; a change to a shared kernel (LPT,
vector greedy) that weakens a baseline would inflate them, and fails here."""

from __future__ import annotations

import pytest

from entrain.cost import cost_batch
from entrain.models import load_spec
from entrain.schedule import POLICIES, evaluate
from entrain.workload.traces import TRACE_MODELS, generate_workload

# (trace, D, M) -> baseline -> (worst_cv, stretch), from generate_workload(kind, 512, seed=3)
PINNED = {
    ("llava-pretrain", 4, 8): {
        "sequential": (0.0026203711897482412, 1.0010957161399026),
        "llm-balanced": (0.0001491593459766201, 1.0000501640142971),
        "encoder-balanced": (0.0022727138725604497, 1.0008688145634883),
        "joint": (0.0008089593951788009, 1.0003429953134022),
        "encoder-rebalance": (0.0001491593459766201, 1.0000501640142971),
    },
    ("llava-pretrain", 2, 32): {
        "sequential": (0.0035520694527789616, 1.0014086200557206),
        "llm-balanced": (0.00034726619718958263, 1.0001017741984275),
        "encoder-balanced": (0.003333299991139269, 1.0012774950373478),
        "joint": (0.0014406623615847343, 1.0005106449550338),
        "encoder-rebalance": (0.00034726619718958263, 1.0001017741984275),
    },
    ("llava-instruct", 4, 8): {
        "sequential": (0.08283943754127444, 1.0452064554094558),
        "llm-balanced": (0.055277079839256664, 1.021671886365187),
        "encoder-balanced": (0.08098713561017633, 1.0333454794858117),
        "joint": (0.026197089594160096, 1.0105395202942038),
        "encoder-rebalance": (0.055277079839256664, 1.0216121071851934),
    },
    ("llava-instruct", 2, 32): {
        "sequential": (0.10431899557274164, 1.0598385761423852),
        "llm-balanced": (0.1, 1.0460454317856824),
        "encoder-balanced": (0.11438170050194407, 1.0559006568973939),
        "joint": (0.07071067811865475, 1.0320507974192639),
        "encoder-rebalance": (0.097182531580755, 1.0450996935096064),
    },
    ("interleaved", 4, 8): {
        "sequential": (0.25554770642901586, 1.0267285266930002),
        "llm-balanced": (0.10688539874767732, 1.0437004767051232),
        "encoder-balanced": (0.08190023870523, 1.0327964625071238),
        "joint": (0.011241427298052538, 1.00538496833233),
        "encoder-rebalance": (0.05444808582142882, 1.021972669634061),
    },
    ("interleaved", 2, 32): {
        "sequential": (0.40662228981839155, 1.05138303366543),
        "llm-balanced": (0.12228278785931859, 1.0482048916846192),
        "encoder-balanced": (0.08996936134170135, 1.0379472923903363),
        "joint": (0.014182393767080609, 1.0050404890839628),
        "encoder-rebalance": (0.08596846496154914, 1.0327448699770816),
    },
    ("omni", 4, 8): {
        "sequential": (0.44274970561926075, 1.2507451042560782),
        "llm-balanced": (0.40201998582301224, 1.2791363518977994),
        "encoder-balanced": (0.43589702885561105, 1.1892082402860247),
        "joint": (0.19313720317447688, 1.0652047105876439),
        "encoder-rebalance": (0.14766294127145455, 1.1016429393108476),
    },
    ("omni", 2, 32): {
        "sequential": (0.7073512012473643, 1.396197516012922),
        "llm-balanced": (0.7094380546702965, 1.4505573094396418),
        "encoder-balanced": (0.6337925761204576, 1.2446488875638715),
        "joint": (0.3703237479948647, 1.1594300006880598),
        "encoder-rebalance": (0.502374905121222, 1.2901713936090446),
    },
    ("video", 4, 8): {
        "sequential": (0.15541365982716898, 1.0134874122065631),
        "llm-balanced": (0.02329509815356677, 1.0094791812733281),
        "encoder-balanced": (0.03442858990654992, 1.0126645951863464),
        "joint": (0.01543477150995572, 1.0077000208060194),
        "encoder-rebalance": (0.017554373371108448, 1.0070285783885953),
    },
    ("video", 2, 32): {
        "sequential": (0.2702344095336534, 1.0202094905764811),
        "llm-balanced": (0.03939393901252749, 1.0155109499967092),
        "encoder-balanced": (0.05210833684969515, 1.019144082350538),
        "joint": (0.02113440111447255, 1.0074427492159177),
        "encoder-rebalance": (0.032678942684988055, 1.0127150150018647),
    },
}


@pytest.mark.parametrize("kind, D, M", sorted(PINNED))
def test_every_baseline_is_no_weaker_than_recorded(kind, D, M):
    batch = cost_batch(generate_workload(kind, 512, seed=3), load_spec(TRACE_MODELS[kind]))
    for policy, (cv, stretch) in PINNED[kind, D, M].items():
        m = evaluate(batch, POLICIES[policy](batch, D, M))
        assert m.worst_cv <= cv * (1 + 1e-9) + 1e-12, (policy, m.worst_cv, cv)
        assert m.stretch <= stretch * (1 + 1e-9) + 1e-12, (policy, m.stretch, stretch)
