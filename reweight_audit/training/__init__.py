"""Beside the pipeline, train: fine-tune with any registered method's weights and audit the model as it learns.

``loss`` holds ``ReweightedLoss`` (a Trainer ``compute_loss_func``) and ``AuditCallback``; ``run`` is
``reweight-audit train`` (``run_train``).

May import: every stage below it (core, methods, scoring's public surface, evaluation, reporting); only the faces
(cli, api) import it.
"""
