"""Downstream evaluation with EleutherAI's lm-evaluation-harness: the jaxcpt model as a harness model
(``harness.JaxcptLM``), ``jaxcpt evaluate``, and benchmark runs inside training (``eval.downstream``)."""
