"""Adapting a model to a new language or domain: a tokenizer for it, a grown vocabulary, added depth.

Each operation reads an HF directory or a jaxcpt checkpoint and writes an HF directory
(weights, tokenizer, ``jaxcpt_adaptation.json``) that ``init.source: hf`` trains from and
transformers loads:

    jaxcpt train-tokenizer   tokenizer_train.py, texts.py (documents through jaxcpt.data)
    jaxcpt extend-vocab      vocab.py (plan), bpe.py + spm.py (tokenizer files), embeddings.py (new rows),
                             compression.py (tokens per byte before/after)
    jaxcpt expand-depth      depth.py

``model_io.py`` reads and writes the models, ``metadata.py`` the record of what was added
(new token ids, inserted layers) that training selectors read.
"""
