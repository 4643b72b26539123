"""Training data: sources, tokenization, packing, the token-weighted mixture, held-out splits.

The trainer's entry points live in ``jaxcpt.data.pipeline`` (imported lazily so that Grain
worker processes, which import these modules, stay light):

    from jaxcpt.data.pipeline import build_train_iterator, build_eval_batches
    it = build_train_iterator(cfg.data, batch_size=per_host_batch, seq_len=seq_len,
                              lr_schedule=schedule, total_steps=total_steps)
    batch = next(it)            # inputs, targets, segment_ids, positions: [batch, seq] int32;
                                # loss_mask: [batch, seq] float32; source: [batch] int32
    state = it.get_state()      # JSON-serialisable; it.set_state(state) resumes exactly
    it.source_names, it.step, it.bad_input_counts()

Modules: ``config`` (DataConfig, SourceConfig, MixtureStage), ``sources`` (files, formats,
resumable reading of files and ranges of them), ``shares`` (splitting sources into ranges
when readers outnumber files; each host's and worker's share), ``documents`` (epochs,
held-out split, bad input), ``shuffle``, ``tokenize`` (tokenizers, the tokenizing stage), ``packing``,
``mixture`` (weights over training, the interleaver), ``state`` (JSON-safe iterator
states), ``plan`` (what a stream needs, resolved at build time: files, special tokens, fingerprint),
``pipeline`` (assembly, TrainIterator), ``batches`` (evaluation batches), ``accounting`` (per-source
rows, tokens seen / trained on, epochs), ``command`` (``jaxcpt tokenize``).
"""
