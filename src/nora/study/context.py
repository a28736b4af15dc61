"""What every run of one dataset shares: the model, the splits, the prefix cache, the scorers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import threading
import time
import traceback
from pathlib import Path

import torch

import nora
from nora.checkpoint import atomic_write, write_json
from nora.data import batches


def _encode(prefix, features: list[dict], pad_id: int, cache_dir, key: list) -> None:
    """Fill the prefix cache, shortest examples first (less padding per batch); with
    `cache_dir`, the hidden states are also kept on disk (safetensors, one file per `key`)
    so that a resumed sweep does not run the lower layers over every example again."""
    from safetensors.torch import load_file, save_file

    path = None
    if cache_dir is not None:
        digest = hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"prefix-{digest}.safetensors"
        if path.is_file():
            stored = load_file(path)
            if len(stored) == len(features):
                for i, f in enumerate(features):
                    h = stored[str(i)]
                    if h.shape[0] != len(f["input_ids"]):
                        break
                    prefix.hidden[id(f)] = h
                else:
                    return
            prefix.hidden.clear()  # a stale file: encode again
    prefix.encode(sorted(features, key=lambda f: len(f["input_ids"])), pad_id)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        states = {str(i): prefix.hidden[id(f)].contiguous() for i, f in enumerate(features)}
        atomic_write(path, lambda tmp: save_file(states, tmp))


class DataContext:
    """Model + tokenizer, train / validation / test splits, and the prefix cache of the frozen
    lower layers (when only the top `top_layers` are adapted), built once per dataset.

    The held-out examples are the first `n_val + n_test` of the dataset's seeded order
    (validation first), disjoint from the `n_train` training examples after them.
    """

    def __init__(
        self,
        model: str,
        dataset: str,
        n_train: int,
        n_val: int,
        n_test: int,
        max_len: int,
        top_layers: int | None,
        data_path: str | None = None,
        cache_dir: str | Path | None = None,
    ):
        from nora.data import build_splits
        from nora.models import load_base_model
        from nora.prefix_cache import PrefixCache, PrefixCacheError, find_layer_list

        self.dataset, self.n_val, self.n_test, self.n_train = dataset, n_val, n_test, n_train
        self.data_kw = {"path": data_path} if data_path else {}
        self.model, self.tok = load_base_model(model)
        self.n_layers = len(find_layer_list(self.model)[1])
        train_set, held, self.stats = build_splits(
            self.tok, dataset, n_train, n_val + n_test, max_len, seed=0, **self.data_kw
        )
        self.train_set, self.val_set, self.test_set = train_set, held[:n_val], held[n_val:]
        self.layers = list(range(self.n_layers - top_layers, self.n_layers)) if top_layers else None
        self.prefix = None
        if self.layers:
            try:
                prefix = PrefixCache(self.model, self.layers[0])
                if prefix.verify(train_set[0], self.tok.pad_token_id):
                    key = [model, dataset, n_train, n_val, n_test, max_len, top_layers, data_path]
                    _encode(prefix, train_set + held, self.tok.pad_token_id, cache_dir, key)
                    self.prefix = prefix
            except PrefixCacheError:
                pass

    def batches(self, split: list[dict], size: int = 8) -> list[dict]:
        """Collated batches, as cached hidden states when the prefix cache is on."""
        from nora.data import collate

        return batches(
            split, self.tok.pad_token_id, size, self.prefix.collate if self.prefix else collate
        )

    def token_batches(self, split: list[dict], size: int = 8) -> list[dict]:
        """Collated token batches (for the spectral analysis, which runs the whole model)."""
        return batches(split, self.tok.pad_token_id, size)

    def collate(self, features: list[dict]) -> dict:
        from nora.data import collate

        return (self.prefix.collate if self.prefix else collate)(features, self.tok.pad_token_id)

    def forward_context(self):
        return self.prefix.top_only() if self.prefix else contextlib.nullcontext()

    @torch.no_grad()
    def example_nll(self, model) -> tuple[list[float], list[int]]:
        """Per test example: (summed NLL over its response tokens, number of those tokens).

        One example per forward, so the values are exact per example (no padding effects)
        and can be resampled by a bootstrap.
        """
        from nora.evaluate import batch_nll, supports_fast_nll

        was_training = model.training
        model.eval()
        nll, tokens, fast = [], [], None
        try:
            for b in self.batches(self.test_set, size=1):
                with self.forward_context():
                    if fast is None:
                        fast = supports_fast_nll(model, b)
                    s, n = batch_nll(model, b, fast=fast)
                nll.append(float(s))
                tokens.append(n)
        finally:
            model.train(was_training)
        return nll, tokens

    @torch.no_grad()
    def example_kl(self, model, teacher) -> tuple[list[float], list[int]]:
        """Per test example: (summed KL(teacher ‖ model) over its positions, their number)."""
        from nora.distill import batch_kl

        was_training = model.training
        model.eval()
        kl, n = [], []
        try:
            for b in self.batches(self.test_set, size=1):
                with self.forward_context():
                    s, k = batch_kl(model, b, teacher)
                kl.append(float(s))
                n.append(k)
        finally:
            model.train(was_training)
        return kl, n

    def gen_examples(self, n_gen: int) -> list:
        """The first `n_gen` test problems with a gold answer, as raw examples."""
        from nora.data import load_examples

        held = load_examples(self.dataset, self.n_val + self.n_test, 0, **self.data_kw)
        return [e for e in held[self.n_val :] if e.answer is not None][:n_gen]

    def prior_correct(self, n_gen: int) -> list[float]:
        """Per test problem of `gen_examples(n_gen)`: the majority-answer prior's score (its
        family's most common answer among this context's training examples)."""
        from nora.data import load_examples, majority_prior

        held = self.n_val + self.n_test
        train = load_examples(self.dataset, held + self.n_train, 0, **self.data_kw)[held:]
        return majority_prior(train, self.gen_examples(n_gen))

    def pass_at_1(
        self, model, examples: list, max_new_tokens: int
    ) -> tuple[list[float], list[str]]:
        """Greedy pass@1 per test problem (`gen_examples`; the data source's scorer) and the
        completions."""
        from nora.data import score_answer
        from nora.data.tokenization import prompt_ids
        from nora.evaluate import generate

        prompts = [prompt_ids(self.tok, e.messages) for e in examples]
        outs = generate(model, self.tok, prompts, max_new_tokens=max_new_tokens, batch_size=16)
        return [score_answer(e, o) for e, o in zip(examples, outs, strict=True)], outs

    @staticmethod
    def probe(examples: list, outs: list[str]) -> dict[str, list[int]]:
        """The logistic-map probe (the paper's Table 1, `nora.data.probe_logistic`) of each
        problem's completion: correct iterations and state collapse per problem; empty lists
        where the problems are not logistic-map iterations."""
        from nora.data import probe_logistic

        if not examples or any(e.meta.get("source") != "logistic-map" for e in examples):
            return {"correct_steps": [], "collapse": []}
        probes = [
            probe_logistic(o, e.meta["r"], e.meta["x0"], e.meta["steps"])
            for e, o in zip(examples, outs, strict=True)
        ]
        return {k: [x[k] for x in probes] for k in ("correct_steps", "collapse")}

    def score_test(
        self, model, n_gen: int, max_new_tokens: int, keep_samples: int = 10, teacher=None
    ) -> dict:
        """Per-example test NLL and pass@1, their aggregates (PPL, accuracy), and the first
        `keep_samples` completions; with a `teacher`, also the KL to it per example; on
        logistic-map problems, also the probe's correct iterations and collapse per problem."""
        import math

        nll, tokens = self.example_nll(model)
        examples = self.gen_examples(n_gen) if n_gen else []  # loaded once: pass@1, probe
        correct, outs = self.pass_at_1(model, examples, max_new_tokens) if n_gen else ([], [])
        probe = self.probe(examples, outs) if outs else {}
        distill = {}
        if teacher is not None:
            kl, positions = self.example_kl(model, teacher)
            distill = {
                "test_kl": sum(kl) / sum(positions),
                "per_example_kl": {"kl": kl, "positions": positions},
            }
        return {
            **distill,
            "test_ppl": math.exp(sum(nll) / sum(tokens)),
            "test_nll": sum(nll) / sum(tokens),
            "accuracy": sum(correct) / len(correct) if correct else None,
            "per_example": {"nll": nll, "tokens": tokens, "correct": correct, **probe},
            "samples": outs[:keep_samples],
            "n_test": len(nll),
            "n_gen": len(correct),
            "max_new_tokens": max_new_tokens,
        }


class Runner:
    """What the sweep and the study runners share: one dataset's `DataContext` at a time
    (built on first use, so a rerun that skips every run loads nothing), and stages that are
    skipped once their JSON exists and that record a failure instead of stopping the run."""

    def __init__(self, out: Path, log=print):
        self.out, self.log = out, log
        self.ctx: DataContext | None = None
        self.failed = 0
        self.shared = False  # True: other workers may run this folder's stages at once

    def build_context(self, dataset: str) -> DataContext:
        raise NotImplementedError

    def context(self, dataset: str) -> DataContext:
        if self.ctx is None or self.ctx.dataset != dataset:
            self.ctx = None  # free the previous dataset's cache first
            self.log(f"[{dataset}] loading the model and data, building the prefix cache")
            self.ctx = self.build_context(dataset)
        return self.ctx

    def guarded(self, out: Path, done: Path, job, what: str, retry_failed: bool = True, parse=None):
        """`done`'s JSON if it exists; else run `job`, write its result (+ wall_s, cpu_s) to
        `done`. With `parse` (a typed record's `from_dict`: `nora.study.results.SweepRun`,
        `TrainedRun`) the job returns such a record (written by its `to_dict`) and the result
        comes back as one, parsed from what was written; without, both are dicts.
        A failure writes out/error.json (message + traceback), is logged, returns None; a
        later call tries again unless `retry_failed` is False. With `shared` set, a stage is
        run under its lock (`stage_lock`): one that another worker is running raises
        `StageBusy` instead of being run twice."""
        typed = parse if parse is not None else (lambda d: d)
        if done.is_file():
            return typed(json.loads(done.read_text()))
        lock = stage_lock(done.with_suffix(".lock")) if self.shared else contextlib.nullcontext()
        with lock:
            if done.is_file():  # another worker finished it while this one looked
                return typed(json.loads(done.read_text()))
            result = self._run_stage(out, done, job, what, retry_failed, parse)
        return None if result is None else typed(result)

    def _run_stage(self, out: Path, done: Path, job, what: str, retry_failed: bool, parse):
        error = out / "error.json"
        if error.is_file() and not retry_failed:
            return None
        out.mkdir(parents=True, exist_ok=True)
        error.unlink(missing_ok=True)
        from nora.train import TrainingInterrupted

        meter = CostMeter(done.with_name(done.stem + ".cost.json"))
        try:
            with meter:
                result = job()
        except TrainingInterrupted:
            raise  # Ctrl-C stops the whole run; the same command resumes from the checkpoint
        except Exception as e:  # noqa: BLE001 - a failed run is reported, not fatal
            meter.path.unlink(missing_ok=True)
            write_json(
                error, {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            )
            self.log(f"FAILED {what}: {type(e).__name__}: {e}")
            self.failed += 1
            if self.ctx is not None and nora.has_adapters(self.ctx.model):
                nora.unload(self.ctx.model)  # the next run starts from the base model
            return None
        result = result.to_dict() if parse is not None else result
        result |= meter.totals()  # wall_s, cpu_s: every attempt's
        write_json(done, result)
        meter.path.unlink(missing_ok=True)
        ppl = f" ppl={result['ppl']:.4f}" if isinstance(result.get("ppl"), float) else ""
        self.log(f"done {what}{ppl} in {result['wall_s']:.0f} s")
        return result


class StageBusy(Exception):
    """Another worker holds this stage's lock (it is running it now): skip it, come back."""


@contextlib.contextmanager
def stage_lock(path: Path):
    """Hold `path`'s exclusive advisory lock while a stage runs, or raise StageBusy at once if
    another worker holds it. The lock belongs to the open file (flock), so a worker that is
    killed frees its stage immediately; the next worker resumes it from its checkpoint."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StageBusy(str(path)) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class CostMeter:
    """Wall and CPU seconds a stage costs over all its attempts. A worker killed mid-run (a
    session ends) resumes the run from its checkpoint later; without a record the finished
    stage would count only its last attempt. So the running total (earlier attempts plus
    this one) is written to `path` every `every` seconds and read back by the next attempt;
    a killed attempt loses at most `every` seconds of the count. CPU time is the process's
    (all threads: one worker, one stage at a time)."""

    every = 30.0  # seconds between writes

    def __init__(self, path: Path):
        self.path = path
        self.before = {"wall_s": 0.0, "cpu_s": 0.0}  # earlier attempts
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            d = json.loads(path.read_text())
            self.before = {"wall_s": float(d["wall_s"]), "cpu_s": float(d["cpu_s"])}
        self._stop = threading.Event()

    def totals(self) -> dict[str, float]:
        """Earlier attempts plus this one so far (or until it ended)."""
        wall, cpu = self._end or (time.perf_counter(), time.process_time())
        return {
            "wall_s": self.before["wall_s"] + wall - self._t0,
            "cpu_s": self.before["cpu_s"] + cpu - self._c0,
        }

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            write_json(self.path, self.totals())

    def __enter__(self) -> CostMeter:
        self._t0, self._c0, self._end = time.perf_counter(), time.process_time(), None
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._end = (time.perf_counter(), time.process_time())
        self._stop.set()
        self._thread.join()
        write_json(self.path, self.totals())  # e.g. Ctrl-C: the resumed attempt adds to it


def machine_info() -> dict:
    """The machine a result was measured on (CPU model, cores, torch, GPU): every study,
    sweep and benchmark records it."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "nora": nora.__version__,
        "python": platform.python_version(),
    }
