"""The options of the score stage (``reweight-audit score``, ``ra.score``)."""
from __future__ import annotations

from dataclasses import dataclass

from reweight_audit.core import options


@dataclass
class ScoreConfig:
    model: str = options.MODEL
    device: str = options.DEVICE
    dtype: str = options.DTYPE
    batch_tokens: int = options.BATCH_TOKENS
    chunk_rows: int | None = options.CHUNK_ROWS
    max_length: int | None = options.MAX_LENGTH
    template: str = options.TEMPLATE
    ref_model: str | None = options.REF_MODEL
    trust_remote_code: bool = options.TRUST_REMOTE_CODE
