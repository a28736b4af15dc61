"""Model cards: the README.md beside an adapter, in the Hugging Face Hub's format.

    card = render(cfg, training=TrainingInfo(data="math", steps=100, lr=5e-4))  # a ModelCard
    write_card("out/", cfg)                  # out/README.md, unless someone else wrote it

A card is a YAML header the Hub indexes (`base_model`, `library_name: peft`, `tags: [nora,
<method>]`, `pipeline_tag`, `license` when known) and a body: the method's formula (its
class's `formula`, taken from the method file's docstring), rank, targets, scale, dropout, the
training data, steps and rate and the evaluation numbers when known (held-out perplexity from
training, `lm_eval_results.json` in the folder), how to load it (nora; PEFT after
`import nora.peft`; vLLM with nora's plugin) and whether it can be merged (the class's
`mergeable`, never its name). `huggingface_hub`'s own parser reads it (`ModelCard.load`).

nora marks the cards it writes (`MARKER`, the body's first line) and rewrites only those, or
the stock card PEFT's `save_pretrained` writes when a folder has none; a README.md someone
wrote is never touched. What a card says about training is also kept in its header
(`nora_training`): `write_card` on a folder (a refresh, as `nora eval --tasks` does after
writing lm-eval's results there) keeps it and adds lm-eval's numbers, while `save_adapter` and
PEFT's `save_pretrained` write new weights, so their card says only what they are told.
Training checkpoints (`checkpoints/step-*/`) get no card: they are for resuming, not sharing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from nora.adapters import METHODS
from nora.checkpoint import WEIGHTS_NAME, atomic_write, peft_type, read_config
from nora.config import AdapterConfig, TrainConfig

README = "README.md"
MARKER = "<!-- nora:card -->"  # delete this line from a card and nora never rewrites it
LM_EVAL_RESULTS = "lm_eval_results.json"  # what `nora eval --tasks` writes beside the adapter


@dataclass
class TrainingInfo:
    """What a card says about training; None means not known (the row is left out)."""

    data: str | None = None  # the data source (nora's name, or a file)
    n_train: int | None = None  # training examples
    max_len: int | None = None  # tokens per example
    steps: int | None = None  # optimizer steps
    lr: float | None = None  # peak learning rate
    schedule: str | None = None  # optimizer and schedule, in words
    batch_size: int | None = None  # examples per optimizer step (all processes)
    seed: int | None = None
    teacher: str | None = None  # distillation: the teacher whose distributions it matched
    eval_ppl: float | None = None  # held-out perplexity at the end of training
    eval_loss: float | None = None  # its NLL per token; with a teacher, KL(teacher ‖ model)
    n_eval: int | None = None  # held-out examples behind eval_ppl

    @classmethod
    def from_dict(cls, d: Any) -> TrainingInfo | None:
        if not isinstance(d, dict):
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_config(cls, cfg: TrainConfig, steps: int, world: int = 1, **known) -> TrainingInfo:
        """What a `TrainConfig` says (`world` processes); `known` adds or corrects fields
        (eval_ppl, the examples actually used, ...)."""
        schedule = f"AdamW, linear warmup over {cfg.warmup_ratio:.0%} of the steps, then cosine"
        schedule += f", weight decay {cfg.weight_decay:g}" if cfg.weight_decay else ""
        return cls(
            **{
                "data": cfg.data,
                "n_train": cfg.n_train,
                "max_len": cfg.max_len,
                "steps": steps,
                "lr": cfg.lr,
                "schedule": schedule,
                "batch_size": cfg.batch_size * cfg.grad_accum * world,
                "seed": cfg.seed,
                "n_eval": cfg.n_eval,
                "teacher": cfg.teacher,
                **known,
            }
        )


# ----------------------------------------------------------------------------- the header


def hub_id(name: str | None) -> str | None:
    """`name` when it reads as a Hub repo id (`org/model` or `model`, not an existing or
    path-like folder), else None: the Hub checks `base_model` against its repos, so a local
    folder goes in the card's body instead."""
    if not name or name.startswith((".", "/", "~")) or Path(name).expanduser().exists():
        return None
    parts = name.split("/")
    ok = len(parts) <= 2 and all(p and all(c.isalnum() or c in "-_." for c in p) for p in parts)
    return name if ok else None


def _metadata(cfg: AdapterConfig, base, license, training) -> ModelCardData:
    tags = ["nora", cfg.method]
    if base:
        tags.append(f"base_model:adapter:{base}")  # the Hub's model tree, as PEFT tags it
    return ModelCardData(
        base_model=base,
        library_name="peft",
        license=license,
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(tags)),  # method "nora": one "nora" tag
        nora_training=(training.to_dict() or None) if training is not None else None,
    )


# ----------------------------------------------------------------------------- the body


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def _table(rows: list[tuple[str, Any]]) -> str:
    rows = [(k, v) for k, v in rows if v is not None]
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in rows)])


def _targets(cfg: AdapterConfig) -> str:
    t = cfg.target_modules
    out = f"regex `{t}`" if isinstance(t, str) else ", ".join(f"`{m}`" for m in t)
    if cfg.exclude_modules:
        out += f" (excluding {cfg.exclude_modules})"
    return out


def _method(cfg: AdapterConfig, n_params: int | None) -> str:
    cls = METHODS[cfg.method]
    where = (
        "inside each targeted linear layer, h = W0·x + Δ(x)"
        if cfg.placement == "weight"
        else "parallel to each targeted block, h = block(x) + Δ(x) (module-level)"
    )
    rows = [
        ("method", f"`{cfg.method}` (peft_type `{peft_type(cfg)}`)"),
        ("rank r", cfg.r),
        ("targets", _targets(cfg)),
        ("layers", ", ".join(map(str, cfg.layers_to_transform or [])) or "all"),
        ("placement", cfg.placement),
        ("activation σ", None if cls.identity_sigma() else f"`{cfg.activation}`"),
        ("scale s", _scale(cfg)),
        ("dropout p", cfg.dropout),
        ("trainable parameters", f"{n_params:,}" if n_params else None),
    ]
    return f"## Method\n\n```text\n{cls.formula}\n```\n\nThe adapter sits {where}.\n\n" + _table(
        rows
    )


def _scale(cfg: AdapterConfig) -> str:
    s = f"{cfg.effective_scale:g}"
    if cfg.scale is not None:
        return s
    return f"{s} (α/{'√r' if cfg.rslora else 'r'}, α = {cfg.alpha:g})"


def _training(t: TrainingInfo | None) -> str | None:
    if t is None or not t.to_dict():
        return None
    data = t.data
    if data is not None and (t.n_train or t.max_len):
        bits = [
            f"{t.n_train} examples" if t.n_train else "",
            f"≤ {t.max_len} tokens each" if t.max_len else "",
        ]
        data = f"`{data}` ({', '.join(b for b in bits if b)})"
    rows = [
        ("data", data),
        ("distilled from (KL to its next-token distributions)", t.teacher and f"`{t.teacher}`"),
        ("optimizer steps", t.steps),
        ("learning rate", t.lr),
        ("optimizer", t.schedule),
        ("examples per step", t.batch_size),
        ("seed", t.seed),
    ]
    return "## Training\n\n" + _table(rows)


def _lm_eval_rows(results: dict[str, Any]) -> list[str]:
    rows = []
    for task, metrics in sorted((results.get("results") or {}).items()):
        for key, value in sorted(metrics.items()):
            name, _, flt = key.partition(",")
            if name == "alias" or "_stderr" in name or not isinstance(value, (int, float)):
                continue
            shot = (results.get("n-shot") or {}).get(task)
            flt = "" if flt in ("", "none") else f" ({flt})"
            rows.append(f"| {task} | {name}{flt} | {_fmt(float(value))} | {_fmt(shot)} |")
    return rows


def _evaluation(t: TrainingInfo | None, lm_eval: dict[str, Any] | None) -> str | None:
    parts = []
    if t is not None and t.teacher and t.eval_loss is not None:
        parts.append(
            f"Held-out KL(teacher ‖ adapter) per position at the end of training: "
            f"**{_fmt(t.eval_loss)}** nats."
        )
    elif t is not None and t.eval_ppl is not None:
        on = f" of `{t.data}`" if t.data else ""
        n = f" ({t.n_eval} examples)" if t.n_eval else ""
        parts.append(
            f"Held-out perplexity{on}{n} at the end of training: **{_fmt(t.eval_ppl)}** "
            f"(loss {_fmt(t.eval_loss)} nats/token)."
            if t.eval_loss is not None
            else f"Held-out perplexity{on}{n} at the end of training: **{_fmt(t.eval_ppl)}**."
        )
    rows = _lm_eval_rows(lm_eval) if lm_eval else []
    if rows:
        limit = (lm_eval.get("config") or {}).get("limit")
        head = "lm-evaluation-harness" + (f" (limit {limit} per task)" if limit else "") + ":"
        parts.append(
            "\n".join([head, "", "| task | metric | value | n-shot |", "|---|---|---|---|", *rows])
        )
    return "## Evaluation\n\n" + "\n\n".join(parts) if parts else None


def _loading(cfg: AdapterConfig, base: str | None) -> str:
    cls = METHODS[cfg.method]
    base_ref = base or "<the base model>"
    plain_lora = peft_type(cfg) == "LORA"  # PEFT's own LoRA format: no nora needed
    peft_note = (
        "A plain PEFT LoRA checkpoint: stock PEFT loads it, no nora needed."
        if plain_lora
        else "nora's own `peft_type`: stock PEFT loads it once `nora.peft` is imported."
    )
    nora_code = (
        "```python\n"
        "import nora\n"
        "from huggingface_hub import snapshot_download\n"
        "from transformers import AutoModelForCausalLM\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base_ref}")\n'
        'model = nora.load_adapter(base, snapshot_download("<this repo>"))  # or a local folder\n'
        "```"
    )
    peft_code = (
        "```python\n"
        + ("" if plain_lora else "import nora.peft  # registers nora's peft_types with PEFT\n")
        + "from peft import PeftModel\n\n"
        'model = PeftModel.from_pretrained(base, "<this repo>")\n'
        "```"
    )
    if not cls.shrinks:
        vllm = (
            "vLLM cannot serve it unmerged: its update is a dense ΔW with no low-rank split. "
            "Merge it (below) and serve the merged model."
        )
    elif cfg.placement != "weight":
        vllm = (
            "vLLM cannot serve it: a module-level adapter sits beside a whole block, and vLLM's "
            "LoRA hooks are per linear layer. Use `nora serve` instead."
        )
    else:
        vllm = (
            (
                "vLLM loads it as it is"
                if plain_lora
                else 'With nora\'s plugin (`pip install "nora-adapters[vllm]"`), vLLM serves it unmerged'
            )
            + ":\n\n```bash\n"
            f"vllm serve {base_ref} --enable-lora --max-lora-rank {cfg.r} \\\n"
            "    --lora-modules my-adapter=<this folder>\n```"
        )
    return "\n\n".join(
        [
            "## How to load",
            "With nora (`pip install nora-adapters`):",
            nora_code,
            f"With PEFT. {peft_note}",
            peft_code,
            f"Serving: `nora serve --adapters <folder of adapter folders>` (OpenAI API). {vllm}",
            "## Merging",
            _merging(cfg),
        ]
    )


def _merging(cfg: AdapterConfig) -> str:
    cls = METHODS[cfg.method]
    if cfg.placement != "weight":
        return (
            "Not possible: a module-level adapter sits parallel to a whole block, not inside one "
            "weight matrix. Serve it unmerged."
        )
    if not cls.mergeable:
        text = (
            "Not possible: this method is non-linear, so its update depends on the input x and "
            "is no fixed ΔW that could be folded into the base weights (`nora.merge` and PEFT's "
            "`merge_and_unload` raise `NotMergeableError`). Serve it unmerged."
        )
        if cls.approximately_mergeable:
            text += (
                " An explicit approximate merge exists, `nora.merge(model, "
                "approximate_merge=True)`, but it is not the trained function."
            )
        return text
    return (
        "Exact: `nora export <this folder> <out> --model <base>` writes the merged model "
        "(a plain Hugging Face folder), or `nora.merge(model)` in place."
    )


# ----------------------------------------------------------------------------- the card


def render(
    cfg: AdapterConfig,
    training: TrainingInfo | None = None,
    lm_eval: dict[str, Any] | None = None,
    n_params: int | None = None,
    license: str | None = None,
    base_model: str | None = None,
) -> ModelCard:
    """The card for an adapter of config `cfg`. `base_model` (a Hub id) defaults to the
    config's `base_model_name_or_path` when that is one; `lm_eval` is lm-eval's results dict."""
    base = base_model or hub_id(cfg.base_model_name_or_path)
    local = cfg.base_model_name_or_path if base is None else None
    title = f"# {METHODS[cfg.method].__name__} adapter (r = {cfg.r})" + (
        f" for {base}" if base else ""
    )
    intro = (
        f"An adapter of method `{cfg.method}`, written by nora (`pip install nora-adapters`), "
        "a library for non-linear low-rank adaptation (NoRA, NoLoRA, AuroRA, LoRAN, LoRA)."
        + (f" Base model: the local folder `{local}`." if local else "")
    )
    from nora import __version__

    foot = (
        f"Written by nora {__version__}. To edit this card, delete the line `{MARKER}` "
        "at its top: nora then never rewrites it."
    )
    sections = [
        MARKER,
        title,
        intro,
        _method(cfg, n_params),
        _training(training),
        _evaluation(training, lm_eval),
        _loading(cfg, base),
        foot,
    ]
    body = "\n\n".join(s for s in sections if s) + "\n"
    meta = _metadata(cfg, base, license, training)
    return ModelCard(f"---\n{meta.to_yaml()}\n---\n\n{body}")


def _stock_peft_card(card: ModelCard) -> bool:
    """The card PEFT's `save_pretrained` writes into a folder without one: the Hub's empty
    template plus PEFT's own appended lines, nothing a person wrote."""
    try:
        stock = ModelCard.from_template(ModelCardData()).text.splitlines()
    except ImportError:  # the template needs jinja2
        return False
    lines = card.text.splitlines()
    rest = lines[len(stock) :]
    peft_lines = (
        "",
        "## Training procedure",
        "### Framework versions",
        "The following `bitsandbytes`",
    )
    return lines[: len(stock)] == stock and all(
        line in peft_lines or line.startswith(("- ", peft_lines[-1])) for line in rest
    )


def existing(folder: str | os.PathLike) -> tuple[bool, ModelCardData | None]:
    """(may nora write folder/README.md, the header of an earlier nora card there). False only
    for a README.md that is neither nora's nor PEFT's stock card."""
    path = Path(folder) / README
    if not path.is_file():
        return True, None
    try:
        text = path.read_text(encoding="utf-8")
        if MARKER not in text and not text.lstrip().startswith("---"):
            return False, None  # no header: neither nora's card nor PEFT's
        card = ModelCard(text, ignore_metadata_errors=True)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):  # unreadable: not ours
        return False, None
    if MARKER in card.text:
        return True, card.data
    return _stock_peft_card(card), None


def _count_params(folder: Path) -> int | None:
    from safetensors import safe_open

    f = folder / WEIGHTS_NAME
    if not f.is_file():
        return None
    with safe_open(f, "pt") as st:
        return sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())


def _lm_eval_results(folder: Path) -> dict[str, Any] | None:
    try:
        d = json.loads((folder / LM_EVAL_RESULTS).read_text())
    except (OSError, ValueError):
        return None  # none, or a broken file: the card leaves the numbers out
    return d if isinstance(d, dict) else None


def card_text(
    folder: str | os.PathLike,
    cfg: AdapterConfig,
    training: TrainingInfo | None = None,
    n_params: int | None = None,
    license: str | None = None,
    base_model: str | None = None,
    keep: bool = False,
) -> str | None:
    """The README.md nora would write into `folder` for `cfg`, or None when the folder holds a
    README.md nora must keep. With `keep` (a refresh: the folder's adapter is the one the card
    is for), what an earlier nora card there knew fills in what is not given, and lm-eval's
    numbers come from folder/lm_eval_results.json; without it (new weights) neither does."""
    folder = Path(folder)
    ok, old = existing(folder)
    if not ok:
        return None
    lm_eval = None
    if keep:
        lm_eval = _lm_eval_results(folder)
        if old is not None:
            training = training or TrainingInfo.from_dict(old.get("nora_training"))
            license = license or old.license
            was = old.base_model if isinstance(old.base_model, str) else None
            base_model = base_model or hub_id(cfg.base_model_name_or_path) or was
    if n_params is None:
        n_params = _count_params(folder)
    return render(cfg, training, lm_eval, n_params, license, base_model).content


def write_text(folder: str | os.PathLike, text: str) -> Path:
    """folder/README.md := text, atomically (a failed write leaves the old file)."""
    path = Path(folder) / README
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def write_card(
    folder: str | os.PathLike,
    cfg: AdapterConfig | None = None,
    training: TrainingInfo | None = None,
    license: str | None = None,
    base_model: str | None = None,
    keep: bool = True,
) -> Path | None:
    """Write or refresh folder/README.md for the adapter saved there (`cfg`: read from the
    folder when omitted; `keep`: see `card_text`); returns its path, or None when the folder
    holds a README.md someone else wrote, which is left as it is. Atomic."""
    cfg = cfg if cfg is not None else read_config(folder)
    text = card_text(folder, cfg, training, None, license, base_model, keep=keep)
    return write_text(folder, text) if text is not None else None


__all__ = ["MARKER", "README", "TrainingInfo", "card_text", "render", "write_card"]
