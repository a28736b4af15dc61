"""The report's shared vocabulary: each variant's printed name, which variants form the rank
study, Table 2 and the siblings, the ranks a variant runs at, and its twins."""

from __future__ import annotations

from collections.abc import Sequence

from nora.study.results import StudyResults

NAMES = {
    "lora": "LoRA α=32",
    "lora-alpha-r": "LoRA α=r",
    "lora-rslora": "rsLoRA",
    "nora": "NoRA",
    # Table 2 (the paper's ablations)
    "nora-identity": "NoRA-identity (σ = identity)",
    "nora-relu": "NoRA-ReLU",
    "nora-no-dropout": "NoRA without dropout",
    "nora-module": "module-level NoRA (matched parameters)",
    # dropout 0.1 where LoRA has it (its input, PEFT's place); the latent-dropout contrast at
    # NoRA's init and scale is NoRA-identity against LoRA with NoRA's init and scale
    "lora-dropout": "LoRA α=32 + input dropout 0.1",
    "lora-nora-init": "LoRA with NoRA's init and scale",
    # the siblings
    "nolora": "NoLoRA",
    "aurora": "AuroRA",
    "loran": "LoRAN",
}
TABLE2 = (
    "nora-identity",
    "nora-relu",
    "nora-no-dropout",
    "nora-module",
    "lora-dropout",
    "lora-nora-init",
)
SIBLINGS = ("nolora", "aurora", "loran")


def variant_name(variant: str) -> str:
    return NAMES.get(variant, variant)


def rank_study(config: dict) -> list[str]:
    """The variants of the rank study: every one that is not an ablation or a sibling."""
    return [v for v in config["variants"] if v not in TABLE2 + SIBLINGS]


def lora_variants(config: dict) -> list[str]:
    """The rank study's LoRA variants (method "lora", AdapterConfig's default)."""
    return [v for v in rank_study(config) if config["variants"][v].get("method", "lora") == "lora"]


def ranks_of(config: dict, variant: str) -> list[int]:
    """The ranks a variant's cells run at, in the study's order (`StudyConfig.ranks_of`; a
    study.json from before `variant_ranks` runs every variant at every rank)."""
    mine = config.get("variant_ranks", {}).get(variant, config["ranks"])
    return [r for r in config["ranks"] if r in mine]


NOT_RUN = "·"  # a cell outside its variant's ranks: not run by design (not "–", missing)


def not_run_note(config: dict, variants: Sequence[str]) -> list[str]:
    """The legend of `NOT_RUN`, where one of `variants` leaves a rank out."""
    if all(ranks_of(config, v) == config["ranks"] for v in variants):
        return []
    return [f"({NOT_RUN}: not run by design, a rank outside the variant's `variant_ranks`.)", ""]


def same_adapter(res: StudyResults, variant: str, r: int) -> str | None:
    """The earlier variant `variant` is the same adapter as at rank r (its runs are that
    one's: `runner.twin_of`), or None; also None where that one does not run at r (its
    `variant_ranks`), so `variant` runs its own cell there."""
    from nora.study.runner import twin_of

    c = res.config
    twin = twin_of(c["variants"], variant, r) if variant in c["variants"] else None
    return twin if twin is not None and r in ranks_of(c, twin) else None


def config_defaults():
    """A config's defaults (a study saved before a field existed reads as its default)."""
    from nora.study.runner import StudyConfig

    return StudyConfig()


def twin_notes(res: StudyResults, d: str, variants: list[str]) -> list[str]:
    """One line per variant and rank where it ran as another variant's adapter (its runs are
    that one's, copied)."""
    notes = [
        f"- r={r}: {variant_name(v)} = {variant_name(t)} (the same adapter: shown and compared once, as "
        f"{variant_name(t)})"
        for v in variants
        for r in ranks_of(res.config, v)
        if (t := same_adapter(res, v, r)) and res.cell(d, v, r)
    ]
    return [*notes, ""] if notes else []
