"""The options of the inject stage (``reweight-audit inject``, ``ra.inject``, ``run_inject``), each defined once."""
from __future__ import annotations

from dataclasses import dataclass, field

from reweight_audit.core.config import Config, option
from reweight_audit.core.errors import AuditError
from reweight_audit.core.spans import check_after_error
from reweight_audit.injection.noise import DEFAULT_NOISE, NoiseConfig, preset_settings


def check_limit(limit: int) -> int:
    if limit < 1:
        raise AuditError("--limit must be a positive number of records")
    return limit


@dataclass
class InjectConfig(Config):
    """How ``inject`` reads a corpus and which noise it injects; validated on construction (one AuditError line)."""

    noise: str | None = option(None, help=f"Comma list of families, optionally weighted: filler:2,hedge:1. 'all' for "
                                          f"every family, 'none' to pass the corpus through. Default: {DEFAULT_NOISE}.")
    rate: float | None = option(None, help="Probability of an injection at each eligible word boundary (default 0.1).")
    target_frac: float | None = option(None, help="Instead of --rate: the share of response words to make noise.")
    clean_frac: float = option(0.0, help="Share of sequences left untouched (negatives for sequence metrics).")
    seed: int = option(0, help="Seed of every random choice; the same seed gives the same files.")
    preset: str | None = option(None, help="Named noise settings instead of --noise/--rate: table1 (filler and hedge "
                                           "at about 0.8% of CHAMP's tokens, the share RankTuner's Table 1 implies).")
    limit: int | None = option(None, help="Only the first N records.", check=check_limit)
    split: str = option("train", help="Split of a Hugging Face dataset.")
    prompt_field: str = option("prompt", help="Field holding the prompt.")
    response_field: str = option("response", help="Field holding the response.")
    id_field: str | None = option(None, help="Field holding each record's id (default: 'id' where present, else a "
                                             "content hash).")
    steps_field: str | None = option(None, help="Read step-labelled rows: this field holds the list of steps "
                                                "(ProcessBench: steps).")
    first_error_field: str = option("label", help="With --steps-field: the index of the first wrong step, -1 for none.")
    after_error: str = option("cut", help="After an annotated first wrong step: cut (the response ends with it) or "
                                          "keep (the rest stays, as a span of kind after-error).")
    tokenizer: str = option("default", kind="model", help="Vocabulary source for random-token (a --model value).")
    skip_bad: bool = option(False, help="Skip and count malformed JSONL lines and records whose annotations do not "
                                        "fit their text, instead of stopping.")
    trust_remote_code: bool = option(False, help="Allow model code from the hub to run.")
    noise_config: NoiseConfig = field(init=False, repr=False, compare=False)

    def check(self) -> None:
        noise, rate, target_frac = preset_settings(self.preset, self.noise, self.rate, self.target_frac)
        self.noise_config = NoiseConfig(noise=noise, rate=rate, target_frac=target_frac, clean_frac=self.clean_frac,
                                        seed=self.seed, preset=self.preset)
        check_after_error(self.after_error)
