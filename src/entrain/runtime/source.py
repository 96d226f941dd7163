"""Where a run's modules and tokens come from: a preset (random weights from a seed, the
byte tokenizer) or a Hugging Face model folder (its config, weights and tokenizer).

The trainer, the single-process reference and the profiler ask a source for exactly the
modules they run, so each rank materializes only its own part, and parameter names are the
same everywhere (a preset's `llm.model.layers.0...`, a folder's checkpoint keys).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from entrain.data.codec import ByteTokenizer, HFCodec, TextCodec
from entrain.models.hf import (
    AUDIO,
    HFConfigError,
    HFModel,
    hf_model,
    read_config,
    spec_from_folder,
)
from entrain.models.load import apply_freeze, load_spec
from entrain.models.spec import AudioSpec, ModelSpec
from entrain.runtime.hf_load import (
    SafetensorsFolder,
    build_model,
    checked_key,
    disk_names,
    materialize,
    tied_sources,
)
from entrain.runtime.modules import (
    MODULE_SEED,
    AudioProjector,
    AudioTower,
    LLMStage,
    VisionTower,
    build_encoder,
    build_llm,
    freeze,
)

Named = dict[str, nn.Parameter]


def _projector_prefix(tower: nn.Module) -> str:
    for name, module in tower.named_modules():
        if module is tower.projector:
            return name + "."
    raise AssertionError("tower without a projector")


class PresetSource:
    """Modules of a preset or spec file, with seeded random weights."""

    hf: HFModel | None = None
    rope = "1d"
    tied_key: str | None = None
    video_interval = None

    def __init__(self, spec: ModelSpec, seed: int):
        self.spec, self.seed = spec, seed

    def codec(self) -> TextCodec:
        return ByteTokenizer(self.spec.llm.vocab_size)

    def encoder(self, name: str, device: torch.device) -> tuple[nn.Module, Named]:
        enc = next(e for e in self.spec.encoders if e.name == name)
        tower = build_encoder(self.spec, name, self.seed).to(device)
        skip = _projector_prefix(tower) if enc.frozen else None
        return tower, {
            f"{name}.{n}": p
            for n, p in tower.named_parameters()
            if not (skip and n.startswith(skip))
        }

    def llm_stage(self, stage: int, stages: int, device: torch.device) -> tuple[LLMStage, Named]:
        llm = build_llm(self.spec, self.seed)
        part = LLMStage(llm.model, llm.lm_head, stage, stages).to(device)
        kept = {id(p) for p in part.parameters()}
        named = {f"llm.{n}": p for n, p in llm.named_parameters() if id(p) in kept}
        if self.spec.llm_frozen:
            for p in part.parameters():
                p.requires_grad_(False)
        return part, named

    def llm_projector(self, name: str, device: torch.device) -> tuple[nn.Module, Named]:
        tower = build_encoder(self.spec, name, self.seed)
        prefix = _projector_prefix(tower)
        named = {f"{name}.{n}": p for n, p in tower.named_parameters() if n.startswith(prefix)}
        return tower.projector.to(device), named


class HFSource:
    """Modules of a Hugging Face vision-language checkpoint (and a Whisper-style audio
    encoder from another folder). `init_from` None: the folder's architecture with random
    weights, each tensor from its own seeded generator (the same on every rank)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        init_from: str | os.PathLike | None,
        seed: int,
        audio_from: str | os.PathLike | None = None,
        frozen: tuple[str, ...] = (),
        tokenizer: str | os.PathLike | None = None,
    ):
        self.folder = Path(folder)
        self.hf = hf_model(self.folder)
        self.spec = apply_freeze(spec_from_folder(self.folder, audio_from), frozen)
        self.init_from = Path(init_from) if init_from is not None else None
        self.audio_from = Path(audio_from) if audio_from is not None else None
        self.seed = seed
        self.tokenizer = Path(tokenizer) if tokenizer else self.folder
        self.rope = "mrope" if self.hf.mrope_section else "1d"
        self._model = None
        self._codec: HFCodec | None = None
        self._whisper: tuple | None = None
        self._files: SafetensorsFolder | None = None
        if self.init_from is not None:
            self._files = SafetensorsFolder(self.init_from)  # a bad folder fails here, early

    @property
    def model(self):
        """The whole transformers model (parameters on meta when read from a checkpoint)."""
        if self._model is None:
            self._model = build_model(self.folder, self.hf.architecture)
        return self._model

    @property
    def tied_key(self) -> str | None:
        """Checkpoint key of the token embedding when the LM head shares it (the first and
        last pipeline stages then each hold a copy, kept equal by summing their gradients)."""
        tied = tied_sources(self.model)
        return disk_names(self.model)[next(iter(tied.values()))] if tied else None

    def video_interval(self, fps: float) -> float:
        """M-RoPE temporal positions per temporal patch of a video sampled at `fps`:
        Qwen2.5-VL spaces them by time (tokens_per_second x seconds a patch spans),
        Qwen2-VL by one."""
        if self.hf.model_type != "qwen2_5_vl":
            return 1.0
        tps = self.spec.encoders[0].temporal_patch_size
        return (self.hf.tokens_per_second or 4.0) * tps / fps  # 4: transformers' default

    def codec(self) -> TextCodec:
        if self._codec is None:
            self._codec = HFCodec(self.tokenizer, self.hf)
        return self._codec

    def _enc(self, name: str):
        return next(e for e in self.spec.encoders if e.name == name)

    def _materialize(self, parts: list[nn.Module], device: torch.device) -> Named:
        return materialize(self.model, parts, self._files, device, seed=self.seed)

    def encoder(self, name: str, device: torch.device) -> tuple[nn.Module, Named]:
        enc = self._enc(name)
        if isinstance(enc, AudioSpec):
            return self._audio(enc, device)
        visual = self.model.model.visual
        named = self._materialize([visual], device)
        tower = VisionTower(visual, window=self.hf.model_type == "qwen2_5_vl")
        freeze(tower, enc.frozen)
        if enc.frozen:  # its merger trains on the LLM side
            named = {k: p for k, p in named.items() if not k.startswith("visual.merger.")}
        return tower, named

    def llm_stage(self, stage: int, stages: int, device: torch.device) -> tuple[LLMStage, Named]:
        m = self.model
        part = LLMStage(m.model.language_model, m.lm_head, stage, stages)
        named = self._materialize([part], device)
        if self.spec.llm_frozen:
            for p in part.parameters():
                p.requires_grad_(False)
        return part, named

    def llm_projector(self, name: str, device: torch.device) -> tuple[nn.Module, Named]:
        enc = self._enc(name)
        if isinstance(enc, AudioSpec):
            tower, named = self._audio(enc, device)
            return tower.projector, {k: p for k, p in named.items() if ".projector." in k}
        merger = self.model.model.visual.merger
        return merger, self._materialize([merger], device)

    def whisper(self) -> tuple[nn.Module, nn.Module, SafetensorsFolder | None]:
        """The `--audio-from` folder's model (parameters on meta), its encoder and its
        weight files (None for random weights)."""
        if self._whisper is None:
            folder = self.audio_from
            assert folder is not None
            arch = (read_config(folder).get("architectures") or [AUDIO["whisper"]])[0]
            if arch not in ("WhisperForConditionalGeneration", "WhisperModel"):
                raise HFConfigError(
                    f"{folder / 'config.json'}: {arch} is not a Whisper model; --audio-from "
                    "takes a Whisper folder (WhisperForConditionalGeneration or WhisperModel)"
                )
            files = SafetensorsFolder(folder) if self.init_from is not None else None
            model = build_model(folder, arch)
            encoder = model.model.encoder if hasattr(model, "model") else model.encoder
            self._whisper = (model, encoder, files)
        return self._whisper

    def _audio(self, enc: AudioSpec, device: torch.device) -> tuple[nn.Module, Named]:
        """The Whisper encoder of `audio_from` and a new projector (seeded)."""
        model, encoder, files = self.whisper()
        named = materialize(model, [encoder], files, device, seed=self.seed + 1)
        named = {f"audio.{k}": p for k, p in named.items()}
        state = torch.random.get_rng_state()
        torch.manual_seed(self.seed * 1000 + MODULE_SEED["audio"])
        try:
            projector = AudioProjector(
                enc.encoder.hidden_size,
                enc.downsample,
                enc.projector_hidden,
                self.spec.llm.hidden_size,
            ).to(device)
        finally:
            torch.random.set_rng_state(state)
        named.update({f"audio.projector.{n}": p for n, p in projector.named_parameters()})
        positions = int(round(enc.chunk_seconds * enc.frames_per_second))
        tower = AudioTower(encoder, projector, positions)
        freeze(tower, enc.frozen)
        if enc.frozen:
            named = {k: p for k, p in named.items() if ".projector." not in k}
        return tower, named


def model_source(
    model: str,
    seed: int,
    init_from: str | None = "same",
    audio_from: str | None = None,
    frozen: tuple[str, ...] = (),
    tokenizer: str | None = None,
) -> PresetSource | HFSource:
    """The source of `--model`: a model folder (weights from `init_from`: "same" for the
    folder itself, a path, or None for random), else a preset or spec file."""
    if Path(model).is_dir():
        init = model if init_from == "same" else init_from
        return HFSource(model, init, seed, audio_from, frozen, tokenizer)
    if audio_from is not None:
        raise ValueError("--audio-from needs --model to be a Hugging Face model folder")
    if init_from not in ("same", None):
        raise ValueError("--init-from needs --model to be a Hugging Face model folder")
    spec = load_spec(model)
    return PresetSource(apply_freeze(spec, frozen), seed)


def check_weights(source: PresetSource | HFSource) -> int:
    """Every tensor the model needs is in the checkpoint with the shape its config gives
    (headers only: no weights are read), the `--audio-from` encoder's too. Run once before
    launching, so a bad folder is one line, not one traceback per rank, and nothing trains
    on half-loaded weights. Returns the number of tensors checked."""
    if not isinstance(source, HFSource) or source._files is None:
        return 0
    checked = _check(source.model, list(source.model.named_parameters()), source._files)
    if source.audio_from is not None:
        model, encoder, files = source.whisper()
        keep = {id(p) for p in encoder.parameters()}
        params = [(n, p) for n, p in model.named_parameters() if id(p) in keep]
        checked += _check(model, params, files)
    return checked


def _check(model: nn.Module, params: list, files: SafetensorsFolder) -> int:
    names, tied = disk_names(model), tied_sources(model)
    for full, param in params:
        key = names[tied[full]] if full in tied else names[full]
        checked_key(files, key, full, tuple(param.shape))
    return len(params)
