"""The options of the score stage (``reweight-audit score``, ``ra.score``, ``run_score``), each defined once."""
from __future__ import annotations

from dataclasses import dataclass

from reweight_audit.core.config import Config, option
from reweight_audit.core.errors import AuditError, require_positive

MODEL_HELP = "'default' (SmolLM2-135M-Instruct GGUF), a hub id, a local directory or a .gguf file."
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps."
DTYPE_HELP = "auto (bf16 on CUDA, fp32 elsewhere), float32, bfloat16, float16."
CHUNK_ROWS_HELP = "Rows per output-head chunk, at least 1 (default: from free memory)."


def _positive(flag: str, what: str):
    def check(value: int) -> int:
        require_positive(flag, value, what)
        return value

    return check


def _check_max_length(value: int) -> int:
    if value < 2:
        raise AuditError(f"--max-length {value}: give at least 2 tokens")
    return value


@dataclass
class ScoreConfig(Config):
    """How ``score`` runs the model; validated on construction (one AuditError line)."""

    model: str = option("default", kind="model", help=MODEL_HELP)
    device: str = option("auto", help=DEVICE_HELP)
    dtype: str = option("auto", help=DTYPE_HELP)
    batch_tokens: int = option(2048, help="Padded tokens per forward batch.",
                               check=_positive("--batch-tokens", "number of tokens"))
    chunk_rows: int | None = option(None, help=CHUNK_ROWS_HELP, check=_positive("--chunk-rows", "number of rows"))
    max_length: int | None = option(None, help="Truncate sequences to this many tokens (default: the model's "
                                    "context).", check=_check_max_length)
    no_truncate: bool = option(False, help="Refuse a sequence longer than the model's context instead of "
                               "truncating it.")
    template: str = option("auto", help="auto, chat or plain.")
    ref_model: str | None = option(None, kind="model", help="Reference model for Rho-1 (adds ref_logp).")
    trust_remote_code: bool = option(False, help="Allow model code from the hub to run.")
    resume: bool = option(False, help="Continue an interrupted run from its finished shards.")

    def check(self) -> None:
        if self.no_truncate and self.max_length is not None:
            raise AuditError(f"--max-length {self.max_length} asks for truncation and --no-truncate refuses it; "
                             "give one of them")
