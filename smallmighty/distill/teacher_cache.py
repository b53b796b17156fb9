"""Teacher outputs computed once and kept on disk, so the teacher need not sit in memory (or run
again every epoch) while the student trains.

One safetensors file holds, for every training example: the teacher's top-k logits (values and
label ids), and, where the recipe uses them, the hidden states and attention maps of the mapped
teacher layers, all tokens of all examples packed end to end (fp16) with offsets. A fingerprint
of the teacher, the token ids and the settings sits in the file's metadata; a cache whose
fingerprint differs is rebuilt instead of silently reused.

Causal LMs (`build_lm_teacher_cache`) store the same per token instead of per example: each
position's next-token distribution as top-k log-probabilities plus the log of the remaining mass
(`lm_losses.TeacherTopK`), at the distillation temperature, over the student's vocabulary. That file
lives in smallmighty's cache (`lm_cache_path`), where later runs on the same corpus find it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from smallmighty.cache import cache_dir
from smallmighty.distill.lm_losses import teacher_topk
from smallmighty.io import atomic_path


@dataclass
class CacheSpec:
    """What to keep of the teacher: top-k logits always; hidden states of `hidden_layers`
    (0 = embeddings, j = output of block j); attention maps of `attention_layers` (block j, 1-based)."""

    top_k: int
    hidden_layers: list[int] = field(default_factory=list)
    attention_layers: list[int] = field(default_factory=list)
    temperature: float | None = None  # causal LMs: the temperature the log-probabilities are taken at
    vocabulary: str | None = None  # causal LMs: fingerprint of the student ids' teacher columns


def fingerprint(teacher_id: str, token_ids: list[list[int]], spec: CacheSpec) -> str:
    digest = hashlib.sha256(json.dumps([teacher_id, asdict(spec)]).encode())
    for ids in token_ids:
        digest.update(json.dumps(ids).encode())
    return digest.hexdigest()[:32]


class TeacherCache:
    """Read side: gathers a batch of cached teacher outputs, padded to the batch's width."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with safe_open(str(path), framework="pt") as f:
            self.meta = json.loads(f.metadata()["spec"])
            self.fingerprint = f.metadata()["fingerprint"]
            self.tensors = {name: f.get_tensor(name) for name in f.keys()}
        self.lengths = self.tensors["lengths"]
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.lengths.cumsum(0)])
        self.att_offsets = torch.cat([torch.zeros(1, dtype=torch.long), (self.lengths ** 2).cumsum(0)])
        self.hidden_layers: list[int] = self.meta["hidden_layers"]
        self.attention_layers: list[int] = self.meta["attention_layers"]

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, index: torch.Tensor, width: int) -> dict:
        """Top-k logits for `index`, plus hidden states [B, width, d] and attention maps
        [B, heads, width, width] of the cached layers, zero-padded past each example's length."""
        out: dict = {
            "topk_values": self.tensors["topk_values"][index].float(),
            "topk_indices": self.tensors["topk_indices"][index].long(),
            "hidden": {}, "attention": {},
        }
        if "tail" in self.tensors:
            out["tail"] = self.tensors["tail"][index].float()
        lengths = self.lengths[index].unsqueeze(1)  # [B, 1]
        pos = torch.arange(width)
        if self.hidden_layers:
            valid = pos < lengths  # [B, width]
            rows = self.offsets[index].unsqueeze(1) + pos
            for j in self.hidden_layers:
                packed = self.tensors[f"hidden.{j}"]
                out["hidden"][j] = packed[rows.clamp(max=len(packed) - 1)].float() * valid.unsqueeze(-1)
        if self.attention_layers:
            # Example i's map is stored row-major as n*n entries: entry (r, c) sits at offset + r*n + c.
            r, c = pos.view(1, -1, 1), pos.view(1, 1, -1)
            n = lengths.unsqueeze(-1)  # [B, 1, 1]
            valid = (r < n) & (c < n)
            cells = self.att_offsets[index].view(-1, 1, 1) + r * n + c
            for j in self.attention_layers:
                packed = self.tensors[f"attention.{j}"]  # [heads, total]
                a = packed[:, cells.clamp(max=packed.shape[1] - 1)].float() * valid
                out["attention"][j] = a.transpose(0, 1).contiguous()
        return out


def _reusable(path: Path, fp: str) -> TeacherCache | None:
    """The cache at `path` if it was made from the same teacher, inputs and settings (fingerprint `fp`)."""
    if path.exists():
        cache = TeacherCache(path)
        if cache.fingerprint == fp:
            return cache
    return None


@torch.inference_mode()
def build_teacher_cache(teacher: nn.Module, token_ids: list[list[int]], pad_token_id: int, spec: CacheSpec,
                        path: Path, *, teacher_id: str, batch_size: int = 64) -> TeacherCache:
    """Run the teacher over `token_ids` once and store what `spec` asks for at `path`.

    Reuses an existing cache at `path` when its fingerprint matches.
    """
    fp = fingerprint(teacher_id, token_ids, spec)
    if (cache := _reusable(path, fp)) is not None:
        return cache
    teacher.eval()
    device = next(teacher.parameters()).device
    lengths = torch.tensor([len(ids) for ids in token_ids])
    num_labels = teacher.config.num_labels
    k = min(spec.top_k, num_labels)
    topk_values = torch.empty(len(token_ids), k)
    topk_indices = torch.empty(len(token_ids), k, dtype=torch.int32)
    # Sorting by length keeps padding (wasted teacher compute) small; results go back by index.
    order = sorted(range(len(token_ids)), key=lambda i: lengths[i].item())
    per_example_hidden: dict[int, dict[int, torch.Tensor]] = {j: {} for j in spec.hidden_layers}
    per_example_attention: dict[int, dict[int, torch.Tensor]] = {j: {} for j in spec.attention_layers}
    for start in tqdm(range(0, len(order), batch_size), desc="teacher outputs", unit="batch"):
        rows = order[start:start + batch_size]
        width = int(max(lengths[i] for i in rows))
        input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, : lengths[i]] = torch.tensor(token_ids[i])
            mask[r, : lengths[i]] = 1
        out = teacher(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                      output_hidden_states=bool(spec.hidden_layers),
                      output_attentions=bool(spec.attention_layers))
        values, indices = out.logits.float().cpu().topk(k, dim=-1)
        topk_values[rows] = values
        topk_indices[rows] = indices.to(torch.int32)
        for r, i in enumerate(rows):
            n = int(lengths[i])
            for j in spec.hidden_layers:
                per_example_hidden[j][i] = out.hidden_states[j][r, :n].half().cpu()
            for j in spec.attention_layers:
                per_example_attention[j][i] = out.attentions[j - 1][r, :, :n, :n].reshape(-1, n * n).half().cpu()
    everyone = range(len(token_ids))
    tensors = {"topk_values": topk_values, "topk_indices": topk_indices, "lengths": lengths}
    tensors.update({f"hidden.{j}": torch.cat([v[i] for i in everyone]) for j, v in per_example_hidden.items()})
    tensors.update({f"attention.{j}": torch.cat([v[i] for i in everyone], dim=1)
                    for j, v in per_example_attention.items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"spec": json.dumps(asdict(spec)), "fingerprint": fp})
    return TeacherCache(path)


def lm_cache_path(teacher_id: str, rows: torch.Tensor, spec: CacheSpec) -> Path:
    """Where a causal-LM teacher's outputs for `rows` and `spec` are kept: in smallmighty's cache, named
    by their fingerprint, so another student (or a rerun) distilled from the same teacher, corpus and
    settings reuses the teacher's pass instead of paying for it again."""
    return cache_dir("teacher_outputs") / f"{fingerprint(teacher_id, rows.tolist(), spec)}.safetensors"


@torch.inference_mode()
def build_lm_teacher_cache(teacher: nn.Module, rows: torch.Tensor, spec: CacheSpec, *, teacher_id: str,
                           columns: torch.Tensor | None = None, batch_size: int = 4, bf16: bool = False) -> TeacherCache:
    """Run a causal-LM teacher once over `rows` [N, seq_len] (teacher ids) and store, per position,
    `lm_losses.teacher_topk` at `spec.temperature` over the student ids `columns` (None: the
    teacher's own vocabulary), plus the hidden states `spec.hidden_layers` asks for, at
    `lm_cache_path` (reused when it is already there).

    `bf16` runs the teacher under bf16 autocast (about 2x faster on CPUs with native bf16; the
    stored figures stay float32).
    """
    fp = fingerprint(teacher_id, rows.tolist(), spec)
    path = lm_cache_path(teacher_id, rows, spec)
    if (cache := _reusable(path, fp)) is not None:
        return cache
    teacher.eval()
    device = next(teacher.parameters()).device
    n, length = rows.shape
    k = min(spec.top_k, len(columns) if columns is not None else teacher.config.vocab_size)
    tensors = {"topk_values": torch.empty(n, length, k), "topk_indices": torch.empty(n, length, k, dtype=torch.int32),
               "tail": torch.empty(n, length), "lengths": torch.full((n,), length)}
    hidden = {j: [] for j in spec.hidden_layers}
    cols = columns.to(device) if columns is not None else None
    with tqdm(total=n * length, desc="teacher outputs", unit="tok", unit_scale=True) as bar:
        for start in range(0, n, batch_size):
            batch = rows[start:start + batch_size].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = teacher(input_ids=batch, output_hidden_states=bool(spec.hidden_layers))
            top = teacher_topk(out.logits, spec.temperature, k, cols)
            end = start + len(batch)
            tensors["topk_values"][start:end] = top.log_probs.cpu()
            tensors["topk_indices"][start:end] = top.indices.to(torch.int32).cpu()
            tensors["tail"][start:end] = top.tail.cpu()
            for j in spec.hidden_layers:
                hidden[j].append(out.hidden_states[j].flatten(0, 1).half().cpu())
            bar.update(batch.numel())
    tensors.update({f"hidden.{j}": torch.cat(parts) for j, parts in hidden.items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"spec": json.dumps(asdict(spec)), "fingerprint": fp})
    return TeacherCache(path)
