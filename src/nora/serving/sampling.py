"""How one request picks its next token: SamplingParams, logit shaping, the draw, logprobs.

    params = SamplingParams(max_tokens=32, temperature=0.8, top_p=0.9, seed=7).check()
    tok, lp = Sampler().sample(params, output_ids, generator, logits)   # logits: (V,)

Greedy (temperature 0) or sampled (temperature, top-k, top-p; a per-request seeded
generator, so a seed gives the same tokens whatever the batch). Before either, OpenAI's
presence / frequency penalties (over the tokens generated so far) and a logit bias; on
request, the token's log-probability and the top alternatives under the model's own
distribution (before penalties and temperature, as vLLM reports them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


class ParamError(ValueError):
    """A sampling parameter out of range; `param` is the field's name, str() the reason."""

    def __init__(self, param: str, msg: str):
        super().__init__(msg)
        self.param, self.msg = param, msg


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    """How one request decodes; `check()` raises ParamError naming the field and the reason."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # OpenAI: logit -= presence * (count > 0) + frequency * count
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: int | None = None  # None: off; k: the sampled token's logprob + the top k
    timeout: float | None = None  # seconds from submission; then finish_reason "timeout"

    def check(self) -> SamplingParams:
        def bad(param: str, msg: str):
            raise ParamError(param, msg)

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_num(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            bad(
                "temperature", f"temperature must be a number in [0, 100], got {self.temperature!r}"
            )
        if not _is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**63 - 2**16):
            # torch generators take 64-bit seeds; choice i of n uses seed + i
            bad("seed", f"seed must be an integer in [0, 2**63 - 2**16), got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop) or len(self.stop) > 16:
            bad("stop", "stop must be a non-empty string or a list of at most 16 of them")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "stop_token_ids must be a list of token ids")
        for k in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, k)
            if not _is_num(v) or not -2.0 <= v <= 2.0:
                bad(k, f"{k} must be a number in [-2, 2], got {v!r}")
        if not isinstance(self.logit_bias, dict) or not all(
            _is_int(t) and t >= 0 and _is_num(b) and -100 <= b <= 100
            for t, b in self.logit_bias.items()
        ):
            bad("logit_bias", "logit_bias must map token ids to numbers in [-100, 100]")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= 20
        ):
            bad("logprobs", f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")
        if self.timeout is not None and (not _is_num(self.timeout) or self.timeout <= 0):
            bad("timeout", f"timeout must be a number of seconds > 0, got {self.timeout!r}")
        return self

    @property
    def shapes_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    @property
    def greedy_argmax(self) -> bool:
        """Nothing but the batch's argmax is needed (no draw, no shaping, no logprobs)."""
        return not (self.temperature > 0 or self.shapes_logits or self.logprobs is not None)


# (logprob of the chosen token, [(id, logprob) of the top k]) -- one Request.logprobs entry
# without its token id
TokenLogprobs = tuple[float, list[tuple[int, float]]]


class Sampler:
    """One request's next token from its logits; the engine guards each call per request."""

    def next_tokens(self, seqs, logits: torch.Tensor, fail) -> list[int | None]:
        """logits (n, V) -> one token per sequence (the batch's argmax unless the request
        needs the sampler); a request whose sampling raises is handed to `fail(seq, error)`
        (it is finished) and gets None."""
        toks: list[int | None] = logits.argmax(-1).tolist()  # one host sync for the batch
        for i, s in enumerate(seqs):
            p = s.req.params
            if p.greedy_argmax:
                continue
            try:
                toks[i], s.lp = self.sample(p, s.req.output_ids, s.gen, logits[i])
            except Exception as e:
                fail(s, e)
                toks[i] = None
        return toks

    def sample(
        self,
        p: SamplingParams,
        output_ids: list[int],
        gen: torch.Generator,
        logits: torch.Tensor,  # (V,)
    ) -> tuple[int, TokenLogprobs | None]:
        z = self.shape(p, output_ids, logits.float())  # (V,)
        tok = draw(z, p, gen) if p.temperature > 0 else int(z.argmax())
        lp = logprobs_of(logits, tok, p.logprobs) if p.logprobs is not None else None
        return tok, lp

    def shape(self, p: SamplingParams, output_ids: list[int], z: torch.Tensor) -> torch.Tensor:
        """Penalties over the tokens generated so far, then the logit bias (OpenAI's rules)."""
        if (p.presence_penalty or p.frequency_penalty) and output_ids:
            ids = torch.tensor(output_ids, device=z.device)
            counts = torch.bincount(ids, minlength=z.numel())[: z.numel()].to(z.dtype)  # (V,)
            z = z - counts * p.frequency_penalty - (counts > 0).to(z.dtype) * p.presence_penalty
        if p.logit_bias:
            ids = torch.tensor([t for t in p.logit_bias if t < z.numel()], dtype=torch.long)
            bias = torch.tensor([p.logit_bias[int(t)] for t in ids], dtype=z.dtype)
            z = z.index_add(0, ids.to(z.device), bias.to(z.device))
        return z


def logprobs_of(logits: torch.Tensor, tok: int, k: int) -> TokenLogprobs:
    """`tok`'s log-probability and the top `k` under the model's own distribution."""
    lp = torch.log_softmax(logits.float(), -1)  # (V,)
    alts = []
    if k:
        top = torch.topk(lp, k)
        alts = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    return float(lp[tok]), alts


def draw(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    """One token from softmax(logits / T), restricted to the top-k, then to the top-p nucleus.

    The draw is one uniform number through the inverse CDF (multinomial over 49k entries
    costs ~20x more on CPU). The nucleus is looked for among the 1024 most likely tokens and
    only falls back to a full sort when those hold less than top_p of the mass.
    """
    z = logits.float() / p.temperature  # (V,)
    idx = None
    if 0 < p.top_k < z.numel():
        z, idx = torch.topk(z, p.top_k)  # sorted, descending
    probs = torch.softmax(z, -1)
    if p.top_p < 1.0:
        if idx is None:
            probs, idx = torch.topk(probs, min(1024, probs.numel()))
            if float(probs.sum()) < p.top_p and probs.numel() < z.numel():
                probs, idx = torch.sort(torch.softmax(z, -1), descending=True)
        probs = probs * (probs.cumsum(-1) - probs < p.top_p)  # keep the smallest prefix >= p
    cdf = probs.double().cumsum(-1)
    u = torch.rand(1, generator=gen, dtype=torch.float64, device=cdf.device) * cdf[-1]
    j = int(torch.searchsorted(cdf, u, right=True).clamp(max=cdf.numel() - 1))
    return int(idx[j]) if idx is not None else j
