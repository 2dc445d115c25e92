"""Integrations with training frameworks (optional extras; nothing here is imported by
``import gradcomp``):

- ``gradcomp.integrations.lightning``: ``GradcompDDPStrategy``, a Lightning DDP strategy
  that registers gradcomp on CPU and GPU alike (``pip install gradcomp[lightning]``).
- ``gradcomp.integrations.transformers``: ``GradcompTrainer`` (and ``GradcompTrainerMixin``), a
  Hugging Face Trainer that registers gradcomp on the DDP model it trains and keeps each
  rank's State in its checkpoints (``pip install gradcomp[transformers]``).
- Accelerate takes only its built-in hook names; register gradcomp on the model
  ``accelerator.prepare`` returned (docs/getting-started/accelerate.md).
"""
