"""One source of configuration: every `entrain train` flag has a recipe key with the same
default, recipes and `section.key=value` overrides and flags combine in that order, bad
keys and values are one error naming where, and a run's config.json reads back typed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from entrain.cli import build_parser
from entrain.cli_train import train_config
from entrain.config import (
    SECTIONS,
    ConfigError,
    RunRecord,
    TrainConfig,
    config_from,
    field_help,
    read_run_config,
)
from entrain.runtime.setup import run_layout

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"

# every flag `entrain train` had before recipes, with its default then: each must keep both
FLAGS_BEFORE = {
    "--model": "tiny", "--init-from": "same", "--audio-from": None, "--freeze": (),
    "--tokenizer": None, "--policy": "entrain", "--steps": 10, "--global-batch": 16,
    "--microbatches": 4, "--dp": 1, "--pp": None, "--lr": 1e-3, "--lr-schedule": "constant",
    "--warmup-steps": 0, "--decay-steps": None, "--min-lr-ratio": 0.0, "--weight-decay": 0.0,
    "--clip-grad": 1.0, "--precision": "auto", "--recompute": "none", "--seed": 0,
    "--lookahead": "auto", "--pool": None, "--timeout": 300.0, "--out": None,
    "--pin-cores": False, "--device": "auto", "--profile": None, "--checkpoint-every": 0,
    "--checkpoint-dir": None, "--resume": None, "--keep-checkpoints": 2,
    "--max-deferred-tokens": None, "--skip-bad": False, "--max-sample-tokens": 8192,
    "--validate": "full", "--data-workers": 1, "--cache-mb": 2048, "--encoder-copies": "",
    "--no-shard-optimizer": True, "--profile-memory": False, "--no-shuffle": True,
    "--trace": False, "--save-params": False,
}  # fmt: skip


def _parse(*argv: str) -> TrainConfig:
    return train_config(build_parser().parse_args(["train", *argv]))


def test_every_flag_keeps_its_default_and_has_a_recipe_key():
    default = _parse("--data", "m.jsonl")
    recipe = default.to_recipe()
    flags = {}
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            flags[flag] = (f.name, next(n for n, c in SECTIONS.items() if c is cls))
    missing = sorted(set(FLAGS_BEFORE) - set(flags))
    assert not missing, f"flags without a recipe key: {missing}"
    for flag, before in FLAGS_BEFORE.items():
        name, section = flags[flag]
        assert getattr(default, name) == before, flag
        key = dataclasses.fields(SECTIONS[section])[
            [f.name for f in dataclasses.fields(SECTIONS[section])].index(name)
        ]
        assert (key.metadata.get("key") or name) in recipe[section], flag
    for cls in SECTIONS.values():  # every field explains itself in --help
        assert set(field_help(cls)) == {f.name for f in dataclasses.fields(cls)}, cls


def test_recipe_then_overrides_then_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {path: a.jsonl}\noptim: {lr: 0.01}\ntrain: {steps: 5}\n")
    cfg = _parse(str(recipe), "train.steps=7", "schedule.lookahead=unlimited", "--lr", "0.5")
    assert (cfg.data, cfg.steps, cfg.lr, cfg.lookahead) == ("a.jsonl", 7, 0.5, None)
    assert _parse(str(recipe)).steps == 5 and _parse(str(recipe)).lr == 0.01


def test_the_demo_recipe_is_what_the_demo_ran():
    cfg = config_from({}, RECIPES / "demo.yaml", ["data.path=x.jsonl"])
    flags = _parse("--data", "x.jsonl", "--steps", "24", "--global-batch", "16",
                   "--microbatches", "4", "--lr", "3e-3", "--out", "out/train-entrain")  # fmt: skip
    assert cfg == flags
    for name, gpus in (("qwen2-vl-7b-1node.yaml", 8), ("qwen2-vl-7b-2nodes.yaml", 16)):
        big = config_from({}, RECIPES / name)
        assert big.precision == "bf16" and big.freeze == ("vision",)
        # the layout fills the node(s): dp replicas of [ViT, pp LLM stages]
        layout = run_layout(big, ["vision"], gpus)
        assert layout.world_size == gpus and layout.llm_pp == big.pp


@pytest.mark.parametrize(
    "text, says",
    [
        ("optim: {learning_rate: 1}", "unknown key optim.learning_rate; optim has lr,"),
        ("training: {steps: 1}", "unknown section 'training'; sections: data, model"),
        ("train: {steps: many}", "train: steps must be an integer, got 'many'"),
        ("optim: 3", "section 'optim' must be a mapping"),
        ("[1, 2]", "expected a mapping of sections"),
        ("train: {steps: 0}", "--steps must be an integer >= 1, got 0"),
    ],
)
def test_bad_recipes_name_the_file_and_key(tmp_path, text, says):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("data: {path: a.jsonl}\n" + text if text[0] != "[" else text)
    with pytest.raises(ConfigError) as e:
        config_from({}, recipe)
    assert says in str(e.value)
    assert "bad.yaml" in str(e.value) or "--steps" in str(e.value)


def test_bad_overrides_and_missing_data():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        config_from({"data": "a"}, None, ["steps=3"])
    with pytest.raises(ConfigError, match="give --data FILE or data.path"):
        config_from({}, None, [])


def test_a_runs_config_reads_back_typed(tmp_path):
    cfg = _parse("--data", "m.jsonl", "--freeze", "vision", "--lookahead", "2", "--lr", "0.1")
    (tmp_path / "config.json").write_text(RunRecord(cfg, {"dp": 1}, 3).to_json())
    back = read_run_config(tmp_path)
    assert back.config == cfg and back.world == 3 and back.plan == {"dp": 1}
    # runs written before sections (flat keys) read too
    flat = {**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, "plan": {}}
    flat["freeze"] = list(cfg.freeze)
    (tmp_path / "config.json").write_text(json.dumps(flat))
    assert read_run_config(tmp_path).config == cfg
