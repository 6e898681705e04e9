"""Contrastive fine-tuning of the shared sentence encoder: history text → the next item's text."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from chronorec.server.core.manifest import TOKENIZER_MAX_LENGTH
from chronorec.trainer import distributed
from chronorec.trainer.data import TrainingExample
from chronorec.trainer.export import SentenceEncoderModule, load_base_model, publish_module
from chronorec.trainer.protocols import expected_metrics, rank_counts

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
BEST_FILE = "best.pt"
# At most this much memory for the frozen lower layers' states of the validation texts (float32 per
# token): 9,742 item texts and 2,000 history texts at 32 tokens and 384 dimensions take ~0.5 GB.
FROZEN_CACHE_MAX_BYTES = 2 << 30


@dataclass
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run (all have working defaults for MiniLM on CPU)."""

    steps: int | None = None  # optimizer steps; None: `epochs` passes over the training examples
    epochs: float = 1.0
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    temperature: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 0
    hard_negatives: int = 0  # per example, mined from the current item vectors
    # Per example, items trending at the event's time (`trending_negatives`): what a served ranking
    # confuses the next item with. 0: none.
    time_negatives: int = 0
    # Weight of a term keeping the query and item vectors near the starting encoder's (cosine to a
    # frozen copy): the encoder learns the log without forgetting what it knew. 0: off.
    distill_weight: float = 0.0
    # Sampling-bias correction of the in-batch negatives (logQ): an item is a negative in other rows'
    # batches about as often as it is a positive, so uncorrected InfoNCE learns
    # log p(item | history) - log p(item) and pushes popular items away from every history, while
    # retrieval over the whole catalogue must rank them by p(item | history). Subtracting each
    # in-batch item's log frequency among the training positives from its logits removes that bias.
    logq_correction: bool = True
    hard_negative_skip: int = 0  # nearest items passed over (likely unlabelled positives)
    hard_negative_refresh: int | None = None  # steps between re-encoding the catalog; None: once per epoch
    eval_every: int | None = None  # steps between validations; None: about 5 per run
    # Validations without improvement before stopping. Two: a run whose first two validations (40
    # of 100 steps) fall below the starting weights stops there. Measured with three: the runs
    # that stopped early (ML-100K loo, ml-latest-small on both protocols, the generated
    # 15,000-event set) fell below the start at every validation and kept the starting weights,
    # and the one that recovered (ML-100K temporal) did so at its second; the third validation
    # and its 20 steps cost ~16 s per run and changed no outcome.
    patience: int = 2
    # A validation below this fraction of the best one so far (the starting weights' included) stops
    # the run at once, when the starting weights compete (keep-best): a run that has lost that much
    # of what the encoder retrieved is wrecking it, and its later checkpoints would have to climb
    # back above the start to be kept. At their first validation (step 20 of 100) ml-latest-small's
    # runs held 29 % (temporal) and 27 % (loo) of the starting MRR and ML-100K loo's 45 %; none
    # ever beat the start. The one run that did (ML-100K temporal, kept at step 80, measured worse
    # on held-out events) held 86 % at its lowest. None: never.
    abandon_fraction: float | None = 0.5
    min_delta: float = 1e-4
    # MRR credits every rank, so it moves before a top-10 cut does: on ML-100K, 100 steps raised the
    # encoder's MRR, HR@20 and NDCG@10 on 2,000 validation queries, while NDCG@10 on a 1,000-query
    # sample stayed flat (a few hits more or less) and early stopping kept the untrained weights.
    early_stop_metric: str = "MRR"
    # A checkpoint is kept only if this metric is not below the starting weights' too: a better MRR
    # bought with a worse top 10 is not what the ranking needs. None: no guard.
    guard_metric: str | None = "NDCG@10"
    max_valid_queries: int = 2000
    max_length: int = TOKENIZER_MAX_LENGTH
    device: str = "auto"  # "auto": CUDA when present, else CPU
    mixed_precision: bool = True  # on CUDA only: bf16 where supported, else fp16 with loss scaling
    checkpoint_dir: str | None = None
    checkpoint_every: int = 200
    progress: bool | None = None  # tqdm bar; None: only on a terminal

    def resolved_steps(self, n_examples: int) -> int:
        if self.steps is not None:
            return max(0, int(self.steps))
        return max(1, math.ceil(self.epochs * n_examples / max(1, self.batch_size)))


@dataclass
class FinetuneResult:
    steps: int
    examples: int
    train_seconds: float
    examples_per_second: float
    best_step: int
    best_metric: float | None
    initial_metric: float | None
    evaluations: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    resumed_from_step: int = 0
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- loss


def contrastive_loss(
    queries: torch.Tensor,
    items: torch.Tensor,
    item_keys: torch.Tensor,
    temperature: float,
    hard_items: torch.Tensor | None = None,
    hard_keys: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE with in-batch negatives (rows are unit vectors; row i's positive is items[i]).

    Another row with the same positive item is not a negative of row i (same item key) and is
    masked out in both directions; a hard negative that happens to be row i's positive is masked
    too. Unlike regressing cos(query, positive) to 1, the negatives push unrelated pairs apart, so
    the vectors cannot all collapse onto one point. `log_q`: per row, the log of its positive's
    sampling frequency (FinetuneConfig.logq_correction), subtracted from that item's column in the
    query-to-item direction (the item-to-query direction's softmax runs over queries, where a
    constant per item cancels).
    """
    batch = queries.shape[0]
    targets = torch.arange(batch, device=queries.device)
    logits = queries @ items.T / temperature
    duplicate = (item_keys[:, None] == item_keys[None, :]) & ~torch.eye(batch, dtype=torch.bool, device=queries.device)
    logits = logits.masked_fill(duplicate, float("-inf"))
    item_to_query = F.cross_entropy(logits.T, targets)
    if log_q is not None:
        logits = logits - log_q[None, :]
    if hard_items is not None and hard_items.shape[0]:
        hard_logits = queries @ hard_items.T / temperature
        hard_logits = hard_logits.masked_fill(item_keys[:, None] == hard_keys[None, :], float("-inf"))
        logits = torch.cat([logits, hard_logits], dim=1)
    query_to_item = F.cross_entropy(logits, targets)
    return (query_to_item + item_to_query) / 2


# ------------------------------------------------------------------------ evaluation


def encoder_retrieval_per_example(
    module: SentenceEncoderModule,
    tokenizer,
    examples: Sequence[TrainingExample],
    item_texts: Mapping[str, str],
    *,
    max_length: int = TOKENIZER_MAX_LENGTH,
    batch_size: int = 64,
    item_vectors: np.ndarray | None = None,
    encode: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> tuple[list[TrainingExample], dict[str, np.ndarray]]:
    """(the examples whose item is in the catalog, HR@10 / NDCG@10 / MRR of each one's item among all
    catalog items by the encoder alone): cosine of history text and item text, the history's items
    excluded (a repeated item is a miss, as in the evaluation's protocols), ties at their
    expectation. `encode(texts)`, when given, replaces the module's own encoding (a `FrozenPrefix`
    that runs only the trainable top layers gives the same vectors)."""
    item_ids = list(item_texts)
    column = {item_id: i for i, item_id in enumerate(item_ids)}
    examples = [e for e in examples if e.item_id in column]
    if not examples:
        return [], {}
    if encode is None:
        def encode(texts: Sequence[str]) -> np.ndarray:
            return module.encode_texts(tokenizer, list(texts), batch_size, max_length).numpy()
    if item_vectors is None:
        item_vectors = encode([item_texts[i] for i in item_ids])
    queries = encode([e.query for e in examples])
    scores = queries @ item_vectors.T
    excluded = np.zeros(scores.shape, dtype=bool)
    for row, example in enumerate(examples):
        excluded[row, [column[i] for i in example.history_items if i in column]] = True
    targets = np.array([column[e.item_id] for e in examples])
    better, tied = rank_counts(scores, targets, excluded)
    return examples, expected_metrics(better, tied)


def encoder_retrieval_metrics(
    module: SentenceEncoderModule,
    tokenizer,
    examples: Sequence[TrainingExample],
    item_texts: Mapping[str, str],
    *,
    max_length: int = TOKENIZER_MAX_LENGTH,
    batch_size: int = 64,
    item_vectors: np.ndarray | None = None,
    encode: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> dict[str, float]:
    """Mean HR@10 / NDCG@10 / MRR of each example's item among all catalog items by the encoder alone
    (`encoder_retrieval_per_example`)."""
    _, metrics = encoder_retrieval_per_example(module, tokenizer, examples, item_texts, max_length=max_length,
                                               batch_size=batch_size, item_vectors=item_vectors, encode=encode)
    return {name: float(values.mean()) for name, values in metrics.items()}


class _GivenStates(torch.nn.Module):
    """Stands in for the embeddings: returns hidden states computed earlier."""

    def __init__(self, states: torch.Tensor):
        super().__init__()
        self.states = states

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.states


class FrozenPrefix:
    """The hidden states of texts after the encoder's frozen bottom (embeddings and the frozen lower
    layers), computed once per text. While only the top layers train, those states never change:
    a validation over the whole catalog then runs only the top layers and the pooling, through the
    module's own forward (its attention masks), and gets the vectors `encode_texts` gives.

    `frozen` is the number of lower layers held fixed (`frozen_layers`). The states of one text
    are kept unpadded: padding is masked out of attention, so a token's state does not depend on
    the batch it was computed in.
    """

    def __init__(self, tokenizer, frozen: int, max_length: int = TOKENIZER_MAX_LENGTH, batch_size: int = 64,
                 max_bytes: int = FROZEN_CACHE_MAX_BYTES):
        self.tokenizer = tokenizer
        self.frozen = int(frozen)
        self.max_length = max_length
        self.batch_size = batch_size
        self.max_bytes = max_bytes
        self.states: dict[str, torch.Tensor] = {}
        self.bytes = 0

    @classmethod
    def of(cls, module: SentenceEncoderModule, tokenizer, max_length: int = TOKENIZER_MAX_LENGTH,
           **kwargs: Any) -> "FrozenPrefix | None":
        """A prefix cache for `module` as it is frozen now; None when its embeddings train."""
        frozen = frozen_layers(module)
        return None if frozen is None else cls(tokenizer, frozen, max_length, **kwargs)

    def fits(self, module: SentenceEncoderModule) -> bool:
        """Whether `module` is frozen at least as far down as this cache (its states are then valid)."""
        frozen = frozen_layers(module)
        return frozen is not None and frozen >= self.frozen

    @staticmethod
    @contextmanager
    def _swapped(module: SentenceEncoderModule, layers: list, embeddings: torch.nn.Module | None = None):
        bert = module.bert
        saved_layers, saved_embeddings = bert.encoder.layer, bert.embeddings
        bert.encoder.layer = torch.nn.ModuleList(layers)
        if embeddings is not None:
            bert.embeddings = embeddings
        try:
            yield
        finally:
            bert.encoder.layer = saved_layers
            bert.embeddings = saved_embeddings

    def _by_length(self, texts: Sequence[str], lengths: Sequence[int]) -> list[list[str]]:
        # Similar lengths batched together: less padding to run through the layers.
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        return [[texts[i] for i in order[start:start + self.batch_size]]
                for start in range(0, len(order), self.batch_size)]

    def add(self, module: SentenceEncoderModule, texts: Sequence[str]) -> bool:
        """Compute the frozen states of the texts not cached yet; False (nothing added) when they would
        take the cache past `max_bytes`."""
        missing = list(dict.fromkeys(t for t in texts if t not in self.states))
        if not missing:
            return True
        lengths = self.tokenizer(missing, truncation=True, max_length=self.max_length, return_length=True)["length"]
        needed = sum(lengths) * module.dimension * 4
        if self.bytes + needed > self.max_bytes:
            return False
        was_training = module.training
        module.eval()
        layers = list(module.bert.encoder.layer)[: self.frozen]
        try:
            with torch.inference_mode(), self._swapped(module, layers):
                for batch in self._by_length(missing, lengths):
                    inputs = module.tokenize(self.tokenizer, batch, self.max_length)
                    hidden = module.bert(**inputs).last_hidden_state.float().cpu()
                    for row, text in enumerate(batch):
                        length = int(inputs["attention_mask"][row].sum())
                        self.states[text] = hidden[row, :length].clone()
                        self.bytes += self.states[text].numel() * 4
        finally:
            module.train(was_training)
        return True

    def store(self, path: Path, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Write the cached states of `texts` and `vectors` (the module's vectors of them) to `path`,
        atomically, for `restore` by a later run from the same starting weights."""
        texts = list(dict.fromkeys(texts))
        if len(vectors) != len(texts) or any(t not in self.states for t in texts):
            raise ValueError("store: one vector and one cached state per distinct text")
        payload = {
            "frozen": self.frozen, "max_length": self.max_length, "texts": texts,
            "lengths": torch.tensor([len(self.states[t]) for t in texts], dtype=torch.long),
            "states": torch.cat([self.states[t] for t in texts]), "vectors": torch.from_numpy(np.asarray(vectors)),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(payload, staging)
        os.replace(staging, path)

    def restore(self, path: Path, texts: Sequence[str]) -> np.ndarray | None:
        """The vectors `store` wrote for exactly these `texts` (their states cached again), or None
        when `path` is missing, unreadable, written for other texts or layers, or over `max_bytes`."""
        texts = list(dict.fromkeys(texts))
        try:
            payload = torch.load(path, weights_only=True)
        except FileNotFoundError:
            return None
        except Exception as exc:  # a torn or foreign file: computed again, and written over
            log.warning("frozen states %s unreadable (%s): computing them", path, exc)
            return None
        if (payload.get("frozen") != self.frozen or payload.get("max_length") != self.max_length
                or payload.get("texts") != texts):
            log.warning("frozen states %s were written for other texts or layers: computing them", path)
            return None
        states = payload["states"]
        if self.bytes + states.numel() * 4 > self.max_bytes:
            return None
        for text, state in zip(texts, torch.split(states, payload["lengths"].tolist())):
            if text not in self.states:
                self.states[text] = state
                self.bytes += state.numel() * 4
        return payload["vectors"].numpy()

    def _top(self, module: SentenceEncoderModule, texts: Sequence[str]) -> torch.Tensor:
        """The module's unit vectors of cached `texts`: its top layers (in its current mode) and pooling."""
        parameter = next(module.parameters())
        states = [self.states[t] for t in texts]
        width = max(len(s) for s in states)
        padded = torch.zeros((len(states), width, module.dimension), dtype=torch.float32)
        mask = torch.zeros((len(states), width), dtype=torch.long)
        for row, s in enumerate(states):
            padded[row, : len(s)] = s
            mask[row, : len(s)] = 1
        given = _GivenStates(padded.to(device=parameter.device, dtype=parameter.dtype))
        mask = mask.to(parameter.device)
        with self._swapped(module, list(module.bert.encoder.layer)[self.frozen:], given):
            return module(input_ids=torch.zeros_like(mask), attention_mask=mask)

    def forward(self, module: SentenceEncoderModule, texts: Sequence[str]) -> torch.Tensor:
        """`module(**tokenize(texts))` for training, the frozen layers read from the cache (they run
        as fixed feature extractors: no dropout there); gradients flow through the top layers."""
        texts = list(texts)
        if not self.add(module, texts):
            return module(**module.tokenize(self.tokenizer, texts, self.max_length))
        return self._top(module, texts)

    def encode(self, module: SentenceEncoderModule, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors of `texts` by `module` (eval mode, no gradients), its top layers run over the
        cached states: equal to `module.encode_texts` within float tolerance."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, module.dimension), dtype=np.float32)
        if not self.add(module, texts):
            return module.encode_texts(self.tokenizer, texts, self.batch_size, self.max_length).numpy()
        vectors: dict[str, np.ndarray] = {}
        was_training = module.training
        module.eval()
        try:
            with torch.inference_mode():
                unique = list(dict.fromkeys(texts))
                for batch in self._by_length(unique, [len(self.states[t]) for t in unique]):
                    out = self._top(module, batch)
                    for row, text in enumerate(batch):
                        vectors[text] = out[row].float().cpu().numpy()
        finally:
            module.train(was_training)
        return np.stack([vectors[t] for t in texts])


# ------------------------------------------------------------------------- training


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _autocast(device: torch.device, enabled: bool):
    if not enabled or device.type != "cuda":
        return nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _optimizer(module: torch.nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    # Biases and LayerNorm weights are not decayed: decaying them only hurts (BERT's recipe).
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 or "LayerNorm" in name or "bias" in name else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr)


def _linear_warmup(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    warmup = max(1, int(round(total_steps * warmup_fraction)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def collapsed(evaluations: Sequence[Mapping[str, float]], config: FinetuneConfig) -> bool:
    """Whether the newest validation fell below `config.abandon_fraction` of the best earlier one
    (on the early-stop metric)."""
    if config.abandon_fraction is None or len(evaluations) < 2:
        return False
    metric = config.early_stop_metric
    best = max(e[metric] for e in evaluations[:-1])
    return best > 0 and evaluations[-1][metric] < config.abandon_fraction * best


def _fingerprint(config: FinetuneConfig, examples: Sequence[TrainingExample], run_tag: str) -> str:
    """What a checkpoint must match to be resumed: the settings that shape the run and its data."""
    shaping = {k: v for k, v in asdict(config).items()
               if k not in ("checkpoint_dir", "checkpoint_every", "progress", "device", "eval_every", "patience")}
    digest = hashlib.sha256(json.dumps([shaping, run_tag], sort_keys=True, default=str).encode())
    for example in examples:
        digest.update(f"{example.position}\t{example.item_id}\t{example.query}\n".encode())
    return digest.hexdigest()[:24]


def _save_atomically(payload: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class _Batches:
    """Seeded batches: epoch e is a permutation drawn from (seed, e), so a resumed run sees the same batches."""

    def __init__(self, n_examples: int, batch_size: int, seed: int):
        self.n = n_examples
        self.batch_size = min(batch_size, n_examples)
        self.per_epoch = max(1, n_examples // self.batch_size)
        self.seed = seed
        self._epoch = -1
        self._order: torch.Tensor | None = None

    def at(self, step: int) -> list[int]:
        epoch, offset = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(self.n, generator=generator)
            self._epoch = epoch
        return self._order[offset * self.batch_size : (offset + 1) * self.batch_size].tolist()


class _HardNegativeMiner:
    """Nearest catalog items to a query by the current encoder that the user never interacted with."""

    def __init__(self, item_texts: Mapping[str, str], examples: Sequence[TrainingExample], config: FinetuneConfig):
        self.item_ids = list(item_texts)
        self.item_texts = [item_texts[i] for i in self.item_ids]
        self.column = {item_id: i for i, item_id in enumerate(self.item_ids)}
        self.config = config
        # Anything the user touched, before or after, may be a positive: never a negative for them.
        touched: dict[str, set[int]] = {}
        for example in examples:
            seen = touched.setdefault(example.user_id, set())
            seen.add(self.column.get(example.item_id, -1))
            seen.update(self.column[i] for i in example.history_items if i in self.column)
        self.touched = {user: np.fromiter(cols - {-1}, dtype=np.int64) for user, cols in touched.items()}
        self.vectors: torch.Tensor | None = None
        self.refreshed_at = -1

    def refresh(self, module: SentenceEncoderModule, tokenizer, step: int) -> None:
        self.vectors = module.encode_texts(tokenizer, self.item_texts, 64, self.config.max_length)
        self.refreshed_at = step

    def mine(self, module: SentenceEncoderModule, tokenizer, batch: Sequence[TrainingExample]) -> tuple[list[str], list[int]]:
        queries = module.encode_texts(tokenizer, [e.query for e in batch], len(batch), self.config.max_length)
        scores = (queries @ self.vectors.T).numpy()
        batch_items = [self.column[e.item_id] for e in batch if e.item_id in self.column]
        texts, keys = [], []
        for row, example in enumerate(batch):
            scores[row, self.touched.get(example.user_id, [])] = -np.inf
            scores[row, batch_items] = -np.inf  # already in-batch negatives
            wanted = self.config.hard_negatives + self.config.hard_negative_skip
            top = np.argsort(-scores[row])[:wanted][self.config.hard_negative_skip :]
            for col in top:
                if np.isfinite(scores[row, col]):
                    texts.append(self.item_texts[col])
                    keys.append(int(col))
        return texts, keys


def _distillation(teacher, module, tokenizer, batch: Sequence[TrainingExample], queries: torch.Tensor,
                  items: torch.Tensor, max_length: int, prefix: "FrozenPrefix | None" = None) -> torch.Tensor:
    """1 - cosine to the frozen starting encoder, averaged over the batch's queries and items."""
    def reference(texts: list[str]) -> torch.Tensor:
        if prefix is not None:  # the teacher's frozen layers are the module's: the same cached states
            return prefix.forward(teacher, texts)
        return teacher(**module.tokenize(tokenizer, texts, max_length))

    with torch.no_grad():
        reference_queries = reference([e.query for e in batch])
        reference_items = reference([e.positive for e in batch])
    drift = (1 - (queries.float() * reference_queries.float()).sum(-1)).mean()
    drift = drift + (1 - (items.float() * reference_items.float()).sum(-1)).mean()
    return drift / 2


def trending_negatives(examples: Sequence[TrainingExample], dataset, *, window_days: float = 3.0,
                       top: int = 20) -> list[tuple[str, ...]]:
    """Per example, the `top` items with the most events in the `window_days` before it (its own
    item and its user's history left out): the popular-right-now items a served ranking puts next
    to the true next item. `dataset` is the protocols.Dataset whose global positions the examples name."""
    window = window_days * 86400.0
    out = []
    for example in examples:
        end = int(example.position)
        start = int(np.searchsorted(dataset.ts, example.timestamp - window, side="left"))
        counts = np.bincount(dataset.item[start:end], minlength=dataset.n_items)
        candidates = np.flatnonzero(counts)
        if len(candidates) > 4 * top:
            candidates = candidates[np.argpartition(-counts[candidates], 4 * top)[: 4 * top]]
        candidates = candidates[np.lexsort((candidates, -counts[candidates]))]
        skip = set(example.history_items) | {example.item_id}
        out.append(tuple([dataset.item_ids[i] for i in candidates if dataset.item_ids[i] not in skip][:top]))
    return out


def freeze_below(module, top_layers: int | None) -> str:
    """Train only the top `top_layers` transformer layers (embeddings and lower layers frozen):
    about half the backward pass, which on a CPU budget buys twice the steps."""
    layers = getattr(getattr(getattr(module, "bert", None), "encoder", None), "layer", None)
    if top_layers is None or layers is None or top_layers >= len(layers):
        return "all"
    for parameter in module.parameters():
        parameter.requires_grad = False
    for layer in list(layers)[len(layers) - max(0, int(top_layers)):]:
        for parameter in layer.parameters():
            parameter.requires_grad = True
    return f"top {top_layers} of {len(layers)}"


def frozen_layers(module) -> int | None:
    """How many lower transformer layers are frozen together with the embeddings (their outputs are
    then fixed for a given text); None when the embeddings train or the module has no layer list."""
    bert = getattr(module, "bert", None)
    layers = getattr(getattr(bert, "encoder", None), "layer", None)
    if layers is None or any(p.requires_grad for p in bert.embeddings.parameters()):
        return None
    frozen = 0
    for layer in layers:
        if any(p.requires_grad for p in layer.parameters()):
            break
        frozen += 1
    return frozen


def finetune(
    module: SentenceEncoderModule,
    tokenizer,
    train: Sequence[TrainingExample],
    valid: Sequence[TrainingExample],
    item_texts: Mapping[str, str],
    config: FinetuneConfig | None = None,
    *,
    run_tag: str = "",
    negatives: Sequence[Sequence[str]] | None = None,
    frozen_prefix: FrozenPrefix | None = None,
    validation_prefix: FrozenPrefix | None = None,
    start_competes: bool = True,
    start_item_vectors: np.ndarray | None = None,
) -> FinetuneResult:
    """Fine-tune `module` in place on (history text, item text) pairs; returns what happened.

    `negatives`, aligned with `train`, are item ids each example may draw `config.time_negatives`
    extra negatives from (see `trending_negatives`).

    Validation runs only the trainable top layers over the frozen layers' states of the catalog and
    the validation texts (`FrozenPrefix`, built here unless a fitting one is given). A given
    `frozen_prefix` carries the training steps too: the frozen layers then run as fixed feature
    extractors (no dropout in them) and texts shared by several runs go through them once; a
    `validation_prefix` serves the validations only (the training steps run the whole module). With
    `start_competes` off, the starting weights are validated (the first evaluation) but cannot be
    the kept checkpoint: the best trained one is (a study of what training does).
    `start_item_vectors`: the catalogue's vectors (`item_texts` order) by the starting weights,
    when the caller has them: the validation before the first step reuses them.

    The weights left in `module` are those of the best validation (HR/NDCG@10 of the encoder alone
    over all catalog items); with no validation examples, those of the last step. With a
    `checkpoint_dir`, model, optimizer, scheduler and step are saved every `checkpoint_every` steps
    and a rerun with the same data, settings and `run_tag` resumes from them.
    """
    config = config or FinetuneConfig()
    if not train:
        raise ValueError("no training examples")
    _seed_everything(config.seed)
    # Under torchrun every rank runs this with the same data and seed: each takes its shard of
    # every batch, DistributedDataParallel averages the gradients, and rank 0 alone validates
    # (its early-stop decision is broadcast), saves checkpoints and shows progress.
    ranks = distributed.current()
    device = _device(ranks.device(config.device))
    module.to(device)
    ddp = distributed.wrap(module, ranks, device)
    total_steps = config.resolved_steps(len(train))
    batches = _Batches(len(train), config.batch_size, config.seed)
    eval_every = config.eval_every or max(1, total_steps // 5)
    refresh_every = config.hard_negative_refresh or batches.per_epoch
    item_key = {item_id: i for i, item_id in enumerate(item_texts)}

    def keys_of(rows: list[int]) -> torch.Tensor:
        # Same item, same key: the loss masks such pairs. An item outside the catalog gets a key of its own.
        return torch.tensor([item_key.get(train[r].item_id, -1 - r) for r in rows], device=device)

    # Per training example, the log share of the training positives that its item holds (logQ).
    log_q = None
    if config.logq_correction:
        positives = Counter(e.item_id for e in train)
        log_q = torch.tensor([math.log(positives[e.item_id] / len(train)) for e in train],
                             dtype=torch.float32, device=device)

    rng = np.random.default_rng(config.seed)
    valid_sample = list(valid)
    if len(valid_sample) > config.max_valid_queries:
        picked = np.sort(rng.choice(len(valid_sample), config.max_valid_queries, replace=False))
        valid_sample = [valid_sample[i] for i in picked]

    prefix = frozen_prefix if frozen_prefix is not None and frozen_prefix.fits(module) else None
    train_prefix = prefix if not ranks.distributed else None
    if prefix is None and valid_sample and ranks.is_main:
        fitting = validation_prefix is not None and validation_prefix.fits(module)
        prefix = validation_prefix if fitting else FrozenPrefix.of(module, tokenizer, config.max_length)

    def validate() -> dict[str, float]:
        if not valid_sample:
            return {}
        encode = (lambda texts: prefix.encode(module, texts)) if prefix is not None else None
        return encoder_retrieval_metrics(module, tokenizer, valid_sample, item_texts, max_length=config.max_length,
                                         encode=encode, item_vectors=start_item_vectors if step == 0 else None)

    optimizer = _optimizer(module, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_warmup(total_steps, config.warmup_fraction))
    autocast, scaler = _autocast(device, config.mixed_precision)
    miner = _HardNegativeMiner(item_texts, train, config) if config.hard_negatives > 0 else None
    if negatives is not None and len(negatives) != len(train):
        raise ValueError("negatives must be aligned with the training examples")
    use_time_negatives = config.time_negatives > 0 and negatives is not None
    # The starting weights, frozen: the distillation term's reference.
    teacher = copy.deepcopy(module).eval().requires_grad_(False) if config.distill_weight > 0 else None
    negative_rng = np.random.default_rng(config.seed + 17)

    if use_time_negatives:
        run_tag = f"{run_tag}|negatives:{hashlib.sha256(repr(list(map(tuple, negatives))).encode()).hexdigest()[:16]}"
    fingerprint = _fingerprint(config, train, run_tag)
    checkpoint_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    step, resumed_from = 0, 0
    evaluations: list[dict[str, float]] = []
    best_metric: float | None = None
    best_step, bad_evals, stopped_early = 0, 0, False
    best_state: dict[str, torch.Tensor] | None = None
    if checkpoint_dir is not None and (checkpoint_dir / STATE_FILE).is_file():
        saved = torch.load(checkpoint_dir / STATE_FILE, map_location="cpu", weights_only=False)
        if saved.get("fingerprint") == fingerprint:
            module.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            step = resumed_from = int(saved["step"])
            evaluations = list(saved["evaluations"])
            best_metric, best_step, bad_evals = saved["best_metric"], saved["best_step"], saved["bad_evals"]
            stopped_early = bool(saved.get("stopped_early"))
            torch.set_rng_state(saved["torch_rng"])
            if (checkpoint_dir / BEST_FILE).is_file():
                best_state = torch.load(checkpoint_dir / BEST_FILE, map_location="cpu", weights_only=True)
            log.info("resuming fine-tuning from step %d of %d (%s)", step, total_steps, checkpoint_dir)
        else:
            log.warning("checkpoint in %s is from another run; starting over", checkpoint_dir)

    def save_checkpoint() -> None:
        if checkpoint_dir is None:
            return
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        _save_atomically({
            "fingerprint": fingerprint, "model": module.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "evaluations": evaluations,
            "best_metric": best_metric, "best_step": best_step, "bad_evals": bad_evals,
            "stopped_early": stopped_early, "torch_rng": torch.get_rng_state(),
        }, checkpoint_dir / STATE_FILE)

    def record_evaluation() -> bool:
        """Validate now; True when it is the best so far (the weights are then kept)."""
        nonlocal best_metric, best_step, bad_evals, best_state
        metrics = validate()
        if not metrics:
            return False
        evaluations.append({"step": step, **metrics})
        value = metrics[config.early_stop_metric]
        log.info("step %d: validation %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        initial = evaluations[0]
        guarded = (not start_competes or config.guard_metric is None or config.guard_metric not in metrics
                   or metrics[config.guard_metric] >= initial.get(config.guard_metric, -math.inf))
        if not start_competes and step == 0:
            return False
        if best_metric is None or (value > best_metric + config.min_delta and guarded):
            best_metric, best_step, bad_evals = value, step, 0
            best_state = _cpu_state(module)
            if checkpoint_dir is not None:
                checkpoint_dir.mkdir(parents=True, exist_ok=True)
                _save_atomically(best_state, checkpoint_dir / BEST_FILE)
            return True
        bad_evals += 1
        return False

    if step == 0 and not evaluations and ranks.is_main:
        record_evaluation()
    initial_metric = evaluations[0][config.early_stop_metric] if evaluations else None

    from tqdm.auto import tqdm

    # disable=None lets tqdm hide the bar when stderr is not a terminal (cron, systemd).
    bar = tqdm(total=total_steps, initial=step, desc="fine-tune", unit="step", dynamic_ncols=True,
               disable=(None if config.progress is None else not config.progress) if ranks.is_main else True)
    module.train()
    train_seconds, examples_seen, loss_average = 0.0, 0, None
    try:
        while step < total_steps and not stopped_early:
            started = time.perf_counter()
            rows = batches.at(step)
            examples_seen += len(rows)
            if ranks.distributed:
                rows = ranks.shard(rows)
            batch = [train[r] for r in rows]
            hard_texts: list[str] = []
            hard_keys: list[int] = []
            if miner is not None:
                if miner.vectors is None or step - miner.refreshed_at >= refresh_every:
                    miner.refresh(module, tokenizer, step)
                hard_texts, hard_keys = miner.mine(module, tokenizer, batch)
            if use_time_negatives:
                in_batch = {e.item_id for e in batch}
                for r in rows:
                    pool = [i for i in negatives[r] if i in item_key and i not in in_batch]
                    for item_id in negative_rng.permutation(pool)[: config.time_negatives] if pool else []:
                        hard_texts.append(item_texts[item_id])
                        hard_keys.append(item_key[item_id])
            with autocast:
                if ddp is not None:
                    # One forward per backward, as DistributedDataParallel expects: queries and items together.
                    texts = [e.query for e in batch] + [e.positive for e in batch] + hard_texts
                    vectors = ddp(**module.tokenize(tokenizer, texts, config.max_length))
                    query_vectors, item_vectors = vectors[: len(batch)], vectors[len(batch):]
                elif train_prefix is not None:
                    query_vectors = train_prefix.forward(module, [e.query for e in batch])
                    item_vectors = train_prefix.forward(module, [e.positive for e in batch] + hard_texts)
                else:
                    query_vectors = module(**module.tokenize(tokenizer, [e.query for e in batch], config.max_length))
                    item_vectors = module(**module.tokenize(tokenizer, [e.positive for e in batch] + hard_texts,
                                                            config.max_length))
                loss = contrastive_loss(
                    query_vectors.float(), item_vectors[: len(batch)].float(), keys_of(rows), config.temperature,
                    item_vectors[len(batch):].float() if hard_texts else None,
                    torch.tensor(hard_keys, device=device) if hard_texts else None,
                    None if log_q is None else log_q[rows],
                )
                if teacher is not None:
                    loss = loss + config.distill_weight * _distillation(
                        teacher, module, tokenizer, batch, query_vectors, item_vectors[: len(batch)], config.max_length,
                        train_prefix)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(module.parameters(), config.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(module.parameters(), config.max_grad_norm)
                optimizer.step()
            scheduler.step()
            step += 1
            train_seconds += time.perf_counter() - started
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"fine-tuning loss is {value} at step {step}")
            loss_average = value if loss_average is None else 0.9 * loss_average + 0.1 * value
            bar.update(1)
            bar.set_postfix(loss=f"{loss_average:.4f}", ex_s=f"{examples_seen / max(train_seconds, 1e-9):.1f}")
            if step % eval_every == 0 or step == total_steps:
                improved = record_evaluation() if ranks.is_main else False
                module.train()
                if not improved and valid_sample and bad_evals >= config.patience:
                    stopped_early = True
                    log.info("early stop at step %d: no %s gain in %d validations", step, config.early_stop_metric,
                             bad_evals)
                elif not improved and start_competes and collapsed(evaluations, config):
                    stopped_early = True
                    log.info("early stop at step %d: validation %s %.4f is below %.0f %% of the best so far (%.4f)",
                             step, config.early_stop_metric, evaluations[-1][config.early_stop_metric],
                             100 * config.abandon_fraction,
                             max(e[config.early_stop_metric] for e in evaluations[:-1]))
                stopped_early = ranks.broadcast(stopped_early)
            if (checkpoint_dir is not None and ranks.is_main
                    and (step % config.checkpoint_every == 0 or step == total_steps or stopped_early)):
                save_checkpoint()
    finally:
        bar.close()
    if ranks.distributed:
        log.info("rank %d of %d: weights digest %s after %d steps", ranks.rank, ranks.world_size,
                 distributed.weights_digest(module), step)
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    rate = examples_seen / train_seconds if train_seconds > 0 else 0.0
    log.info("fine-tuned %d steps (%d examples, %.1f ex/s); best %s %s at step %d", step, examples_seen, rate,
             config.early_stop_metric, best_metric, best_step)
    return FinetuneResult(
        steps=step, examples=examples_seen, train_seconds=train_seconds, examples_per_second=rate,
        best_step=best_step if best_state is not None else step, best_metric=best_metric,
        initial_metric=initial_metric, evaluations=evaluations, stopped_early=stopped_early,
        resumed_from_step=resumed_from, device=str(device),
    )


# ------------------------------------------------------------- fine-tune and publish

# measure(module, tokenizer, encode): `encode(texts)` gives the module's unit vectors of the texts
# (its top layers over a FrozenPrefix's cached states), or is None (the module's own forward).
Measure = Callable[[SentenceEncoderModule, Any, "Callable[[Sequence[str]], np.ndarray] | None"], dict]


@dataclass
class TrainedEncoder:
    """A fine-tuned encoder ready to publish, with where it started and what training did."""

    module: SentenceEncoderModule
    tokenizer: Any
    init_folder: Path  # the Hugging Face folder it started from (also the tokenizer's source)
    result: FinetuneResult
    trained_layers: str
    initial: SentenceEncoderModule | None = None  # the untouched starting weights, when kept
    measured_before: dict = field(default_factory=dict)
    measured_after: dict = field(default_factory=dict)

    def publish(self, repository, *, base_model: str, max_length: int, activate: bool, **manifest: Any) -> str:
        """Export to ONNX, check parity and publish as a new version (`export.publish_module`)."""
        return publish_module(self.module, self.tokenizer, repository, base_model=base_model, max_length=max_length,
                              activate=activate, tokenizer_source=self.init_folder, **manifest)


def train_encoder(
    init_folder: str | os.PathLike,
    train: Sequence[TrainingExample],
    valid: Sequence[TrainingExample],
    item_texts: Mapping[str, str],
    config: FinetuneConfig,
    *,
    train_layers: int | None = None,
    run_tag: str = "",
    keep_initial: bool = False,
    measure: Measure | None = None,
    negatives: Sequence[Sequence[str]] | None = None,
    start_cache: Path | None = None,
) -> TrainedEncoder:
    """Load `init_folder`, freeze all but the top `train_layers` layers and fine-tune: the one path
    `chronorec-train run` and the evaluation's fine-tuned variants both take.

    `measure(module, tokenizer, encode)`, when given, runs on the starting weights (frozen as they
    will train) and on the trained ones, both encoding through one `FrozenPrefix` (the catalogue's
    frozen layers run once for the two measures and every validation between them; None when no
    layer is frozen); `keep_initial` keeps a copy of the starting weights (ablation).
    `start_cache`: a file for the catalogue's frozen states and the starting weights' vectors of it
    (`FrozenPrefix.store`), read when an earlier call wrote it, else written: the caller names it
    by everything they depend on (starting weights, layers trained, max_length, catalogue texts).
    """
    init_folder = Path(init_folder)
    # Before loading: a weight the folder lacks is initialised at random, so seeded a rerun loads the same module.
    torch.manual_seed(config.seed)
    module, tokenizer = load_base_model(init_folder)
    initial = copy.deepcopy(module).eval() if keep_initial else None
    trained_layers = freeze_below(module, train_layers)
    prefix = FrozenPrefix.of(module, tokenizer, config.max_length) if measure is not None else None
    encode = None if prefix is None else (lambda texts: prefix.encode(module, texts))
    start_vectors, encode_before = None, encode
    if encode is not None:
        # The starting weights' catalogue vectors, once: the measure before training and the
        # validation before the first step both rank the catalogue with them.
        catalogue = list(item_texts.values())
        # (Stored only for a catalogue of distinct texts: one vector per text.)
        stored = start_cache if start_cache is not None and len(set(catalogue)) == len(catalogue) else None
        start_vectors = None if stored is None else prefix.restore(stored, catalogue)
        if start_vectors is None:
            start_vectors = encode(catalogue)
            if stored is not None:
                prefix.store(stored, catalogue, start_vectors)

        def encode_before(texts: Sequence[str]) -> np.ndarray:
            texts = list(texts)
            return start_vectors if texts == catalogue else encode(texts)

    before = measure(module, tokenizer, encode_before) if measure is not None else {}
    result = finetune(module, tokenizer, train, valid, item_texts, config, run_tag=run_tag, negatives=negatives,
                      validation_prefix=prefix, start_item_vectors=start_vectors)
    module.cpu().eval()
    # Keep-best chose the starting weights (the validation before step 1): they measure exactly as
    # before, and one more pass over the catalogue costs minutes on 10k items.
    kept_start = result.best_step == 0 and bool(result.evaluations) and result.steps > 0
    after = (dict(before) if kept_start else measure(module, tokenizer, encode)) if measure is not None else {}
    return TrainedEncoder(module, tokenizer, init_folder, result, trained_layers, initial, before, after)


__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "TrainedEncoder",
    "contrastive_loss",
    "FrozenPrefix",
    "encoder_retrieval_metrics",
    "encoder_retrieval_per_example",
    "frozen_layers",
    "finetune",
    "freeze_below",
    "train_encoder",
    "trending_negatives",
]
