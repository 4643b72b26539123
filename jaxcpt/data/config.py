"""Data settings: the ``data:`` section of a training YAML.

A run reads any number of named *sources* (a new-domain corpus, a general replay corpus
...) and mixes them by weight. Weights are relative (they are normalised to sum to 1)
and by default count TOKENS, the unit papers report ("5% replay" = 5% of trained tokens),
not documents or rows; ``weights_count`` switches to documents or rows.

The mixture may change during training through ``stages``. Each stage starts at an
optimizer step (``step``), or at the first step after the learning-rate peak where the
rate falls below ``lr_below`` times the peak, and either switches at once or ramps
linearly over ``ramp_steps``. A stage's ``weights`` mapping gives the whole mixture:
sources it does not name get weight 0. YAML may also write a stage as a pair
``[step, {name: weight}]``.

    data:
      tokenizer: /models/llama/tokenizer.model
      sources:
        - {name: medical, paths: ["/data/pubmed/*.jsonl.zst"], weight: 0.95, eval_fraction: 0.001}
        - {name: replay, paths: ["/data/fineweb/*.parquet"], weight: 0.05, eval_documents: 200}
      stages:
        - [10000, {medical: 0.8, replay: 0.2}]
        - {lr_below: 0.5, ramp_steps: 1000, weights: {medical: 0.5, replay: 0.5}}
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from jaxcpt.config import ConfigError, field

SourceFormat = Literal["auto", "jsonl", "parquet", "text", "tokenized"]
TextSplit = Literal["per_file", "blank_line"]
Packing = Literal["first_fit", "concat_split"]
WeightsCount = Literal["tokens", "documents", "rows"]
ResumeMismatch = Literal["error", "restart"]
Instruction = Literal["none", "messages", "prompt_completion"]
LossOn = Literal["answer", "all"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One named corpus: files, how to read them, its base weight and its held-out split."""

    name: str = field(help="Name of the source; used in stage weights, metrics (loss per source) and eval batches.")
    paths: list[str] = field(
        help="Files, directories (read recursively) or glob patterns ('**' allowed). Directories and globs take "
        "only data files: no dotfiles or dot-directories, no README/LICENSE/CHANGELOG-like files, and only files "
        "whose extension names a known format (with a declared format: does not name another one); a warning names "
        "what was skipped. A file named explicitly is always read. A missing file or a pattern matching nothing is "
        "an error at build time."
    )
    format: SourceFormat = field(
        "auto",
        help="jsonl (.jsonl/.json/.ndjson), parquet, text (.txt/.md/.rst/...: one document per file or per "
        "blank-line block), tokenized (a directory written by `jaxcpt tokenize`); jsonl and text files may be .gz or "
        ".zst compressed. auto: from each file's extension. With fewer files than readers (hosts x workers), "
        "uncompressed JSONL and blank-line text are split by byte range, Parquet by row group and row range, "
        "token shards by document range; compressed files cannot be split (a warning says so).",
    )
    text_field: str = field("text", help="Field (JSONL) or column (Parquet) holding the document text.")
    text_split: TextSplit = field(
        "per_file",
        help="Text files only: per_file = each file is one document; "
        "blank_line = documents are separated by blank lines.",
    )
    weight: float = field(1.0, help="Mixture weight before any stage (relative; normalised over all sources).")
    loss_weight: float = field(
        1.0,
        help="This source's weight in the training objective, apart from its sampling weight: the loss is "
        "sum over tokens of loss_weight(source) * token loss / tokens (the domain-weighted objective of NeMo "
        "Automodel). Reported losses stay unweighted. 1.0 everywhere = the plain mean.",
    )
    repeat: bool = field(
        True,
        help="Start a new epoch (new shuffle) when the source is exhausted. false: read once; when a source with "
        "positive weight runs out, the training stream ends.",
    )
    eval_fraction: float = field(
        0.0,
        help="Fraction of documents held out for evaluation, chosen by a stable hash (blake2b) of the document "
        "text, so a held-out document is never trained on, whatever the host count or seed. No source trains on "
        "a document held out by any source: every source's training skips the texts whose hash is below the "
        "largest eval_fraction of all sources (so a source also loses that fraction of its own documents).",
    )
    instruction: Instruction = field(
        "none",
        help="none: text documents. messages: JSONL records with 'messages' ([{role, content}, ...]) rendered with "
        "the tokenizer's own chat template (a tokenizer without one is an error). prompt_completion: JSONL "
        "records with 'prompt' and 'completion' strings (BOS + prompt + completion + EOS). Packed with document "
        "masks like text; see loss_on.",
    )
    loss_on: LossOn = field(
        "answer",
        help="instruction sources: answer = loss on the assistant turns' / completion's tokens only (the rest is "
        "context: seen, not trained on); all = on every token like text.",
    )
    eval_documents: int = field(
        0,
        help="Hold out exactly this many documents: the first ones in sorted file order (an alternative to "
        "eval_fraction; give one or neither). The training of every source skips every document whose text hash "
        "matches one of them (the union over all sources).",
    )
    min_doc_tokens: int = field(
        0,
        help="Skip this source's documents shorter than this many tokens (BOS/EOS included), in training and in its "
        "held-out split: a long-document source for a long-context stage (ProLong: upsample long documents through "
        "this source's weight, keep short text as replay in another source). 0 = keep every document. A source none "
        "of whose next data.max_documents_without_tokens documents is long enough stops the run (no silent spin); with "
        "data.elastic the filter is decided from the index at start-up, and a source left too small is an error then.",
    )

    def validate(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ConfigError(
                f"source name {self.name!r} must be non-empty and use only letters, digits, '_', '-', '.'"
            )
        if not self.paths:
            raise ConfigError(f"source '{self.name}': paths is empty; give at least one file, directory or glob")
        if self.weight < 0:
            raise ConfigError(f"source '{self.name}': weight must be >= 0, got {self.weight}")
        if self.loss_weight < 0:
            raise ConfigError(f"source '{self.name}': loss_weight must be >= 0, got {self.loss_weight}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"source '{self.name}': eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_documents < 0:
            raise ConfigError(f"source '{self.name}': eval_documents must be >= 0, got {self.eval_documents}")
        if self.eval_fraction > 0 and self.eval_documents > 0:
            raise ConfigError(f"source '{self.name}': set eval_fraction or eval_documents, not both")
        if self.min_doc_tokens < 0:
            raise ConfigError(f"source '{self.name}': min_doc_tokens must be >= 0, got {self.min_doc_tokens}")

    @property
    def has_eval_split(self) -> bool:
        return self.eval_fraction > 0 or self.eval_documents > 0


@dataclasses.dataclass(frozen=True)
class MixtureStage:
    """A change of the mixture during training (see the module docstring)."""

    weights: dict[str, float] = field(
        {}, help="Mixture from this stage on, {source name: weight}; unnamed sources get 0. Empty (a stage that only "
        "changes seq_len / batch_size): the mixture in effect goes on."
    )
    step: int | None = field(None, help="Optimizer step (= batch index) at which the stage starts.")
    lr_below: float | None = field(
        None,
        help="Start at the first step after the learning-rate peak where lr < lr_below * peak (needs the LR "
        "schedule at build time). Give this or step.",
    )
    ramp_steps: int = field(
        0,
        help="0: switch at the start step. N > 0: move linearly from the mixture in effect at the start to "
        "these weights over N steps.",
    )
    seq_len: int | None = field(
        None,
        help="Tokens per row from this stage on (a long-context stage; jaxcpt.data.stage_shapes): each source "
        "repacks from its current position, nothing lost or repeated, and the train step compiles once for the new "
        "shape. The learning-rate schedule counts optimizer steps, whatever the shape. null = the previous stage's. "
        "Needs batch_size too.",
    )
    batch_size: int | None = field(
        None,
        help="Global rows per optimizer step from this stage on. With seq_len, say explicitly how the batch follows: "
        "keep the tokens per step (rows x seq_len as before) or keep the rows. null = the previous stage's.",
    )

    # Named check(), not validate(): the config loader would run validate() while trying this type
    # inside the stages union, and turn its precise message into a generic 'fits none of'.
    def check(self) -> None:
        if (self.step is None) == (self.lr_below is None):
            raise ConfigError(f"mixture stage {self.weights}: give exactly one of step or lr_below")
        if self.step is not None and self.step < 0:
            raise ConfigError(f"mixture stage: step must be >= 0, got {self.step}")
        if self.lr_below is not None and not 0.0 < self.lr_below < 1.0:
            raise ConfigError(f"mixture stage: lr_below must be in (0, 1), got {self.lr_below}")
        if self.ramp_steps < 0:
            raise ConfigError(f"mixture stage: ramp_steps must be >= 0, got {self.ramp_steps}")
        if any(w < 0 for w in self.weights.values()):
            raise ConfigError(f"mixture stage: weights must be >= 0, got {self.weights}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ConfigError(f"mixture stage: seq_len must be >= 2, got {self.seq_len}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"mixture stage: batch_size must be >= 1, got {self.batch_size}")
        if not self.weights and self.changes_shape:
            return  # a shape-only stage: the mixture goes on
        if not any(w > 0 for w in self.weights.values()):
            raise ConfigError(f"mixture stage at step={self.step} lr_below={self.lr_below}: needs a positive weight")

    @property
    def changes_shape(self) -> bool:
        return self.seq_len is not None or self.batch_size is not None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training text comes from, how it is tokenized, packed, mixed and held out."""

    sources: list[SourceConfig] = field([], help="The corpora to mix (at least one to train).")
    tokenizer: str = field(
        "",
        help="A sentencepiece .model file or a local Hugging Face tokenizer directory. May stay empty when every "
        "source is pre-tokenized (their BOS/EOS ids are then read from the shards).",
    )
    add_bos: bool | None = field(
        None,
        help="Prepend the tokenizer's BOS token to every document. null: do what the tokenizer itself does "
        "(a Hugging Face tokenizer: whether tokenizer(text) adds BOS, e.g. Llama yes, Qwen no; a sentencepiece "
        ".model file: yes, if it has a BOS token). true with a tokenizer without BOS is an error.",
    )
    add_eos: bool | None = field(
        None,
        help="Append the tokenizer's EOS token to every document. null: yes whenever the tokenizer has an EOS "
        "token, as pretraining does (Llama 3 and Qwen end documents with <|end_of_text|> / <|endoftext|>, although "
        "their HF tokenizers append nothing to a prompt); without EOS between documents a continued model forgets "
        "where documents stop. true with a tokenizer without EOS is an error.",
    )
    seq_len: int = field(
        2048, help="Tokens per packed row. build_train_iterator's seq_len argument, when the trainer passes one, wins."
    )
    packing: Packing = field(
        "first_fit",
        help="first_fit: place whole documents in the first row with room (pads; splits only documents longer than "
        "a row). concat_split: concatenate documents and cut at row boundaries (no padding; splits documents).",
    )
    packing_bins: int = field(
        64, help="first_fit only: rows filled at once; more bins pack tighter but mix more documents per batch."
    )
    weights_count: WeightsCount = field(
        "tokens",
        help="What mixture weights count: tokens (non-padding trained tokens, what papers report), documents "
        "(document pieces packed into rows) or rows.",
    )
    stages: list[MixtureStage | tuple[int, dict[str, float]]] = field(
        [], help="Mixture changes during training; each a MixtureStage mapping or a pair [step, {name: weight}]."
    )
    seed: int = field(0, help="Seed of every shuffle; the same seed gives the same batches.")
    shuffle_buffer: int = field(
        10000,
        help="Documents shuffled together (a window shuffle per source, never across epochs; 0 or 1 = file "
        "order). Restoring re-reads at most one window.",
    )
    shuffle_files: bool = field(True, help="Shuffle the order of files (and Parquet row groups) each epoch.")
    num_workers: int = field(
        0,
        help="Grain worker processes that read, tokenize, pack and batch (0 = in the training process). "
        "Resume needs the same count.",
    )
    worker_buffer_size: int = field(32, help="Rows each worker prepares ahead of the trainer.")
    tokenize_batch_size: int = field(128, help="Documents per tokenizer call (batching amortises per-call overhead).")
    eval_rows: int = field(
        32, help="Rows of each source's held-out split in the evaluation set (the first ones, always the same)."
    )
    fatal_bad_input: bool = field(
        False,
        help="Raise on the first bad document (malformed JSON, missing or non-string text field, empty document, "
        "invalid UTF-8, a document above max_document_bytes, a damaged file) instead of counting and skipping it. "
        "Counts per source and kind go to metrics.jsonl (bad_input) and summary.json.",
    )
    max_bad_fraction: float = field(
        0.1,
        help="Raise when more than this fraction of a source's documents is bad (checked once "
        "bad_input_min_documents were read): a wrong text_field should stop a run, not starve it.",
    )
    bad_input_min_documents: int = field(
        1000, help="Documents a source must have read before max_bad_fraction is checked."
    )
    bad_input_warn_seconds: float = field(
        60.0, help="At most one bad-input warning per source in this many seconds (the first is immediate)."
    )
    max_document_bytes: int = field(
        16 * 1024 * 1024,
        help="Largest document read, in bytes as stored (a JSONL line, a text file or blank-line block after "
        "decompression, a Parquet value; a token-shard document counts 4 bytes per token). A larger one is counted "
        "as bad (too_large) and skipped without being held in memory: lines are read in 1 MiB pieces past the "
        "bound. 16 MiB is far above any natural document (a long book is 1-2 MB) and keeps one tokenizer batch "
        "bounded; raise it for corpora of huge documents.",
    )
    parquet_batch_bytes: int = field(
        64 * 1024 * 1024,
        help="Parquet is read in batches of rows holding about this many bytes of the text column (rows per batch "
        "from the row group's metadata), never a whole row group at once. A single value is read whole (Parquet "
        "cannot read part of one), so memory is at most this plus the largest value's page.",
    )
    max_documents_without_tokens: int = field(
        1000,
        help="Stop the run when this many consecutive documents of a source encode to no token ids: the tokenizer "
        "cannot encode the text (e.g. a 3-id tokenizer built by LlamaTokenizerFast(vocab_file=...)), and training "
        "would otherwise spin on the source forever. 0 turns the check off.",
    )
    tokenizer_min_vocab_fraction: float = field(
        0.5,
        help="Refuse to start when the tokenizer can emit fewer ids than this fraction of the model's vocab_size: a "
        "tokenizer far smaller than the model is the wrong one (or a broken one) and would train a sliver of the "
        "embedding. 0 turns the check off.",
    )
    stall_warn_seconds: float = field(
        120.0,
        help="When the input pipeline has produced nothing for this long, log what it waits for (source, host, "
        "worker, file and position) and again each time as long passes. 0 turns the warning off.",
    )
    exclude_documents: str = field(
        "",
        help="A JSON file of document text hashes (`jaxcpt decontaminate --write-hashes`) that no source trains on: "
        "contaminated documents dropped at read time, like held-out ones. Empty = none.",
    )
    elastic: bool = field(
        False,
        help="Read every source by random access (pre-tokenized directories: .npy or ArrayRecord shards): a global "
        "shuffle per epoch (no shuffle buffer), concat-then-split rows and the mixture computed from the step, so "
        "a checkpoint's data position is the step and per-source positions. It resumes on any host or worker "
        "count, seq_len, weights or added source without repeating or skipping (docs/data.md). packing, "
        "packing_bins, shuffle_buffer and shuffle_files do not apply. Streaming sources are an error here.",
    )
    resume_mismatch: ResumeMismatch = field(
        "error",
        help="When a saved data state does not fit this run (other host count, worker count, files, seed, seq_len "
        "...): error names what changed; restart begins a fresh stream shuffled by (seed, saved step), keeps the "
        "step for the mixture stages and may repeat documents.",
    )

    def __post_init__(self):
        # YAML pairs [step, {name: weight}] become MixtureStage, so later code sees one type.
        stages = [
            MixtureStage(weights=dict(s[1]), step=int(s[0])) if isinstance(s, (tuple, list)) else s for s in self.stages
        ]
        object.__setattr__(self, "stages", stages)

    def validate(self) -> None:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"data.sources: duplicate source names {dupes}")
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be >= 2, got {self.seq_len}")
        for key in ("packing_bins", "tokenize_batch_size", "worker_buffer_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("max_document_bytes", "parquet_batch_bytes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        if self.stall_warn_seconds < 0 or self.tokenizer_min_vocab_fraction < 0:
            raise ConfigError("data.stall_warn_seconds and data.tokenizer_min_vocab_fraction must be >= 0")
        for key in ("shuffle_buffer", "num_workers", "eval_rows", "bad_input_min_documents",
                    "max_documents_without_tokens"):
            if getattr(self, key) < 0:
                raise ConfigError(f"data.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.sources and not any(s.weight > 0 for s in self.sources):
            raise ConfigError("data.sources: at least one source needs a positive weight")
        for i, stage in enumerate(self.stages):
            try:
                stage.check()
            except ConfigError as e:
                raise ConfigError(f"data.stages[{i}]: {e}") from None
            unknown = sorted(set(stage.weights) - set(names))
            if unknown:
                import difflib

                close = difflib.get_close_matches(unknown[0], names, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; sources are {names}"
                raise ConfigError(f"data.stages[{i}] names unknown source(s) {unknown}{hint}")
