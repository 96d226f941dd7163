"""Train a tiny vision-language model with a plain PyTorch loop fed by EntrainBatchSampler.

No Entrain runtime: a torch Dataset over the manifest lines, a DataLoader whose
batch_sampler is the sampler, gradient accumulation over the microbatches of each
iteration, AdamW. The sampler runs in coupled mode, so each sample's images are encoded in
the sample's own microbatch by the small vision encoder below. The LLM is a Qwen2 causal
LM built from a config with random weights (nothing is downloaded).

    python examples/train_with_sampler.py --steps 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM

from entrain.data import EntrainBatchSampler
from entrain.data.codec import ByteTokenizer
from entrain.models.load import load_spec
from entrain.runtime.demo_data import make_demo_data
from entrain.runtime.inputs import image_patches

HIDDEN, VOCAB = 64, 512


class ManifestDataset(Dataset):
    """Sample i is line i of the manifest, as the sampler's indices count them: its text
    ids and the patches of each of its images."""

    def __init__(self, manifest: Path, vision):
        self.root = manifest.parent
        lines = manifest.read_text(encoding="utf-8").splitlines()
        self.records = [json.loads(line) for line in lines if line.strip()]
        self.tokenizer = ByteTokenizer(VOCAB)
        self.vision = vision

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        ids = torch.tensor(self.tokenizer.encode(rec["text"]))
        files = (rec.get("files") or {}).get("image") or []
        images = [image_patches(self.root / f, self.vision, rec["id"])[0] for f in files]
        return ids, images  # (T,), [(patches, patch_dim)]


class TinyVisionEncoder(nn.Module):
    """Patches -> LLM embeddings: an MLP per patch, then each merge x merge group of
    patches (adjacent in image_patches' layout) averaged into one LLM token, so an image
    takes as many LLM positions as the sampler's cost model counts."""

    def __init__(self, patch_dim: int, merge: int):
        super().__init__()
        self.group = merge * merge
        self.mlp = nn.Sequential(nn.Linear(patch_dim, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.mlp(patches)  # (patches, HIDDEN)
        return x.view(-1, self.group, HIDDEN).mean(1)  # (patches / merge^2, HIDDEN)


def microbatch_loss(llm, vision, samples) -> tuple[torch.Tensor, int]:
    """Summed next-token loss of a microbatch's text and its number of targets. Each
    sequence is [image tokens..., text tokens...]; image positions are not predicted."""
    embed = llm.get_input_embeddings()
    seqs, labels = [], []
    for ids, images in samples:
        img = [vision(p) for p in images]  # [(tokens, HIDDEN)]
        seqs.append(torch.cat(img + [embed(ids)]))
        n_img = sum(len(e) for e in img)
        labels.append(torch.cat([torch.full((n_img,), -100), ids]))
    x = nn.utils.rnn.pad_sequence(seqs, batch_first=True)  # (B, L, HIDDEN)
    y = nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=-100)  # (B, L)
    lengths = torch.tensor([len(s) for s in seqs])
    mask = (torch.arange(x.shape[1]) < lengths[:, None]).long()  # (B, L), 0 on padding
    logits = llm(inputs_embeds=x, attention_mask=mask).logits  # (B, L, VOCAB)
    targets = y[:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss, int((targets != -100).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--data", help="training manifest (default: demo data in a temp dir)")
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--microbatches", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)

    tmp = None
    if args.data is None:
        tmp = tempfile.TemporaryDirectory()
        manifest = make_demo_data(tmp.name, 64, seed=0, audio_share=0.0)
    else:
        manifest = Path(args.data)

    # The sampler balances with the tiny preset's costs; its vision spec also sizes the
    # patches here, so the image token counts the sampler plans with are the real ones.
    spec = load_spec("tiny")
    vision_spec = spec.encoders[0]
    M = args.microbatches
    sampler = EntrainBatchSampler(
        manifest, spec, global_batch=args.global_batch, microbatches=M, seed=0
    )
    data = ManifestDataset(manifest, vision_spec)
    # collate_fn=list: the loop assembles the sequences itself (images vary per sample).
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=list)

    p = vision_spec.patch_size
    vision = TinyVisionEncoder(3 * vision_spec.temporal_patch_size * p * p, vision_spec.merge_size)
    cfg = Qwen2Config(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=2048,
    )
    llm = Qwen2ForCausalLM(cfg)
    params = [*llm.parameters(), *vision.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3)

    step, epoch = 0, 0
    while step < args.steps:
        sampler.set_epoch(epoch)
        loss_sum, targets = 0.0, 0
        for k, samples in enumerate(loader):
            if samples:  # a replica with fewer samples than microbatches gets empty ones
                loss, n = microbatch_loss(llm, vision, samples)
                loss.backward()  # gradients of the summed loss accumulate over microbatches
                loss_sum, targets = loss_sum + loss.item(), targets + n
            if (k + 1) % M:
                continue
            # Microbatches are balanced by cost, not by count, so they differ in size: a
            # mean per microbatch would weight tokens unequally. Divide the summed gradient
            # by the iteration's target count instead.
            for q in params:
                if q.grad is not None:
                    q.grad /= max(targets, 1)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            print(f"step {step} loss {loss_sum / max(targets, 1):.4f} ({targets} targets)")
            loss_sum, targets = 0.0, 0
            if step == args.steps:
                break
        epoch += 1
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
